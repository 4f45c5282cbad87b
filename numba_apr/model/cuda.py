"""The transformer on an NVIDIA GPU: `DeviceWeights` (uploaded once), `DeviceState` (every buffer
and the KV cache, allocated once), `forward` (the same steps as model/cpu.py's, through the fused
kernels of kernels/cuda/) and `CudaRunner`, which runs prompts eagerly and replays each decode
step from one CUDA graph.

A decode step is 5 launches a layer; launched from Python each costs ~20 us, which alone
would cap a 24-layer model near 200 tok/s. So the step (embedding of the last sampled token,
every layer, the output head, the sampler and the position increment) is captured once into a
CUDA graph and replayed: the token id and the position live in device memory, and the only
host traffic per token is the 4-byte token id coming back. One graph holds DECODE_STEPS steps,
each taking the token the one before sampled, and their ids come back together (see
CudaRunner.decode_sample).

Under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1, for CI) there are no graphs: the same step
runs eagerly.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
from numba import cuda

from .arch import Config
from .._numba import cuda_jit
from ..errors import NumbaAprError
from ..kernels.cuda import ptx
from ..kernels.cuda.attention import SHORT_CTX, attention, attention_workspace
from ..kernels.cuda.launch import view_once
from ..kernels.cuda.qmatmul_decode import _env_int
from ..kernels.cuda.ops import (MODE_GELU, MODE_NORM, MODE_SILU, ActBuffers, embed, quantize_act,
                               rmsnorm_add, rope_kv, rope_table, rows_argmax)
from ..kernels.cuda.qmatmul import (FLOAT_TYPES, QIN_MAX_K, QIN_QKV_MAX_K, SUPPORTED, DeviceMatrix, concat,
                                   gated_takes, qmatmul, qmatmul_gated, qmatmul_quant, qmatmul_rope, upload)
from .cpu import Weights
from ..sampling import _argmax

# Decode steps a graph replays: between two graphs the GPU idles a few microseconds (the graph's
# launch, the copy of the ids to the host), steps in one graph run back to back (1 -> 8 steps:
# +1.5% tok/s, docs/experiments.md#steps-a-graph). A caller that stops (end of text) has had up to
# DECODE_STEPS - 1 steps computed for nothing: ~4 ms on a 0.5B, ~25 ms on a 7B.
DECODE_STEPS = 8

# Whether a batched step of greedy decoding only queues the step after it (CudaRunner._queue_next).
# Off until measured on a GPU (docs/experiments.md#a-batched-step-queued-ahead); NUMBA_APR_BATCH_AHEAD=1
# turns it on.
BATCH_AHEAD = bool(_env_int("NUMBA_APR_BATCH_AHEAD", 0))


@dataclass
class DeviceLayer:
    attn_norm: object                       # f32 [n_embd]
    qkv: list[tuple[DeviceMatrix, int]]     # (matrix, first output column): one fused matrix when Q/K/V share a type
    bqkv: object                            # f32 [q + k + v] or None
    wo: DeviceMatrix
    ffn_norm: object
    gate_up: list[tuple[DeviceMatrix, int]]  # [gate; up] rows: one matrix when they share a type
    w_down: DeviceMatrix
    q_norm: object = None
    k_norm: object = None
    post_attn_norm: object = None
    post_ffn_norm: object = None


@dataclass
class DeviceWeights:
    token_embd: DeviceMatrix
    output_norm: object
    output: DeviceMatrix   # token_embd itself when tied
    layers: list[DeviceLayer]

    def matrices(self) -> list[DeviceMatrix]:
        mats = {id(m): m for L in self.layers for m, _ in L.qkv + L.gate_up}
        mats.update({id(L.wo): L.wo for L in self.layers})
        mats.update({id(L.w_down): L.w_down for L in self.layers})
        mats[id(self.output)] = self.output
        return list(mats.values())

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.matrices())

    @property
    def fusable(self) -> bool:
        """Whether decode products may quantize each other's inputs: the epilogues write q8
        only, so every product must read q8 (no float matrices), and the rows of wo / w_down
        (n_embd) and of gate (n_ff) come in whole 32-value blocks."""
        mats = self.matrices()
        return (all(m.qtype not in FLOAT_TYPES for m in mats) and self.layers[0].wo.rows % 32 == 0
                and all(m.rows % 64 == 0 for L in self.layers for m, _ in L.gate_up))


def _fused(tensors, K) -> list[tuple[DeviceMatrix, int]]:
    """Upload matrices that share one input: neighbours of one type row-concatenated into one
    (Q/K/V: one matrix, or [q | k] and v where v has a type of its own, as in Q4_K_M files)."""
    for t in tensors:
        if t.qtype not in SUPPORTED:
            raise NumbaAprError(f"tensor {t.name} of type {t.type_name} has no CUDA kernel")
    runs = []
    for t in tensors:
        if runs and runs[-1][-1].qtype == t.qtype:
            runs[-1].append(t)
        else:
            runs.append([t])
    out, col = [], 0
    for run in runs:
        out.append((upload(concat([t.raw for t in run]), run[0].qtype, K), col))
        col += sum(t.raw.shape[0] for t in run)
    return out


def _vec(v):
    return None if v is None else cuda.to_device(np.ascontiguousarray(v, np.float32))


def upload_weights(c: Config, w: Weights) -> DeviceWeights:
    layers = []
    for L in w.layers:
        bqkv = None if L.bq is None else np.concatenate([L.bq, L.bk, L.bv])
        layers.append(DeviceLayer(
            _vec(L.attn_norm), _fused([L.wq, L.wk, L.wv], c.n_embd), _vec(bqkv),
            _fused([L.wo], c.n_head * c.head_dim_v)[0][0], _vec(L.ffn_norm),
            _fused([L.w_gate, L.w_up], c.n_embd), _fused([L.w_down], c.n_ff)[0][0],
            _vec(L.q_norm), _vec(L.k_norm), _vec(L.post_attn_norm), _vec(L.post_ffn_norm)))
    embd = _fused([w.token_embd], c.n_embd)[0][0]
    output = embd if w.output is w.token_embd else _fused([w.output], c.n_embd)[0][0]
    return DeviceWeights(embd, _vec(w.output_norm), output, layers)


class DeviceState:
    """Every buffer a step uses, for batches of up to n_batch tokens and n_ctx positions, and,
    with n_seq > 1, the KV slots and batch buffers of a decode step of up to n_seq sequences."""

    def __init__(self, c: Config, n_ctx: int, n_batch: int, n_seq: int = 1):
        B, f32 = n_batch, np.float32
        self.n_ctx, self.n_batch, self.n_seq = n_ctx, n_batch, n_seq
        nq, nk, nv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v
        self.x = cuda.device_array((B, c.n_embd), f32)             # residual stream
        self.qkv = cuda.device_array((B, nq + nk + nv), f32)       # [q | k | v] projections
        self.att = cuda.device_array((B, c.n_head * c.head_dim_v), f32)  # attention output
        self.proj = cuda.device_array((B, c.n_embd), f32)          # wo / w_down output before a post-norm
        self.ffn = cuda.device_array((B, 2 * c.n_ff), f32)         # [gate | up]
        widest = max(c.n_embd, c.n_ff, c.n_head * c.head_dim_v)
        self.act = ActBuffers.allocate(B, widest)                  # quantized input of a product
        self.act1 = ActBuffers.allocate(n_seq, widest)             # decoding: the other of two (see forward)
        self.ss = cuda.device_array(c.n_embd // 32, f32)           # decoding: sums of squares of x per 32
        self.logits = cuda.device_array((1, c.n_vocab), f32)       # next-token logits
        self.all_logits = None                                     # [n_batch, n_vocab], made when first asked
        self.tokens = cuda.device_array(B, np.int32)               # token ids of the batch (decode: [0])
        self.ring = cuda.device_array(DECODE_STEPS, np.int32)      # decoding: the ids one graph's steps sampled
        self.pos = cuda.device_array(1, np.int32)                  # position of the batch's first token
        # KV cache in f16, as llama.cpp's: [layer, slot * n_ctx + position, kv_head * dim]. With
        # several sequences, a slot of n_ctx rows each and one more that padded batch entries
        # write (a graph's batch size is fixed: see CudaRunner.eval_batch).
        self.n_slots = 1 if n_seq == 1 else n_seq + 1
        self.k_cache = cuda.device_array((c.n_layer, self.n_slots * n_ctx, nk), np.float16)
        self.v_cache = cuda.device_array((c.n_layer, self.n_slots * n_ctx, nv), np.float16)
        self.att_ws = attention_workspace(n_ctx, c.n_head, c.head_dim_v)  # split-K partials of decode attention
        # Views made once: numba.cuda builds a strided view row by row in Python (~0.7 ms for a
        # 512-row buffer, measured), which a prompt's forward would pay at every use.
        self.q = self.qkv[:, :nq]                                  # [B, nq] the queries
        self.gate, self.up = self.ffn[:, :c.n_ff], self.ffn[:, c.n_ff:]
        self.k_layer = [self.k_cache[l] for l in range(c.n_layer)]  # [n_slots * n_ctx, nk] each
        self.v_layer = [self.v_cache[l] for l in range(c.n_layer)]
        self.rope = {b: rope_table(n_ctx, c.rope_dim, b) for b in {p.rope_base for p in c.layers}}
        self.inputs = Inputs(self.tokens, self.pos, None, self.k_layer, self.v_layer, self.att_ws)
        self._slot_inputs = {}
        # A decode step of up to n_seq sequences: [token | position | first cache row of
        # its slot] a sequence, copied in at once; its logits, its attention partials.
        self.binp = cuda.device_array((3, n_seq), np.int32)
        btok, bpos, brow = self.binp[0], self.binp[1], self.binp[2]
        self.batch_inputs = Inputs(btok, bpos, brow, self.k_layer, self.v_layer,
                                   attention_workspace(n_ctx, c.n_head, c.head_dim_v, max_T=n_seq))
        self.blogits = cuda.device_array((n_seq, c.n_vocab), f32)
        self.bids = cuda.device_array(n_seq, np.int32)             # ... and their argmaxes
        self.blogits_first = [self.blogits[:n] for n in range(n_seq + 1)]   # views made once
        self.blogits_row = [self.blogits[i:i + 1] for i in range(n_seq)]

    def slot_inputs(self, slot: int, batch: bool = False) -> "Inputs":
        """Inputs of one sequence in KV slot `slot` (its n_ctx cache rows as the layers' caches):
        the token and position of s.tokens / s.pos, or (batch) of the decode-step buffers."""
        key = (slot, batch)
        if key not in self._slot_inputs:
            lo, hi = slot * self.n_ctx, (slot + 1) * self.n_ctx
            src = self.batch_inputs if batch else self.inputs
            self._slot_inputs[key] = Inputs(src.tokens, src.pos, None, [k[lo:hi] for k in self.k_layer],
                                            [v[lo:hi] for v in self.v_layer], self.att_ws)
        return self._slot_inputs[key]


@dataclass
class Inputs:
    """What a forward pass reads its batch from and writes its keys and values to: token ids,
    positions (pos[0] + t, or with `rows` pos[t]), `rows` (None for one sequence: else the
    first cache row of token t's sequence), the layers' K / V caches, the attention workspace."""
    tokens: object
    pos: object
    rows: object
    k_layer: list
    v_layer: list
    att_ws: object


def _project(out, mats, act, T, stream, bias=None):
    for m, col in mats:
        qmatmul(out, m, act, T, stream, bias=bias, col=col)


def forward(c: Config, w: DeviceWeights, s: DeviceState, T: int, stream, all_logits: bool = False,
            short: bool = False, inp: Inputs | None = None):
    """Run s.tokens[:T] at positions s.pos[0] .. + T-1 through the model (device-side inputs),
    filling the KV cache; the logits of the last token go to s.logits, or of every token to
    s.all_logits[:T]. Launches only: nothing is allocated on the device, nothing synchronised.
    `short`: no position reaches attention.SHORT_CTX (a decode plan for short contexts).
    `inp`: read the batch from elsewhere (s.inputs by default): one sequence's slot, or a
    decode step of T sequences (inp.rows), whose logits go to s.blogits[:T].

    `a` is the next product's quantized input. Prompts quantize it in a launch of its own
    (quantize_act); a decode step gets it from the kernel that made the values (attention, a
    product's epilogue: see q8.py; a step of several sequences from attention, and from the
    gated product where the few-token kernels take it), alternating between two buffers (qa,
    qb) so that no kernel overwrites the input it reads; one sequence's rmsnorm(x) * w of the
    residual stream x is quantized by the product that reads it (`qin_attn` for Q/K/V,
    `qin_ffn` for gate/up: see qmatmul.QIN_MAX_K)."""
    x, eps = s.x, c.norm_eps
    inp = s.inputs if inp is None else inp
    nq, nk = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    act_mode = MODE_GELU if c.act == "gelu" else MODE_SILU
    fuse = T == 1 and inp.rows is None and w.fusable
    qin_attn, qin_ffn = fuse and c.n_embd <= QIN_QKV_MAX_K, fuse and c.n_embd <= QIN_MAX_K
    batched = inp.rows is not None
    qa, qb = (s.act, s.act1) if fuse or batched else (s.act, s.act)
    embed(x, inp.tokens, w.token_embd, T, c.embd_scale, stream)
    a = None

    def normed(nw, qin):
        """The input rmsnorm(x) * nw."""
        return qa.normed(x, nw, eps) if qin else quantize_act(qa, x, T, stream, MODE_NORM, nw, eps)

    for l, (L, plan) in enumerate(zip(w.layers, c.layers)):
        # Attention block: norm+quantize, Q/K/V in one product, norms+RoPE+cache write (decoding:
        # in the product's epilogue), attention.
        if a is None:
            a = normed(L.attn_norm, qin_attn)
        if fuse and L.q_norm is None and c.rope_dim == c.head_dim:
            for i in range(0, len(L.qkv), 2):   # the product rotates q, k and fills the cache itself
                qmatmul_rope(s.qkv, L.qkv[i:i + 2], a, stream, L.bqkv, inp.pos, s.rope[plan.rope_base],
                             inp.k_layer[l], inp.v_layer[l], nq + nk, nq, c.head_dim, c.rope_neox)
        else:
            _project(s.qkv, L.qkv, a, T, stream, L.bqkv)
            rope_kv(s.qkv, inp.pos, T, c, s.rope[plan.rope_base], L.q_norm, L.k_norm, inp.k_layer[l],
                    inp.v_layer[l], stream, s.act.empty, inp.rows)
        # (decoding, one sequence or several, attention quantizes its output for w_o itself)
        a = attention(s.att, s.q, inp.k_layer[l], inp.v_layer[l], inp.pos, T, c.n_head, c.n_head_kv, c.head_dim,
                      c.head_dim_v, c.attn_scale, plan.window, stream, inp.att_ws,
                      qb if fuse or batched else None, short, inp.rows)
        if a is None:
            a = quantize_act(qb, s.att, T, stream)
        a = _residual(x, s, L.wo, a, L.post_attn_norm, L.ffn_norm, eps, T, stream, qa, fuse, qin_ffn)

        # Feed-forward block: norm+quantize, gate/up in one product, act(gate)*up+quantize, down.
        if a is None:
            a = normed(L.ffn_norm, qin_ffn)
        if len(L.gate_up) == 1 and (fuse or (batched and gated_takes(L.gate_up[0][0], T))):
            a = qmatmul_gated(L.gate_up[0][0], a, stream, qb, act_mode, T)
        else:
            _project(s.ffn, L.gate_up, a, T, stream)
            a = quantize_act(qb, s.gate, T, stream, act_mode, src2=s.up)
        next_norm = w.layers[l + 1].attn_norm if l + 1 < len(w.layers) else w.output_norm
        # (the output head's kernel reads q8: the last layer's product makes it)
        a = _residual(x, s, L.w_down, a, L.post_ffn_norm, next_norm, eps, T, stream, qa, fuse,
                      qin_attn and l + 1 < len(w.layers))

    # Output head: only the rows whose logits are wanted.
    if all_logits or inp.rows is not None:
        a = quantize_act(qa, x, T, stream, MODE_NORM, w.output_norm, eps)
        qmatmul(s.all_logits if inp.rows is None else s.blogits, w.output, a, T, stream)
        return
    if a is None:
        a = quantize_act(qa, view_once(x, T, lambda: x[T - 1:T]), 1, stream, MODE_NORM, w.output_norm, eps)
    qmatmul(s.logits, w.output, a, 1, stream)


def _residual(x, s, m, act, post_norm, next_norm, eps, T, stream, dst, fuse, qin):
    """x += m(act), or x += rmsnorm(m(act)) * post_norm (gemma3). Returns the next product's
    input where a decode step has it: rmsnorm(x) * next_norm for that product to quantize (qin),
    or else, without a post-norm, quantized into dst by this product; else None."""
    if fuse and post_norm is None and not qin:
        return qmatmul_quant(x, m, act, stream, dst, next_norm, s.ss, eps)
    if post_norm is None:
        qmatmul(x, m, act, T, stream, accumulate=True)
    else:
        qmatmul(s.proj, m, act, T, stream)
        rmsnorm_add(x, s.proj, post_norm, eps, T, stream)
    return dst.normed(x, next_norm, eps) if qin else None


# ---------------------------------------------------------------------------------------------

def _cuda_core():
    try:
        from cuda.core import Device
    except ImportError:
        try:
            from cuda.core.experimental import Device
        except ImportError:
            raise NumbaAprError("device 'cuda' needs the cuda-core package (pip install cuda-core)") from None
    return Device


# Tried and not kept: PDL for this kernel, the embedding's and the sampler's (docs/experiments.md#pdl-for-the-steps-plain-launches)
@cuda_jit
def _advance(pos, tokens, ring, j):
    """After the j-th step of a graph: its sampled id into ring[j], the position on by one."""
    ring[j] = tokens[0]
    pos[0] += 1


@cuda_jit
def _advance_batch(binp, bids, B):
    """Before a batched decode step queued ahead: each of the B sequences' token := the id the
    step before sampled, its position on by one (binp: [token | position | cache row] a column)."""
    i = cuda.grid(1)
    if i < B:
        binp[0, i] = bids[i]
        binp[1, i] += 1


@dataclass
class _Queued:
    """A batched decode step queued before it was asked for (CudaRunner._queue_next): the
    sequences of KV slots `slots` at `positions`, each fed `tokens` (the ids of the step before,
    once read), padded to B; its ids go to pinned buffer `buf`."""
    slots: np.ndarray
    positions: np.ndarray
    B: int
    buf: int
    tokens: np.ndarray | None = None

    def asked(self, tokens, slots, positions, rows, argmax) -> bool:
        """Whether a call to eval_batch asks for this step: the same sequences, decoding, every
        row greedy, each fed the id the step before gave it."""
        n = len(self.slots)
        return (self.tokens is not None and argmax is not None and len(tokens) == len(rows) == n
                and bool(np.all(argmax)) and np.array_equal(rows, np.arange(n))
                and np.array_equal(tokens, self.tokens) and np.array_equal(slots, self.slots)
                and np.array_equal(positions, self.positions))


@dataclass
class _Chunk:
    """Decode steps replayed from one graph: positions p0 .. p0 + n - 1, fed `token` at p0 (None
    while that is the device's own, not yet read), their ids copied into pinned slot `slot`."""
    sampler: object
    p0: int
    n: int
    token: int | None
    slot: int
    ids: list | None = None      # the sampled ids, once read


class CudaRunner:
    """Owns the device weights, the workspace and the captured decode graphs."""

    def __init__(self, c: Config, w: Weights, n_ctx: int, n_batch: int, n_seq: int = 1):
        if not (ptx.SIM or cuda.is_available()):
            raise NumbaAprError("device 'cuda': no CUDA GPU is available (numba.cuda found none)")
        self.c = c
        if ptx.SIM:
            self.core_stream, self.stream = None, cuda.stream()
        else:
            dev = _cuda_core()()
            dev.set_current()
            self.core_stream = dev.create_stream()
            self.stream = cuda.external_stream(int(self.core_stream.handle))
        self.w = upload_weights(c, w)
        self.s = DeviceState(c, n_ctx, n_batch, n_seq)
        self.n_batch = n_batch
        self.steps = DECODE_STEPS   # steps a graph (tests lower it)
        # sampler -> {(short context, steps): captured decode steps}. A graph replays its sampler's
        # buffers, so it lives and dies with that sampler: keyed by id(), a later sampler given a
        # dead one's id would replay the dead one's graph (seen: freed buffers, an illegal address).
        self.graphs = weakref.WeakKeyDictionary()
        self._host_tok = cuda.pinned_array(1, np.int32) if not ptx.SIM else np.zeros(1, np.int32)
        self._ahead = None          # (token, position) the device's inputs already hold
        # Graphs queued ahead (see decode_sample): two pinned slots for their ids, each with the
        # event after its copy; the chunk queued and not read, and the last one read.
        self._slots = [cuda.pinned_array(DECODE_STEPS, np.int32) for _ in range(2)] if not ptx.SIM else None
        self._events = [cuda.event(timing=False) for _ in range(2)] if not ptx.SIM else None
        self._queued = self._done = None
        self._n_queued = 0
        # Decode steps of several sequences (eval_batch): a graph per (batch size, short); the
        # sizes are powers of two up to n_seq (and n_seq), a batch padded to the next.
        # (A step has at most n_batch tokens, the rows of every buffer: no size passes that.)
        top = min(n_seq, n_batch)
        self.batch_sizes = sorted({min(1 << i, top) for i in range(top.bit_length() + 1)})
        self.bgraphs = {}
        host = cuda.pinned_array if not ptx.SIM else np.zeros
        self._binp = host((3, n_seq), np.int32)
        self._brows = host((n_seq, c.n_vocab), np.float32)   # the logits eval_batch returns
        # ... and the argmaxes: two buffers, each with the event after its copy, for a step and
        # the step queued after it (see _queue_next); that step, while queued and not read.
        self._bids = [host(n_seq, np.int32) for _ in range(2)]
        self._bevents = [cuda.event(timing=False) for _ in range(2)] if not ptx.SIM else None
        self._bnext = None
        self.batch_ahead = BATCH_AHEAD

    # -- eager evaluation (prompts, and logits for callers that want them on the host) --------
    def _set_inputs(self, ids: np.ndarray, pos0: int):
        # From pageable memory: the copy is staged before the call returns, so the host arrays
        # are free to change at once (a pinned buffer would be read later, asynchronously).
        self.s.tokens[:len(ids)].copy_to_device(np.ascontiguousarray(ids, np.int32), stream=self.stream)
        self.s.pos.copy_to_device(np.array([pos0], np.int32), stream=self.stream)
        self._ahead = self._queued = self._done = None   # (the cache they stood on is rewritten)
        self._bnext = None

    def eval(self, ids: np.ndarray, pos0: int, want_all: bool = False):
        """Evaluate ids (<= n_batch) at pos0..; logits stay on the device (s.logits / s.all_logits)."""
        T = len(ids)
        self._set_inputs(ids, pos0)
        if want_all and self.s.all_logits is None:
            self.s.all_logits = cuda.device_array((self.s.n_batch, self.c.n_vocab), np.float32)
        forward(self.c, self.w, self.s, T, self.stream, all_logits=want_all)

    def evaluate(self, ids: np.ndarray, pos0: int, all_logits: np.ndarray | None = None,
                 host: bool = True) -> np.ndarray | None:
        """The backend interface's (see model.cpu.CpuRunner): ids of sequence 0 at pos0..; the last
        logits [1, n_vocab] on the host, or every row's into all_logits; with host=False
        (a prompt chunk whose logits are not read), nothing comes back."""
        self.eval(ids, pos0, want_all=all_logits is not None)
        if all_logits is not None:
            all_logits[:] = out = self.logits_host(True, len(ids))
            return out
        return self.logits_host(False, 1) if host else None

    def stepper(self, model, params) -> "CudaStepper":
        return CudaStepper(model, params)

    def logits_host(self, want_all: bool, T: int) -> np.ndarray:
        src = self.s.all_logits[:T] if want_all else self.s.logits
        out = src.copy_to_host(stream=self.stream)
        self.stream.synchronize()
        return out

    # -- decode steps: eager under the simulator, else graphs of `steps` steps a sampler -------
    def _steps(self, sampler, stream, short, n):
        for j in range(n):
            forward(self.c, self.w, self.s, 1, stream, short=short)
            sampler.sample(self.s.logits[0], self.s.tokens[0:1], stream)
            _advance[1, 1, stream](self.s.pos, self.s.tokens, self.s.ring, j)

    def read_token(self) -> int:
        """The token buffer's first id (a sampler's output), copied to the host, waited for."""
        self.s.tokens[0:1].copy_to_host(self._host_tok, stream=self.stream)
        self.stream.synchronize()
        return int(self._host_tok[0])

    def _replay(self, sampler, pos, n=1):
        """Run the n decode steps from pos from their graph (per sampler: up to SHORT_CTX
        positions, and past them: attention's plan), capturing it the first time: those steps
        run eagerly (compiling any kernel not yet compiled), then the same launches are
        recorded, not run, into the graph that later calls replay."""
        short = pos + n <= SHORT_CTX
        graphs = self.graphs.setdefault(sampler, {})
        g = graphs.get((short, n))
        if g is not None:
            g.launch(self.core_stream)
            return
        self._steps(sampler, self.stream, short, n)
        if not ptx.SIM:
            gb = self.core_stream.create_graph_builder()
            gb.begin_building()
            self._steps(sampler, gb, short, n)
            graphs[(short, n)] = gb.end_building().complete()

    def _feed(self, token, pos):
        """The device's inputs := (token, pos), unless they hold that already."""
        if self._ahead != (token, pos):
            self._set_inputs(np.array([token], np.int32), pos)

    def _queue(self, sampler, pos, token) -> _Chunk:
        """Replay the graph of steps from pos (`steps` of them, or one where fewer positions
        are left), then copy their ids to the host into the next slot (async)."""
        if not 1 <= self.steps <= DECODE_STEPS:   # (_advance writes ring[j] unchecked)
            raise NumbaAprError(f"steps a graph must be 1..{DECODE_STEPS}, got {self.steps}")
        n = self.steps if pos + self.steps <= self.s.n_ctx else 1
        ch = _Chunk(sampler, pos, n, token, self._n_queued & 1)
        self._n_queued += 1
        self._replay(sampler, pos, n)
        self.s.ring.copy_to_host(self._slots[ch.slot], stream=self.stream)
        self._events[ch.slot].record(self.stream)
        return ch

    def decode_sample(self, token: int, pos: int, sampler) -> int:
        """Feed `token` at `pos`, sample the next one on the device; returns its id.

        A graph runs `steps` steps, each on the token the one before sampled, and their ids come
        back together: while the caller feeds back the ids it was given (generating), the next
        calls are answered from them without the device. Before waiting for a graph's ids, the
        next graph is queued too, on the device's own token: the GPU goes on while the host
        reads the ids and comes back (~50 us otherwise idle: the wait, the Python between two
        calls, the graph launch). A caller that feeds anything else (or stops) gets graphs of
        its own from there: steps already run past that point wrote KV-cache rows and a position
        that whatever runs next at those positions overwrites, as they would be."""
        if not ptx.SIM and not sampler.graph_capturable:
            self._feed(token, pos)
            forward(self.c, self.w, self.s, 1, self.stream, short=pos < SHORT_CTX)
            self._ahead = self._done = None
            return sampler.sample(self.s.logits[0], self.s.tokens[0:1], self.stream)
        if ptx.SIM:   # no graphs, no queue: step, wait, read
            self._feed(token, pos)
            self._replay(sampler, pos)
            tok = self.read_token()
            self._ahead = (tok, pos + 1)
            return tok
        d = self._done
        if d is not None and d.sampler is sampler and d.p0 < pos < d.p0 + d.n and token == d.ids[pos - d.p0 - 1]:
            return d.ids[pos - d.p0]       # (a call repeated at d.p0 gets a step of its own)
        q = self._queued
        if q is None or q.sampler is not sampler or (q.p0, q.token) != (pos, token):
            self._feed(token, pos)
            q = self._queue(sampler, pos, token)
        nxt = pos + q.n
        self._queued = self._queue(sampler, nxt, None) if nxt < self.s.n_ctx else None
        self._events[q.slot].synchronize()
        q.ids = [int(i) for i in self._slots[q.slot][:q.n]]
        self._done = q
        if self._queued is not None:
            self._queued.token = q.ids[-1]
        self._ahead = None if self._queued is not None else (q.ids[-1], nxt)
        return q.ids[0]


    # -- several sequences at once (the server's scheduler) ------------------------------------
    def _graph(self, key, run):
        """run(stream) from its graph under `key`, capturing it the first time (as _replay)."""
        g = self.bgraphs.get(key)
        if g is not None:
            g.launch(self.core_stream)
            return
        run(self.stream)
        if not ptx.SIM:
            gb = self.core_stream.create_graph_builder()
            gb.begin_building()
            run(gb)
            self.bgraphs[key] = gb.end_building().complete()

    def eval_batch(self, tokens: np.ndarray, slots: np.ndarray, positions: np.ndarray,
                   rows: np.ndarray, argmax: np.ndarray | None = None, ids: np.ndarray | None = None) -> np.ndarray:
        """One step over entries of several sequences (token t at position positions[t] of the
        sequence in KV slot slots[t]); returns the logits after each entry in `rows` (each the
        last of its sequence's run in the batch), [len(rows), n_vocab] in a host buffer the next
        call overwrites; where argmax[k], row k's argmax goes to ids[k] instead: decoding rows
        take it from the device (ops.rows_argmax, in the step's graph), their logits not copied
        (4.9 MB a step for 8 rows of a 151,936-token vocabulary).

        The runs of one token (decoding) go together through one decode step, replayed from the
        graph of the next batch size up (padding entries write the spare slot), or with one
        sequence from that slot's graph of the fused single-sequence step; a longer run (a
        prompt chunk) is evaluated eagerly as one sequence on its slot's cache rows. A step of
        greedy decoding rows only has the step after it queued before its ids are read (see
        _queue_next): where the next call asks for that step, it is running already."""
        s, c, stream = self.s, self.c, self.stream
        T, R = len(tokens), len(rows)
        if not 0 < R <= s.n_seq:
            raise NumbaAprError(f"eval_batch: {R} rows asked of a runner of {s.n_seq} sequences")
        nxt, self._bnext = self._bnext, None
        if nxt is not None and nxt.asked(tokens, slots, positions, rows, argmax):
            self._queue_next(slots, positions, nxt.B, 1 - nxt.buf)
            return self._read_ids(nxt.buf, R, ids)
        # (a step queued and not asked for is left to run: what it wrote, the cache row one past
        # each of its sequences, is rewritten before anything reads it, or never read)
        edge = np.flatnonzero((slots[1:] != slots[:-1]) | (positions[1:] != positions[:-1] + 1)) + 1
        starts, ends = np.concatenate(([0], edge)), np.concatenate((edge, [T]))
        single = ends - starts == 1
        where = {int(r): k for k, r in enumerate(rows)}
        if not set(where) <= set((ends - 1).tolist()):
            raise NumbaAprError("eval_batch: logits are returned only after the last entry of a run")
        out = self._brows[:R]
        ones = starts[single]
        pairs = []                      # (decoding entry i, its row k in `rows`)
        nd = len(ones)
        if nd:
            if nd > self.batch_sizes[-1]:
                raise NumbaAprError(f"eval_batch: {nd} decoding sequences, more than a step takes "
                                    f"({self.batch_sizes[-1]}: slots, and tokens a batch)")
            B = next(b for b in self.batch_sizes if b >= nd)
            h = self._binp
            h[0, :nd], h[1, :nd] = tokens[ones], positions[ones]
            h[2, :nd] = slots[ones].astype(np.int64) * s.n_ctx
            h[:, nd:B] = 0
            h[2, nd:B] = s.n_seq * s.n_ctx      # the spare slot
            s.binp.copy_to_device(h, stream=stream)
            self._decode_step(B, int(slots[ones[0]]), int(positions[ones].max()) + 1 <= SHORT_CTX)
            pairs = [(i, where[int(one)]) for i, one in enumerate(ones) if int(one) in where]
            full = [(i, k) for i, k in pairs if argmax is None or not argmax[k]]   # rows that sample
            if not full and nd == T == R and np.array_equal(rows, np.arange(R)):   # greedy decoding only
                s.bids.copy_to_host(self._bids[0], stream=stream)
                if self._bevents:
                    self._bevents[0].record(stream)
                self._queue_next(slots, positions, B, 1)
                return self._read_ids(0, R, ids)
            if len(full) < len(pairs):
                s.bids.copy_to_host(self._bids[0], stream=stream)
            if nd > 1 and full == [(i, i) for i in range(nd)]:   # the scheduler's order: one copy
                s.blogits_first[nd].copy_to_host(out[:nd], stream=stream)
            else:
                for i, k in full:
                    (s.logits if nd == 1 else s.blogits_row[i]).copy_to_host(out[k:k + 1], stream=stream)
        prompt_rows = []
        for a, b in zip(starts[~single], ends[~single]):
            self._set_inputs(tokens[a:b], int(positions[a]))
            forward(c, self.w, s, int(b - a), stream, inp=s.slot_inputs(int(slots[a])))
            k = where.get(int(b) - 1)
            if k is not None:
                s.logits.copy_to_host(out[k:k + 1], stream=stream)
                prompt_rows.append(k)
        stream.synchronize()
        if argmax is not None:
            for i, k in pairs:
                if argmax[k]:
                    ids[k] = self._bids[0][i]
            for k in prompt_rows:
                if argmax[k]:
                    ids[k] = _argmax(out[k])
        self._ahead = self._queued = self._done = None   # (single-sequence decoding starts afresh)
        return out

    def _decode_step(self, B: int, slot: int, short: bool, advance: bool = False) -> None:
        """Replay the decode step of the B sequences in s.binp (one: of KV slot `slot`, from that
        slot's graph of the fused step) from its graph, ending with each row's argmax in s.bids;
        `advance`: first feed each sequence the id the step before gave it, one position on."""
        s, c = self.s, self.c
        inp = s.slot_inputs(slot, batch=True) if B == 1 else s.batch_inputs

        def run(st):
            if advance:
                _advance_batch[(B + 63) // 64, 64, st](s.binp, s.bids, B)
            forward(c, self.w, s, B, st, short=short, inp=inp)
            rows_argmax(s.logits if B == 1 else s.blogits, s.bids, B, st)
        self._graph(("slot", slot, short, advance) if B == 1 else ("batch", B, short, advance), run)

    def _queue_next(self, slots, positions, B: int, buf: int) -> None:
        """After a step of greedy decoding only (its ids on their way to pinned buffer 1 - buf),
        queue the step after it, where each sequence is fed the id this one gives it: its ids
        go to buffer `buf`. Batched, a step's host part (the scheduler's Python between two
        calls, the ids' copy and wait, the next launch: docs/experiments.md#a-batched-step-queued-ahead)
        leaves the GPU idle; queued ahead, it overlaps the step after. Where the next call asks for
        something else (a sequence ended, one joined, one samples), this step ran for nothing."""
        if not self.batch_ahead or int(positions.max()) + 2 > self.s.n_ctx:
            return
        positions = positions + 1
        self._decode_step(B, int(slots[0]), int(positions.max()) + 1 <= SHORT_CTX, advance=True)
        self.s.bids.copy_to_host(self._bids[buf], stream=self.stream)
        if self._bevents:
            self._bevents[buf].record(self.stream)
        self._bnext = _Queued(slots.copy(), positions, B, buf)

    def _read_ids(self, buf: int, R: int, ids: np.ndarray) -> np.ndarray:
        """Wait for the ids of a step of greedy decoding only (in pinned buffer `buf`): into
        ids[:R], and, where a step after it is queued, as that step's expected tokens."""
        if self._bevents:
            self._bevents[buf].synchronize()
        else:
            self.stream.synchronize()
        ids[:R] = self._bids[buf][:R]
        if self._bnext is not None:
            self._bnext.tokens = ids[:R].copy()
        self._ahead = self._queued = self._done = None   # (single-sequence decoding starts afresh)
        return self._brows[:R]


class CudaStepper:
    """The generation loop's stepper on the GPU: the prompt is evaluated eagerly, every token is
    sampled on the device, and the following steps are replayed from graphs of DECODE_STEPS
    (CudaRunner.decode_sample)."""

    def __init__(self, model, params):
        from ..kernels.cuda.sampling import DeviceSampler
        self.model, self.runner = model, model.runner
        self.sampler = DeviceSampler(model.config.n_vocab, params, model.n_ctx)

    def first(self, prompt_ids) -> int:
        m, r = self.model, self.runner
        m._prefill(prompt_ids, host=False)
        self.sampler.set_history(m._history(), r.stream)
        s = r.s
        tok = self.sampler.sample(s.logits[0], s.tokens[0:1], r.stream)
        if tok is None:  # sampled on the device: the id comes back through the token buffer
            tok = r.read_token()
        r._ahead = None
        return tok

    def next(self, token: int) -> int:
        m = self.model
        pos = m.n_past
        tok = self.runner.decode_sample(token, pos, self.sampler)
        m.tokens[pos] = token
        m.n_past = pos + 1
        return tok
