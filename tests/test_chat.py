"""Chat templates: the real templates of our test models rendered to the exact prompts their
templates define (derived by reading each template), the ChatML fallback, and the Hugging Face
environment details (tojson, raise_exception, loop controls, whitespace control, sandbox)."""
import json
from datetime import datetime
from pathlib import Path

import pytest

from conftest import SHARED, model_path

from numba_apr.text.chat import render_chat, render_chatml
from numba_apr.errors import NumbaAprError
from numba_apr.model.gguf_file import GGUFFile

QWEN_GGUF = SHARED / "models" / "tiny-qwen2-q4km.gguf"


def gguf_chat_info(path: Path):
    """(chat template or None, bos token text, eos token text) as the GGUF stores them. Read with the
    package's parser: gguf.GGUFReader gives the same values but takes ~20 s per file."""
    meta = GGUFFile(path).metadata
    tokens = meta["tokenizer.ggml.tokens"]
    return (meta.get("tokenizer.chat_template"), tokens[meta["tokenizer.ggml.bos_token_id"]],
            tokens[meta["tokenizer.ggml.eos_token_id"]])


# Gemma 3's published chat template (google/gemma-3-*-it tokenizer_config.json). The cached
# gemma-3-270m GGUF is the base model and carries no template, so its test uses this one.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

USER = [{"role": "user", "content": "Write a haiku about the ocean."}]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "  Hello there \n"},
               {"role": "assistant", "content": "Hi."},
               {"role": "user", "content": "Bye"}]


# ------------------------------------------------------------------ real templates

def test_qwen_template():
    if not QWEN_GGUF.is_file():
        pytest.skip(f"{QWEN_GGUF} is absent")
    template, bos, eos = gguf_chat_info(QWEN_GGUF)
    assert template is not None
    # No system message: the template inserts its default one.
    assert render_chat(USER, template, bos_token=bos, eos_token=eos) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nWrite a haiku about the ocean.<|im_end|>\n"
        "<|im_start|>assistant\n")
    # A system message replaces the default; contents are not trimmed; turns keep their roles.
    assert render_chat(WITH_SYSTEM, template, bos_token=bos, eos_token=eos) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n  Hello there \n<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render_chat(USER, template, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nWrite a haiku about the ocean.<|im_end|>\n")


def test_qwen_template_against_golden_chatml_prompt():
    """The hand-written ChatML prompt in the golden set is what the fallback renders, and what the
    Qwen template renders after its default system turn."""
    golden = json.loads((SHARED / "golden" / "prompts.json").read_text(encoding="utf-8"))
    prompt = next(p for p in golden["generate"] if p.startswith("<|im_start|>user"))
    assert render_chat(USER, None) == prompt
    if QWEN_GGUF.is_file():
        template, _, _ = gguf_chat_info(QWEN_GGUF)
        assert render_chat(USER, template) == \
            "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n" + prompt


def test_smollm2_template():
    template, bos, eos = gguf_chat_info(model_path("SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert template is not None
    assert (bos, eos) == ("<|im_start|>", "<|im_end|>")
    default_system = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                      "Hugging Face<|im_end|>\n")
    assert render_chat(USER, template, bos_token=bos, eos_token=eos) == (
        default_system + "<|im_start|>user\nWrite a haiku about the ocean.<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(WITH_SYSTEM[:2], template, bos_token=bos, eos_token=eos) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n  Hello there \n<|im_end|>\n<|im_start|>assistant\n")


def test_gemma3_template():
    template, bos, eos = gguf_chat_info(model_path("gemma-3-270m-q4_k_m.gguf"))
    assert (bos, eos) == ("<bos>", "<eos>")
    template = template or GEMMA3_TEMPLATE
    # bos_token first; the system text is folded into the first user turn; contents trimmed;
    # "assistant" becomes "model".
    assert render_chat(WITH_SYSTEM, template, bos_token=bos, eos_token=eos) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHello there<end_of_turn>\n"
        "<start_of_turn>model\nHi.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n")
    assert render_chat(USER, template, bos_token=bos, eos_token=eos, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nWrite a haiku about the ocean.<end_of_turn>\n")
    # The template's own check: roles must alternate.
    with pytest.raises(NumbaAprError, match="Conversation roles must alternate") as e:
        render_chat(USER + USER, template, bos_token=bos)
    assert "\n" not in str(e.value)


def test_model_without_template_falls_back_to_chatml():
    assert render_chat(WITH_SYSTEM, None) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n  Hello there \n<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render_chat(USER, "") == render_chat(USER, None) == render_chatml(USER)
    assert render_chat(USER, None, add_generation_prompt=False) == \
        "<|im_start|>user\nWrite a haiku about the ocean.<|im_end|>\n"


# ------------------------------------------------------------------ the environment

def test_whitespace_control_as_transformers():
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before one.
    template = ("{% for m in messages %}\n"
                "    {% if m.role == 'user' %}\n"
                "[{{ m.content }}]\n"
                "    {% endif %}\n"
                "{% endfor %}\n")
    assert render_chat(USER + USER, template) == "[Write a haiku about the ocean.]\n" * 2


def test_tojson_like_transformers():
    msgs = [{"role": "user", "content": "café \"quoted\" <b> 😀"}]
    assert render_chat(msgs, "{{ messages[0] | tojson }}") == \
        '{"role": "user", "content": "café \\"quoted\\" <b> 😀"}'
    assert render_chat(msgs, "{{ {'a': [1, 2]} | tojson(indent=2) }}") == '{\n  "a": [\n    1,\n    2\n  ]\n}'
    assert render_chat(msgs, "{{ tools | tojson }}") == "null"


def test_loop_controls_and_globals():
    msgs = [{"role": "user", "content": str(i)} for i in range(5)]
    assert render_chat(msgs, "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
                             "{% if loop.index0 == 3 %}{% break %}{% endif %}{{ m.content }}{% endfor %}") == "02"
    assert render_chat(msgs, "{{ strftime_now('%Y') }}") == str(datetime.now().year)
    assert render_chat(msgs, "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}",
                       bos_token="<s>", eos_token="</s>", add_generation_prompt=False) == "<s>|</s>|False"
    assert render_chat(msgs, "{% generation %}x{% endgeneration %}") == "x"


@pytest.mark.parametrize("template,message", [
    ("{{ raise_exception('System role not supported') }}", "System role not supported"),
    ("{% for m in messages %}", "syntax error"),
    ("{{ messages[0].content + 1 }}", "chat template failed"),
    ("{{ messages.__class__ }}{{ ''.__class__.__mro__ }}", "chat template failed"),
    ("{{ messages.append(1) }}", "chat template failed"),
])
def test_template_errors_are_one_line(template, message):
    with pytest.raises(NumbaAprError) as e:
        render_chat(USER, template)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("messages,message", [
    ("hello", "messages must be a list"),
    ([{"role": "user"}], "message 0 has no 'content'"),
    ([{"content": "x"}], "message 0 has no 'role'"),
    ([{"role": "user", "content": 3}], "'content' must be a string"),
    ([{"role": None, "content": "x"}], "'role' must be a string"),
    ([USER[0], "x"], "message 1 must be a dict"),
])
def test_bad_messages(messages, message):
    for template in (None, "{{ messages }}"):
        with pytest.raises(NumbaAprError, match=message):
            render_chat(messages, template)


def test_caller_messages_untouched():
    msgs = [dict(m) for m in WITH_SYSTEM]
    render_chat(msgs, GEMMA3_TEMPLATE, bos_token="<bos>")
    assert msgs == WITH_SYSTEM
