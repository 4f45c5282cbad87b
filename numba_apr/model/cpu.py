"""The transformer: `Weights` (views into the memory-mapped GGUF, or the repacked matrices of
model/packing.py), `RunState` (every buffer, allocated once) and `forward`, which reads top to bottom
like the paper.

`forward` evaluates a batch of tokens at consecutive positions of one sequence: the whole prompt
chunk at once (each weight byte read once for the chunk) or one token while decoding. It is the
one-sequence case of `forward_batch`, whose tokens may belong to several sequences (the server's
batches), each at its own KV slot and position. kernels/cpu/step.py runs the same steps for one
decoding token as a single compiled call. What differs between
architectures is read from the `Config` (arch/); the arithmetic is done by the backend's kernels
(kernels/cpu/), so another backend can run this same sequence of steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import get_num_threads

from . import quants
from .arch import Config, tables
from ..errors import NumbaAprError
from .gguf_file import GGUFFile, Tensor
from ..kernels.cpu import ops
from ..kernels.cpu.attention import attention_batch, scores_buffer, store_kv
from ..kernels.cpu.matmul import ActScratch, get_rows, matmul
from ..kernels.cpu.qmatmul import PackedMatrix, QScratch, qmatmul_unchecked
from ..sampling import _argmax


@dataclass
class LayerWeights:
    attn_norm: np.ndarray          # [n_embd] f32
    wq: Tensor                     # [n_head*head_dim rows, n_embd]
    wk: Tensor                     # [n_head_kv*head_dim, n_embd]
    wv: Tensor                     # [n_head_kv*head_dim_v, n_embd]
    wo: Tensor                     # [n_embd, n_head*head_dim_v]
    ffn_norm: np.ndarray           # [n_embd]
    w_gate: Tensor                 # [n_ff, n_embd]
    w_up: Tensor                   # [n_ff, n_embd]
    w_down: Tensor                 # [n_embd, n_ff]
    bq: np.ndarray | None = None   # [n_head*head_dim]        (qwen2)
    bk: np.ndarray | None = None   # [n_head_kv*head_dim]     (qwen2)
    bv: np.ndarray | None = None   # [n_head_kv*head_dim_v]   (qwen2)
    q_norm: np.ndarray | None = None          # [head_dim]    (gemma3)
    k_norm: np.ndarray | None = None          # [head_dim]    (gemma3)
    post_attn_norm: np.ndarray | None = None  # [n_embd]      (gemma3)
    post_ffn_norm: np.ndarray | None = None   # [n_embd]      (gemma3)


@dataclass
class Weights:
    token_embd: Tensor             # [n_vocab rows, n_embd]
    output_norm: np.ndarray        # [n_embd]
    output: Tensor                 # [n_vocab, n_embd]; token_embd itself when the embeddings are tied
    layers: list[LayerWeights]
    blob: np.ndarray | None = None  # the repacked matrices' one buffer (model/packing.py), when repacked


_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def _vector(t: Tensor, n: int, path: str) -> np.ndarray:
    """A norm weight or bias as a float32 vector: a view for F32, decoded once for F16 / BF16.
    A quantized type here is a damaged file (llama.cpp keeps these tensors in float)."""
    if t.qtype not in _FLOAT_TYPES:
        raise NumbaAprError(f"{path}: tensor {t.name}: type {t.type_name}, expected F32 for a norm or bias")
    if len(t.dims) != 1:
        raise NumbaAprError(f"{path}: tensor {t.name} has shape {list(t.dims)}, expected [{n}]")
    if t.qtype == GGMLQuantizationType.F32:
        v = t.raw.reshape(-1).view(np.float32)
    else:
        v = quants.dequantize(t.raw, t.qtype).reshape(-1)
    if v.shape[0] != n:
        raise NumbaAprError(f"tensor {t.name} has {v.shape[0]} values, expected {n}")
    return v


def _shapes(c: Config) -> dict:
    """GGUF dims (row length, rows) each layer tensor must have under this Config."""
    q, kv, vv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v
    return dict(attn_norm=c.n_embd, wq=(c.n_embd, q), wk=(c.n_embd, kv), wv=(c.n_embd, vv),
                wo=(c.n_head * c.head_dim_v, c.n_embd), ffn_norm=c.n_embd, w_gate=(c.n_embd, c.n_ff),
                w_up=(c.n_embd, c.n_ff), w_down=(c.n_ff, c.n_embd), bq=q, bk=kv, bv=vv,
                q_norm=c.head_dim, k_norm=c.head_dim, post_attn_norm=c.n_embd, post_ffn_norm=c.n_embd)


def _matrix(t: Tensor, dims, path: str) -> Tensor:
    quants.check_supported(t.qtype, t.name)
    if tuple(t.dims) != tuple(dims):
        raise NumbaAprError(f"{path}: tensor {t.name} has shape {list(t.dims)}, expected {list(dims)}")
    return t


def load_weights(g: GGUFFile, c: Config) -> Weights:
    """Look up, type-check and shape-check every tensor the Config needs (views, no copies)."""

    def tensor(name):
        if name not in g.tensors:
            raise NumbaAprError(f"{g.path}: tensor {name} is missing")
        return g.tensors[name]

    shapes = _shapes(c)
    layers = []
    for i in range(c.n_layer):
        kw = {}
        for field in c.layer_tensors:
            t = tensor(tables.LAYER_TENSORS[field].format(i=i))
            dims = shapes[field]
            kw[field] = _matrix(t, dims, g.path) if isinstance(dims, tuple) else _vector(t, dims, g.path)
        layers.append(LayerWeights(**kw))
    embd = _matrix(tensor(tables.TOKEN_EMBD), (c.n_embd, c.n_vocab), g.path)
    output = g.tensors.get(tables.OUTPUT)
    output = embd if output is None else _matrix(output, (c.n_embd, c.n_vocab), g.path)
    return Weights(embd, _vector(tensor(tables.OUTPUT_NORM), c.n_embd, g.path), output, layers)


class RunState:
    """Every activation buffer and the KV cache, allocated once for `n_seq` sequences of up to
    `n_ctx` positions each and batches of up to `n_batch` tokens. Views of the first T rows are
    what a step uses."""

    def __init__(self, c: Config, n_ctx: int, n_batch: int, n_seq: int = 1):
        B, f32 = n_batch, np.float32
        self.n_ctx, self.n_batch, self.n_seq = n_ctx, n_batch, n_seq
        self.x = np.zeros((B, c.n_embd), f32)                       # residual stream
        self.xb = np.zeros((B, c.n_embd), f32)                      # normed input of a projection
        self.q = np.zeros((B, c.n_head * c.head_dim), f32)          # queries
        self.k = np.zeros((B, c.n_head_kv * c.head_dim), f32)       # keys, before they go to the cache
        self.v = np.zeros((B, c.n_head_kv * c.head_dim_v), f32)     # values, likewise
        self.att = np.zeros((B, c.n_head * c.head_dim_v), f32)      # attention output (heads concatenated)
        self.proj = np.zeros((B, c.n_embd), f32)                    # output of wo / w_down
        self.gate = np.zeros((B, c.n_ff), f32)                      # ffn gate, then act(gate) * up
        self.up = np.zeros((B, c.n_ff), f32)                        # ffn up
        self.pos = np.zeros(B, np.int64)                            # positions of the batch's tokens
        self.slot = np.zeros(B, np.int64)                           # their sequences (KV cache slots)
        self.steps = np.arange(B, dtype=np.int64)                   # 0 .. B-1, to offset by pos0
        self.token = np.zeros(1, np.int32)                          # the one token of a decode step
        self.logits = np.zeros((max(1, n_seq), c.n_vocab), f32)     # next-token logits, a row per sequence
        # Activations quantized as llama.cpp does before each quantized product: [B, widest input],
        # as int8 for the repacked matrices, dequantized for the others.
        widest = max(c.n_embd, c.n_ff, c.n_head * c.head_dim_v)
        self.qact = QScratch(B, widest)
        self.act = ActScratch(B, widest)
        # KV cache: [sequence, layer, position, kv_head * dim]; float32 arrays holding values
        # rounded to f16 (Numba has no CPU float16 arithmetic), as llama.cpp's f16 cache.
        self.k_cache = np.zeros((n_seq, c.n_layer, n_ctx, c.n_head_kv * c.head_dim), f32)
        self.v_cache = np.zeros((n_seq, c.n_layer, n_ctx, c.n_head_kv * c.head_dim_v), f32)
        self.scores = scores_buffer(n_ctx, numba.config.NUMBA_NUM_THREADS)  # [thread, position] attention scores


def forward(c: Config, w: Weights, s: RunState, tokens: np.ndarray, pos0: int,
            all_logits: np.ndarray | None = None) -> np.ndarray:
    """Run `tokens` (at positions pos0 .. pos0+T-1 of sequence 0) through the model, filling the
    KV cache. Returns the logits after the last token ([1, n_vocab], a RunState buffer), or, when
    `all_logits` ([T, n_vocab]) is given, fills it with the logits after every token.
    The caller guarantees 1 <= T <= n_batch, pos0 + T <= n_ctx and valid token ids."""
    T = len(tokens)
    slots, pos = s.slot[:T], s.pos[:T]
    slots[:] = 0
    np.add(s.steps[:T], pos0, out=pos)
    if all_logits is None:
        return forward_batch(c, w, s, tokens, slots, pos, s.steps[T - 1:T], s.logits[:1])
    return forward_batch(c, w, s, tokens, slots, pos, s.steps[:T], all_logits)


def forward_batch(c: Config, w: Weights, s: RunState, tokens: np.ndarray, slots: np.ndarray,
                  pos: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The batch `tokens`, token t at position pos[t] of the sequence in KV slot slots[t] (the
    tokens of one sequence in order, its cache holding every earlier position), through the model.
    out[i] gets the logits after token rows[i]; returns out.

    A sequence's tokens attend to its own cache only, and every row is computed as if alone
    (products are exact integer sums per token), so batching changes no logit."""
    T = len(tokens)
    x, xb, q, k, v, att, proj, gate, up = (b[:T] for b in (s.x, s.xb, s.q, s.k, s.v, s.att, s.proj, s.gate, s.up))
    gelu = c.act == "gelu"

    n_threads = get_num_threads()

    def linear(outs, inp, ts):  # outs[i] = inp @ W_i.T for the matrices ts of one input
        if all(isinstance(t, PackedMatrix) and t.scheme == ts[0].scheme for t in ts):
            qmatmul_unchecked(outs, inp, ts, s.qact, n_threads)  # one pass: Q/K/V or gate/up fused
        else:
            for o, t in zip(outs, ts):
                if isinstance(t, PackedMatrix):
                    qmatmul_unchecked((o,), inp, (t,), s.qact, n_threads)
                else:
                    matmul(o, inp, t.raw, t.qtype, s.act)

    get_rows(x, w.token_embd.raw, w.token_embd.qtype, tokens)
    if c.embd_scale != 1.0:
        ops.scale(x, c.embd_scale)

    for l, (L, plan) in enumerate(zip(w.layers, c.layers)):
        # Attention block.
        ops.rmsnorm(xb, x, L.attn_norm, c.norm_eps)
        linear((q, k, v), xb, (L.wq, L.wk, L.wv))
        if L.bq is not None:
            ops.add_bias(q, L.bq)
            ops.add_bias(k, L.bk)
            ops.add_bias(v, L.bv)
        if L.q_norm is not None:
            qh, kh = q.reshape(-1, c.head_dim), k.reshape(-1, c.head_dim)
            ops.rmsnorm(qh, qh, L.q_norm, c.norm_eps)
            ops.rmsnorm(kh, kh, L.k_norm, c.norm_eps)
        ops.rope(q, pos, c.n_head, c.head_dim, c.rope_dim, plan.rope_base, c.rope_neox)
        ops.rope(k, pos, c.n_head_kv, c.head_dim, c.rope_dim, plan.rope_base, c.rope_neox)
        ops.round_f16(k)  # the KV cache holds f16 values, as llama.cpp's does
        ops.round_f16(v)
        store_kv(s.k_cache, s.v_cache, l, k, v, slots, pos)
        attention_batch(att, q, s.k_cache, s.v_cache, l, slots, pos, c.n_head, c.n_head_kv,
                        c.head_dim, c.head_dim_v, c.attn_scale, plan.window, s.scores)
        linear((proj,), att, (L.wo,))
        if L.post_attn_norm is not None:
            ops.rmsnorm(proj, proj, L.post_attn_norm, c.norm_eps)
        ops.add(x, proj)

        # Feed-forward block.
        ops.rmsnorm(xb, x, L.ffn_norm, c.norm_eps)
        linear((gate, up), xb, (L.w_gate, L.w_up))
        ops.gated_act(gate, up, gelu)
        linear((proj,), gate, (L.w_down,))
        if L.post_ffn_norm is not None:
            ops.rmsnorm(proj, proj, L.post_ffn_norm, c.norm_eps)
        ops.add(x, proj)

    # Output head: only the rows whose logits are wanted.
    R = len(rows)
    xr = s.proj[:R]
    ops.take_rows(xr, x, rows)
    ops.rmsnorm(xb[:R], xr, w.output_norm, c.norm_eps)
    linear((out,), xb[:R], (w.output,))
    return out


class CpuRunner:
    """The CPU backend behind the engine's one interface (CudaRunner is the GPU's): `evaluate`
    a batch of one sequence, `eval_batch` of several, and `stepper`, the generation loop's
    decode step with sampling. Owns the RunState and, where the model allows, the one-call
    decode step (kernels/cpu/step.py)."""

    def __init__(self, c: Config, w: Weights, n_ctx: int, n_batch: int, n_seq: int = 1, fused_step: bool = True):
        from ..kernels.cpu.step import DecodeStep
        self.c, self.w = c, w
        self.state = RunState(c, n_ctx, n_batch, n_seq)
        self.n_batch = n_batch
        # Decoding: one compiled call per token where the model allows (None: `forward` serves).
        self.step = DecodeStep.build(c, w, self.state, w.blob, get_num_threads()) if fused_step else None

    def evaluate(self, ids: np.ndarray, pos0: int, all_logits: np.ndarray | None = None,
                 host: bool = True) -> np.ndarray:
        """ids (<= n_batch) of sequence 0 at positions pos0..; returns the last logits
        [1, n_vocab], or with all_logits every row's, written there. (`host`: the GPU's.)"""
        if self.step is not None and len(ids) == 1 and all_logits is None:
            out = self.step(int(ids[0]), pos0)
            if out is not None:
                return out
        return forward(self.c, self.w, self.state, ids, pos0, all_logits)

    def eval_batch(self, tokens: np.ndarray, slots: np.ndarray, positions: np.ndarray,
                   rows: np.ndarray, argmax: np.ndarray | None = None, ids: np.ndarray | None = None) -> np.ndarray:
        """Token t at position positions[t] of the sequence in KV slot slots[t]; returns the
        logits after the tokens `rows` ([len(rows), n_vocab], a buffer the next call overwrites),
        and where argmax[k], row k's argmax in ids[k] (sampling's greedy choice)."""
        T = len(tokens)
        out = None
        if T == 1 and self.step is not None:
            out = self.step(int(tokens[0]), int(positions[0]), int(slots[0]))
        if out is None:
            s = self.state
            s.slot[:T], s.pos[:T] = slots, positions
            out = forward_batch(self.c, self.w, s, np.asarray(tokens, np.int32), s.slot[:T], s.pos[:T],
                                np.asarray(rows, np.int64), s.logits[:len(rows)])
        if argmax is not None:
            for k in np.flatnonzero(argmax):
                ids[k] = _argmax(out[k])
        return out

    def stepper(self, model, params):
        """Logits on the host, sampled by the CPU Sampler."""
        from ..generate import HostStepper
        return HostStepper(model, params)
