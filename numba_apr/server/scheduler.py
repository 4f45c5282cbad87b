"""Continuous batching: many requests, one model, one forward pass per step for all of them.

A `Scheduler` owns a model loaded with `n_seq` KV slots and runs on its own thread. Each step it
 1. admits waiting requests into free slots: a slot whose cached tokens start the new prompt
    (a chat's next turn) keeps that prefix, otherwise the least recently used free slot;
 2. builds one batch: the last sampled token of every generating request, then prompt chunks of
    the requests still reading their prompt, up to `n_batch` tokens (so a long prompt is read
    over several steps and running streams keep going meanwhile);
 3. evaluates it (`Model._eval_batch`: each weight read once per tile of tokens) and samples the
    next token of each request whose row it asked for, with that request's own sampler, seed
    and penalties;
 4. streams the text out through each request's `sink`, and frees the slots of requests that
    ended (end of generation, stop string, max_tokens, full context) or were cancelled.
Batching changes no token: every row is computed as if alone (model.cpu.forward_batch).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numba
import numpy as np

from ..errors import NumbaAprError
from ..generate import _StopFilter
from ..sampling import Sampler, SamplingParams


class QueueFull(NumbaAprError):
    """Every slot is busy and the waiting line is full: come back later (HTTP 503)."""


@dataclass
class Request:
    """One completion. `sink(event)` receives, from the scheduler's thread, dicts:
    {"text": str, "token": int, "logprob": float, "top": [(id, logprob), ...]} per token (text may
    be "" while a UTF-8 character or a possible stop string is held back), then one
    {"done": True, "finish_reason": "stop" | "length", "usage": {...}, "timings": {...}}."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    sink: Callable[[dict], None]
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = -1               # -1: no log-probabilities; n >= 0: the token's and n more
    frequency_penalty: float = 0.0       # OpenAI's: minus count * f and (count > 0) * p, over the
    presence_penalty: float = 0.0        # last `repeat_last_n` tokens of the sequence
    ignore_eos: bool = False             # generate max_tokens even past an end-of-generation token
    cancelled: threading.Event = field(default_factory=threading.Event)
    # -- the scheduler's --
    slot: int = -1
    n_past: int = 0                      # positions of the slot that hold this sequence
    todo: list[int] = field(default_factory=list)  # prompt tokens not evaluated yet
    last: int = -1                       # last sampled token, next to evaluate
    n_gen: int = 0
    t_submit: float = 0.0
    t_start: float = 0.0
    t_first: float = 0.0

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def greedy(self) -> bool:
        """Whether its next token is the logits' argmax and nothing else is read of them (the
        back-end may then hand over the id alone: see Scheduler._step)."""
        p = self.params
        return (p.temperature <= 0 and (p.repeat_penalty == 1 or p.repeat_last_n == 0)
                and not self.frequency_penalty and not self.presence_penalty and self.top_logprobs < 0)


class Scheduler:
    """Runs requests on `model` (loaded with n_seq slots) in batches, on a thread of its own."""

    def __init__(self, model, n_batch: int | None = None, max_waiting: int | None = None):
        self.model = model
        self.n_slots, self.n_ctx = model.n_seq, model.n_ctx
        self.n_batch = min(n_batch or model.n_batch, model.n_batch)
        self.max_waiting = 4 * self.n_slots if max_waiting is None else max_waiting
        self.tok = model.tokenizer
        self.history = np.zeros((self.n_slots, self.n_ctx), np.int32)  # tokens each slot's cache holds
        self.n_cached = [0] * self.n_slots
        self.used = [0.0] * self.n_slots
        self.running: list[Request | None] = [None] * self.n_slots
        self.waiting: deque[Request] = deque()
        self.samplers: dict[int, Sampler] = {}
        self.decoders: dict[int, object] = {}
        self.stoppers: dict[int, _StopFilter] = {}
        self.batch = np.zeros((3, self.n_batch), np.int64)  # a step's slots, positions, rows asked for
        self.batch_tokens = np.zeros(self.n_batch, np.int32)
        self.batch_greedy = np.zeros(self.n_batch, np.bool_)   # rows asked for whose argmax will do
        self.batch_ids = np.zeros(self.n_batch, np.int32)      # ... and those argmaxes
        self.cv = threading.Condition()
        self.stats = dict(requests=0, prompt_tokens=0, prompt_tokens_reused=0, generated_tokens=0, steps=0,
                          busy_seconds=0.0)
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="numba_apr-scheduler", daemon=True)
        self.thread.start()

    # -- from other threads --------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if not req.prompt_ids:
            raise NumbaAprError("the prompt is empty")
        if len(req.prompt_ids) >= self.n_ctx:
            raise NumbaAprError(f"prompt of {len(req.prompt_ids)} tokens is longer than the context "
                                f"({self.n_ctx} tokens per slot)")
        req.params.validate()
        req.t_submit = time.perf_counter()
        with self.cv:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"all {self.n_slots} slots are busy and {len(self.waiting)} requests wait")
            self.waiting.append(req)
            self.cv.notify()

    def busy(self) -> int:
        return sum(r is not None for r in self.running)

    def queued(self) -> int:
        return len(self.waiting)

    def close(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()
        self.thread.join(timeout=10)

    # -- the scheduler's thread ----------------------------------------------------------------
    def _loop(self) -> None:
        numba.set_num_threads(getattr(self.model, "threads", numba.get_num_threads()))  # per thread: -t
        while True:
            with self.cv:
                while not self._stop and not self.waiting and not any(self.running):
                    self.cv.wait()
                if self._stop:
                    for r in [r for r in self.running if r] + list(self.waiting):
                        self._finish(r, "stop")
                    return
                self._admit()
            t = time.perf_counter()
            try:
                self._step()
            except Exception as e:  # a bug must not leave clients waiting forever
                for r in [r for r in self.running if r]:
                    r.sink({"error": f"internal error: {type(e).__name__}: {e}"})
                    self._release(r)
            self.stats["busy_seconds"] += time.perf_counter() - t

    def _admit(self) -> None:
        while self.waiting:
            free = [i for i in range(self.n_slots) if self.running[i] is None]
            if not free:
                return
            req = self.waiting.popleft()
            if req.cancelled.is_set():
                self._finish(req, "stop")
                continue
            ids = np.asarray(req.prompt_ids, np.int32)

            def shared(i):  # cached tokens of slot i that start this prompt (one is always re-read)
                n = min(self.n_cached[i], len(ids) - 1)
                same = self.history[i, :n] == ids[:n]
                return n if same.all() else int(np.argmin(same))
            best = max(free, key=lambda i: (shared(i), -self.used[i]))
            if shared(best) == 0:
                best = min(free, key=lambda i: self.used[i])
            keep = shared(best)
            req.slot, req.n_past, req.todo = best, keep, list(req.prompt_ids[keep:])
            req.t_start = time.perf_counter()
            self.n_cached[best] = keep
            self.running[best] = req
            self.samplers[best] = Sampler(self.model.config.n_vocab, req.params)
            self.decoders[best] = self.tok.decoder()
            self.stoppers[best] = _StopFilter(req.stop)
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += len(req.prompt_ids)
            self.stats["prompt_tokens_reused"] += keep

    def _step(self) -> None:
        tokens, slots, pos, rows, owners = [], [], [], [], []
        for r in self.running:
            if r is None:
                continue
            if r.cancelled.is_set():
                self._finish(r, "stop")
            elif not r.todo:  # generating: its last token
                rows.append(len(tokens))
                owners.append(r)
                tokens.append(r.last)
                slots.append(r.slot)
                pos.append(r.n_past)
        budget = self.n_batch - len(tokens)
        for r in self.running:
            if r is None or not r.todo or budget <= 0:
                continue
            chunk = r.todo[:budget]
            tokens += chunk
            slots += [r.slot] * len(chunk)
            pos += range(r.n_past, r.n_past + len(chunk))
            budget -= len(chunk)
            if len(chunk) == len(r.todo):
                rows.append(len(tokens) - 1)
                owners.append(r)
        if not tokens:
            return
        T, R = len(tokens), len(rows)
        b = self.batch  # filled in place: no arrays allocated per step
        self.batch_tokens[:T] = tokens
        b[0, :T], b[1, :T], b[2, :R] = slots, pos, rows
        greedy, ids = self.batch_greedy[:R], self.batch_ids[:R]
        greedy[:] = [r.greedy for r in owners]
        logits = self.model._eval_batch(self.batch_tokens[:T], b[0, :T], b[1, :T], b[2, :R], greedy, ids)
        self.stats["steps"] += 1
        # Record what each slot now holds, then sample for the rows asked for.
        i = 0
        while i < len(tokens):
            r = self.running[slots[i]]
            j = i
            while j < len(tokens) and slots[j] == slots[i]:
                j += 1
            self.history[r.slot, pos[i]:pos[i] + j - i] = tokens[i:j]
            r.n_past = pos[i] + j - i
            self.n_cached[r.slot] = r.n_past
            if r.todo:
                del r.todo[:j - i]
            i = j
        for k, r in enumerate(owners):
            self._sample(r, logits[k], int(ids[k]) if greedy[k] else -1)

    def _sample(self, r: Request, row: np.ndarray, token: int = -1) -> None:
        """The request's next token: `token` where the back-end gave its argmax (a greedy
        request's), else drawn from its logits `row` with its sampler."""
        if token >= 0:
            self._emit(r, token, {})
            return
        recent = self.history[r.slot, :r.n_past]
        if r.frequency_penalty or r.presence_penalty:
            last = recent[-r.params.repeat_last_n:] if r.params.repeat_last_n > 0 else recent
            ids, counts = np.unique(last, return_counts=True)
            row[ids] -= (counts * r.frequency_penalty + r.presence_penalty).astype(np.float32)
        event = {}
        if r.top_logprobs >= 0:
            lp = row.astype(np.float64)
            lp -= lp.max()
            lp -= np.log(np.exp(lp).sum())
        token = self.samplers[r.slot].sample(row, recent)
        if r.top_logprobs >= 0:
            top = np.argsort(-lp)[:r.top_logprobs] if r.top_logprobs else []
            event.update(logprob=float(lp[token]), top=[(int(t), float(lp[t])) for t in top])
        self._emit(r, token, event)

    def _emit(self, r: Request, token: int, event: dict) -> None:
        if not r.t_first:
            r.t_first = time.perf_counter()
        if token in self.tok.eog_ids and not r.ignore_eos:
            return self._finish(r, "stop")
        r.n_gen += 1
        self.stats["generated_tokens"] += 1
        text, hit = self.stoppers[r.slot].push(self.decoders[r.slot].add(token))
        r.sink({"text": text, "token": int(token), **event})
        r.last = int(token)
        if hit:
            return self._finish(r, "stop", flush=False)
        if r.n_gen >= r.max_tokens or r.n_past >= self.n_ctx:
            return self._finish(r, "length")

    def _finish(self, r: Request, reason: str, flush: bool = True) -> None:
        if r.slot >= 0 and flush and not r.cancelled.is_set():
            text, hit = self.stoppers[r.slot].push(self.decoders[r.slot].flush())
            rest = "" if hit else self.stoppers[r.slot].flush()
            if text + rest:
                r.sink({"text": text + rest})
        now = time.perf_counter()
        first = r.t_first or now
        r.sink({"done": True, "finish_reason": reason,
                "usage": {"prompt_tokens": len(r.prompt_ids), "completion_tokens": r.n_gen,
                          "total_tokens": len(r.prompt_ids) + r.n_gen},
                "timings": {"queued": (r.t_start or now) - r.t_submit, "prompt": first - (r.t_start or now),
                            "generate": now - first}})
        self._release(r)

    def _release(self, r: Request) -> None:
        if r.slot >= 0 and self.running[r.slot] is r:
            self.running[r.slot] = None
            self.used[r.slot] = time.perf_counter()
        r.slot = -1
