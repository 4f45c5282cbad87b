"""The generation loop: prompt in one batch, then one token per step until a stop condition.

Stops on an end-of-generation token, on `max_tokens`, on a full context, or on a user stop
string (the text is held back while it could still be the start of one, and the stop string
itself is never emitted). Text comes out through the tokenizer's streaming decoder, so a
UTF-8 character split over two tokens is emitted whole.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from .sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    stop_reason: str = ""
    token_ids: list[int] = field(default_factory=list)


class _StopFilter:
    """Holds back text that may be the start of a stop string."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        # Keep the longest tail that is a prefix of some stop string.
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class HostStepper:
    """Logits on the host, sampled by the CPU `Sampler` (the CPU backend; GPU steppers sample on
    the device, see model_cuda.CudaStepper). `first` evaluates the prompt and samples the first
    token; `next` evaluates one token and samples the following one."""

    def __init__(self, model, params: SamplingParams):
        self.model, self.sampler = model, Sampler(model.config.n_vocab, params)

    def first(self, prompt_ids) -> int:
        logits = self.model._prefill(prompt_ids)
        return self.sampler.sample(logits[0], self.model._history())

    def next(self, token: int) -> int:
        logits = self.model._decode(token)
        return self.sampler.sample(logits[0], self.model._history())


def generate(model, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
             stop: list[str] | tuple[str, ...] = (), stats: GenerationStats | None = None) -> Iterator[str]:
    """Yield the text of the continuation of `prompt_ids`, piece by piece."""
    stats = stats if stats is not None else GenerationStats()
    params.validate()
    stepper = model._stepper(params)
    tok = model.tokenizer
    decoder = tok.decoder()
    stopper = _StopFilter(list(stop))

    t0 = time.perf_counter()
    token = stepper.first(prompt_ids)
    stats.prompt_tokens = len(prompt_ids)
    stats.prompt_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats.stop_reason = "length"
    try:
        for i in range(max_tokens):
            if i:
                token = stepper.next(token)
            if token in tok.eog_ids:
                stats.stop_reason = "eog"
                break
            stats.token_ids.append(token)
            stats.generated_tokens += 1
            text, hit = stopper.push(decoder.add(token))
            if text:
                yield text
            if hit:
                stats.stop_reason = "stop string"
                return
            if model.n_past >= model.n_ctx:
                stats.stop_reason = "context full"
                break
        text, hit = stopper.push(decoder.flush())
        yield from ([text] if text else [])
        if not hit:
            rest = stopper.flush()
            yield from ([rest] if rest else [])
    finally:
        stats.generate_seconds = time.perf_counter() - t0
