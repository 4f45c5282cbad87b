"""Chat templates: turn a list of messages into the prompt text the model was fine-tuned on.

A GGUF carries its chat template as a Jinja2 string (`tokenizer.chat_template`, copied from the
Hugging Face tokenizer_config.json). We render it the way transformers' `apply_chat_template` does,
because that is the environment the template authors wrote and tested against:

* `ImmutableSandboxedEnvironment` (templates come from downloaded files: no attribute tricks, no
  mutation of our objects) with `trim_blocks=True, lstrip_blocks=True` and the `loopcontrols`
  extension (`{% break %}` / `{% continue %}`);
* globals `raise_exception(msg)` (templates use it to reject bad conversations) and
  `strftime_now(fmt)` (templates that print today's date);
* a `tojson` filter that keeps non-ASCII text as is (`ensure_ascii=False`), unlike Jinja's own, which
  escapes HTML characters and would change the prompt;
* a no-op `{% generation %}` block (transformers uses it to mark assistant tokens for training masks);
* variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools=None`,
  `documents=None`.

With no template we fall back to ChatML, as llama.cpp does for a model without one.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import NumbaAprError

__all__ = ["render_chat", "render_chatml"]


class _TemplateRaised(Exception):
    """`raise_exception(...)` from inside a template: the template's own message, passed on as is."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # As transformers defines it: no HTML escaping, non-ASCII kept, `indent` honoured.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=16)
def _compile(template: str):
    # One environment per template keeps the cache simple; compiling is the expensive part, and a
    # process renders with one model's template over and over.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise NumbaAprError(f"chat template has a syntax error at line {e.lineno}: {_one_line(e.message)}") from None


def _one_line(text) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise NumbaAprError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise NumbaAprError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise NumbaAprError(f"message {i} has no '{key}'")
            if not isinstance(m[key], str):
                raise NumbaAprError(f"message {i}: '{key}' must be a string, got {type(m[key]).__name__}")


def render_chatml(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """ChatML, llama.cpp's default: `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then
    `<|im_start|>assistant\\n` to prompt the reply."""
    _check_messages(messages)
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def render_chat(messages: list[dict], template: str | None, *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` under `template` (a Jinja2 chat template; None or empty: ChatML).

    Raises NumbaAprError for malformed messages, a template that does not compile, or one that fails
    while rendering (its `raise_exception` message, or the Jinja/Python error, on one line).
    """
    _check_messages(messages)
    if template is None or not str(template).strip():
        return render_chatml(messages, add_generation_prompt)
    if not isinstance(template, str):
        raise NumbaAprError(f"chat template must be a string, got {type(template).__name__}")
    compiled = _compile(template)
    # Templates may index or slice messages but the sandbox forbids mutating them; hand over plain
    # copies anyway so nothing the template does reaches the caller's objects.
    msgs = [dict(m) for m in messages]
    try:
        return compiled.render(messages=msgs, add_generation_prompt=bool(add_generation_prompt),
                               bos_token=bos_token, eos_token=eos_token, tools=None, documents=None)
    except _TemplateRaised as e:
        raise NumbaAprError(f"chat template rejected the conversation: {_one_line(e)}") from None
    except jinja2.TemplateError as e:
        raise NumbaAprError(f"chat template failed: {_one_line(e)}") from None
    except Exception as e:  # a template is data from the model file: any failure inside is its fault
        raise NumbaAprError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None
