"""The Python API other tools call: `load()` -> `Model`, and `load_tokenizer()`.

A Model owns the parsed GGUF (memory-mapped), its Config, Weights, Tokenizer and its backend's
runner (model.cpu.CpuRunner or model.cuda.CudaRunner: one interface, so nothing here asks which).
It remembers which tokens its KV cache holds, so a new prompt that extends the previous one
(a chat turn) evaluates only the new tokens.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterator

import numba
import numpy as np

from . import packaged
from .model.arch import build_config
from .text.chat import render_chat
from .errors import NumbaAprError
from .generate import GenerationStats, generate
from .model.gguf_file import GGUFFile
from .model.cpu import load_weights
from .model.packing import pack_weights
from .sampling import Sampler, SamplingParams
from .text.tokenizer import Tokenizer

DEVICES = ("cpu", "cuda")
N_BATCH = 512  # prompt tokens evaluated per forward pass (llama.cpp's default micro-batch)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        limit = numba.config.NUMBA_NUM_THREADS
        if not 1 <= threads <= limit:
            raise NumbaAprError(f"threads must be between 1 and {limit}, got {threads}")
        numba.set_num_threads(threads)


class Model:
    """A loaded model. Use `numba_apr.load()` to make one."""

    def __init__(self, path, n_ctx: int = 4096, threads: int | None = None,
                 progress: Callable[[float, str], None] | None = None, device: str = "cpu", n_seq: int = 1):
        progress = progress or (lambda frac, what: None)
        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise NumbaAprError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        if not isinstance(n_seq, int) or not 1 <= n_seq <= 256:
            raise NumbaAprError(f"n_seq must be an integer from 1 to 256, got {n_seq!r}")
        self.n_seq = n_seq
        set_threads(threads)
        # Numba's thread count is per calling thread: a thread that evaluates for this model
        # (the server's scheduler) sets it to this (the decode step is built for it).
        self.threads = numba.get_num_threads()
        t0 = time.perf_counter()
        progress(0.0, "reading GGUF")
        self.path = str(path)
        self.gguf = GGUFFile(path)
        self.config = build_config(self.gguf)
        progress(0.2, "reading vocabulary")
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        progress(0.4, "checking tensors")
        self.weights = load_weights(self.gguf, self.config)
        self.device = device
        self.n_ctx = min(n_ctx, self.config.n_ctx_train)
        self.n_batch = n_batch = min(N_BATCH, self.n_ctx)
        self.runner = _RUNNERS[device](self, n_batch, n_seq, progress)
        self.tokens = np.zeros(self.n_ctx, np.int32)  # what the KV cache holds, positions 0..n_past-1
        self._one = np.zeros(1, np.int32)             # a decoded token's id (no array per token)
        self.n_past = 0
        progress(0.5, "compiling kernels")
        # Compile (or load from Numba's cache) every kernel now, not at the first token.
        logits = self._decode(self.tokenizer.bos_id or 0, pos=0)
        Sampler(self.config.n_vocab, SamplingParams(seed=0)).sample(logits[0], self.tokens[:1])
        self.n_past = 0
        self.load_seconds = time.perf_counter() - t0
        progress(1.0, "ready")

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.detokenize(ids)

    # -- evaluation ----------------------------------------------------------------------------
    def _check_ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1 or len(arr) == 0:
            raise NumbaAprError("expected a non-empty list of token ids")
        if arr.min() < 0 or arr.max() >= self.config.n_vocab:
            bad = int(arr[(arr < 0) | (arr >= self.config.n_vocab)][0])
            raise NumbaAprError(f"token id {bad} is out of range (vocabulary of {self.config.n_vocab})")
        if len(arr) > self.n_ctx:
            raise NumbaAprError(f"prompt of {len(arr)} tokens is longer than the context "
                                f"({self.n_ctx} tokens; raise n_ctx / -c)")
        return arr.astype(np.int32)

    def _eval(self, ids: np.ndarray, pos0: int, all_logits: np.ndarray | None = None,
              host: bool = True) -> np.ndarray | None:
        """Evaluate ids at positions pos0.. in batches; the KV cache then holds them. Returns the
        last logits [1, n_vocab] (on the GPU with host=False they stay in the device state)."""
        out, n_batch = None, self.n_batch
        for i in range(0, len(ids), n_batch):
            chunk = ids[i:i + n_batch]
            rows = None if all_logits is None else all_logits[i:i + len(chunk)]
            out = self.runner.evaluate(chunk, pos0 + i, rows, host=host and i + n_batch >= len(ids))
        self.tokens[pos0:pos0 + len(ids)] = ids
        self.n_past = pos0 + len(ids)
        return out

    def _prefill(self, ids, host: bool = True) -> np.ndarray | None:
        """Evaluate a prompt, reusing the cached prefix it shares with what was evaluated before;
        returns the next-token logits [1, n_vocab]."""
        ids = self._check_ids(ids)
        same = self.tokens[:min(self.n_past, len(ids))] == ids[:self.n_past]
        keep = int(np.argmin(same)) if not same.all() else len(same)
        keep = min(keep, len(ids) - 1)  # at least one token must be evaluated to get logits
        return self._eval(ids[keep:], keep, host=host)

    def _stepper(self, params: SamplingParams):
        """What the generation loop drives: prefill + sample, then decode + sample per token."""
        return self.runner.stepper(self, params)

    def _decode(self, token: int, pos: int | None = None) -> np.ndarray:
        pos = self.n_past if pos is None else pos
        self._one[0] = token
        return self._eval(self._one, pos)

    def _eval_batch(self, tokens: np.ndarray, slots: np.ndarray, positions: np.ndarray,
                    rows: np.ndarray, argmax: np.ndarray | None = None, ids: np.ndarray | None = None) -> np.ndarray:
        """One forward pass over tokens of several sequences: token t at position positions[t]
        of the sequence in KV slot slots[t]. Returns the logits after the tokens `rows`
        ([len(rows), n_vocab], a buffer the next call overwrites); where argmax[k], row k's
        argmax goes to ids[k] instead (its logits row may be left unfilled). The caller (the
        server's scheduler) keeps each slot's tokens in order and within n_ctx."""
        return self.runner.eval_batch(tokens, slots, positions, rows, argmax, ids)

    def _history(self) -> np.ndarray:
        return self.tokens[:self.n_past]

    def logits(self, ids, last: int | None = None) -> np.ndarray:
        """Logits after every position of a fresh sequence: float32 [len(ids), n_vocab]
        (llama.cpp's logits_all). With `last=n`, only the last n rows are computed and returned."""
        ids = self._check_ids(ids)
        n = len(ids) if last is None else max(1, min(int(last), len(ids)))
        out = np.empty((n, self.config.n_vocab), np.float32)
        if n < len(ids):
            self._eval(ids[:len(ids) - n], 0)
        self._eval(ids[len(ids) - n:], len(ids) - n, out)
        return out

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompt, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: int | None = None, stop=(), stats: GenerationStats | None = None,
                 add_bos: bool = True) -> Iterator[str]:
        """Stream the continuation of `prompt` (text, or a list of token ids) as text pieces.
        Greedy at temperature 0."""
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, add_bos=add_bos, special=True)
        else:
            ids = list(prompt)
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise NumbaAprError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
        if isinstance(stop, str):
            stop = [stop]
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        params.validate()  # here, not inside the generator, so errors come before any output
        self._check_ids(ids)
        return generate(self, ids, max_tokens, params, stop, stats)

    def chat_prompt(self, messages, add_generation_prompt: bool = True) -> str:
        tok = self.tokenizer
        return render_chat(messages, tok.chat_template, bos_token=self._text_of(tok.bos_id),
                           eos_token=self._text_of(tok.eos_id), add_generation_prompt=add_generation_prompt)

    def _text_of(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokenizer.token_bytes(token_id).decode("utf-8", "replace")

    def chat(self, messages, **kw) -> Iterator[str]:
        """`generate` on the conversation rendered by the model's chat template. Templates that
        write BOS themselves (gemma's) get no second one."""
        text = self.chat_prompt(messages)
        bos = self._text_of(self.tokenizer.bos_id)
        return self.generate(text, add_bos=not (bos and text.startswith(bos)), **kw)


def _cpu_runner(m: Model, n_batch: int, n_seq: int, progress):
    from .model.cpu import CpuRunner
    progress(0.45, "repacking weights")
    if not os.environ.get("NUMBA_APR_NOPACK"):  # =1: every product on the plain float path (to compare)
        pack_weights(m.gguf, m.weights)
    # NUMBA_APR_NOSTEP=1: decode through `forward` too, not the one-call step (to compare)
    return CpuRunner(m.config, m.weights, m.n_ctx, n_batch, n_seq, fused_step=not os.environ.get("NUMBA_APR_NOSTEP"))


def _cuda_runner(m: Model, n_batch: int, n_seq: int, progress):
    from .model.cuda import CudaRunner  # numba.cuda is imported only for the GPU
    progress(0.45, "uploading weights")
    return CudaRunner(m.config, m.weights, m.n_ctx, n_batch, n_seq)


# device -> how its runner is made; a new backend is a module with a runner and a line here.
_RUNNERS = {"cpu": _cpu_runner, "cuda": _cuda_runner}
assert tuple(_RUNNERS) == DEVICES


def load(model: str | os.PathLike | None = None, device: str = "cpu", n_ctx: int = 4096,
         threads: int | None = None, progress=None, n_seq: int = 1) -> Model:
    """Load a GGUF file, or a packaged model by name (None: the default, gemma-3-270m).
    n_seq > 1 gives the KV cache a slot of n_ctx positions per sequence, for the server's
    batches of several sequences (numba_apr.server)."""
    if device not in DEVICES:
        raise NumbaAprError(f"device '{device}' is not supported (available: {', '.join(DEVICES)})")
    return Model(packaged.resolve(model), n_ctx=n_ctx, threads=threads, progress=progress, device=device,
                 n_seq=n_seq)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of any GGUF file, vocab-only files included."""
    return Tokenizer.from_gguf(GGUFFile(packaged.resolve(path)))
