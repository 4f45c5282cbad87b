"""Element-wise and per-row GPU kernels (numba.cuda), the CUDA twins of kernels/cpu/ops.py.

* `quantize_act`: the input of every product, one block per token: optionally RMS-normalised
  (norm + quantization fused) or the gated activation act(gate) * up (activation + quantization
  fused), written once as float32 (`xf`, for float matrices) and as q8 (int8 per value packed in
  int32 words, a float scale per 32, int sums per 16: what qmatmul's dp4a dot reads);
* `embed`: token rows of the embedding matrix (any GGUF type, through qmatmul's units), scaled;
* `rope_kv`: per-head RMS norm (gemma3's q/k norms), RoPE from a precomputed cos/sin table,
  and the K/V write into the f16 cache, in one launch;
* `rmsnorm_add`: x += rmsnorm(y) * w (gemma3's post-norms before the residual add).

Each launcher takes the stream to launch on and only launches (no allocation, no host copy), so
a decode step can be captured in a CUDA graph. Positions and token ids are read from device
arrays for the same reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import cuda

from ..._numba import cuda_jit
from . import ptx
from .launch import launch, overlapped
from .q8 import MODE_COPY, MODE_GELU, MODE_NORM, MODE_SILU, gated, quant32  # noqa: F401  (modes re-exported)
from .qmatmul import FLOAT_TYPES, UNITS, DeviceMatrix

BLOCK = 256


@dataclass
class ActBuffers:
    """An activation as the products read it: [rows, K] for up to `rows` tokens."""
    xf: object     # float32 [rows, K]
    xq: object     # int32 [rows, K/4]: 4 int8 quants each (what the dp4a products read)
    xd: object     # float32 [rows, K/32]: scale per 32 ([rows, K/16], a scale per 16, with x16)
    xs: object     # int32 [rows, K/16]: sum of each 16 quants
    empty: object  # float32 [0]: "no bias"
    xq8: object    # int8 view of xq [rows, K] (what the quantizers write)
    ss: object = None   # float32 [K/32] or empty: with entries, the q8 holds x * w of an RMS norm
                        # whose 1 / rms(x) is still to apply: these are x's sums of squares per 32
    eps: float = 0.0    # that norm's epsilon
    count: object = None  # int32 [K/16], zeros between launches: the decode epilogues' counters (qmatmul.py)
    nw: object = None   # float32 [K] or None: with it, no q8 yet: the input is rmsnorm(xf) * nw, which
                        # the decode product quantizes itself (qmatmul's QIN)
    x16: bool = False   # xd holds a scale per 16 values (the decode step's gated activations:
                        # qmatmul.GATED_GROUP), not per 32

    def __post_init__(self):
        if self.ss is None:
            self.ss = self.empty

    @classmethod
    def allocate(cls, rows: int, K: int) -> "ActBuffers":
        xq = cuda.device_array((rows, K // 4), np.int32)
        return cls(cuda.device_array((rows, K), np.float32), xq,
                   cuda.device_array((rows, K // 16), np.float32), cuda.device_array((rows, K // 16), np.int32),
                   cuda.device_array(0, np.float32), xq.view(np.int8),
                   count=cuda.to_device(np.zeros(max(1, K // 16), np.int32)))

    def _view(self, key, make) -> "ActBuffers":
        views = self.__dict__.setdefault("_views", {})
        if key not in views:
            views[key] = make()
        return views[key]

    def cols(self, K: int, x16: bool = False) -> "ActBuffers":
        """The views for an input of K <= capacity columns (with x16: a scale per 16 values),
        made once per (K, x16): numba.cuda builds a strided view's extents row by row in Python
        (~0.7 ms for 512 rows, measured), more than the kernel that uses it."""
        return self._view((K, x16), lambda: ActBuffers(self.xf[:, :K], self.xq[:, :K // 4],
                                                       self.xd[:, :K // (16 if x16 else 32)], self.xs[:, :K // 16],
                                                       self.empty, self.xq8[:, :K], count=self.count, x16=x16))

    def normed(self, x, w, eps: float) -> "ActBuffers":
        """Decoding: the input rmsnorm(x) * w (x: [1, K] float32), left for the product to quantize."""
        return self._view(("norm", id(x), id(w), eps), lambda: ActBuffers(x, self.xq, self.xd, self.xs, self.empty,
                                                                          self.xq8, eps=eps, count=self.count, nw=w))

    def pending(self, ss, eps: float) -> "ActBuffers":
        """This view with an RMS norm's 1 / rms still to apply (sums of squares ss, epsilon eps)."""
        return self._view(("ss", id(ss), eps), lambda: ActBuffers(self.xf, self.xq, self.xd, self.xs, self.empty,
                                                                  self.xq8, ss, eps, self.count, x16=self.x16))


@cuda_jit(device=True)
def _block_sum(v, buf):
    """Sum of v over the block (every thread gets it); buf: shared float32[32]."""
    v = ptx.warp_sum(v)
    wid = cuda.threadIdx.x >> 5
    nw = (cuda.blockDim.x + 31) >> 5
    if (cuda.threadIdx.x & 31) == 0:
        buf[wid] = v
    cuda.syncthreads()
    s = np.float32(0.0)
    for i in range(nw):
        s += buf[i]
    cuda.syncthreads()
    return s


QB = 8  # 32-value quantization blocks a CUDA block takes at once: one a warp
PROMPT_BLOCKS = 2048   # CUDA blocks a prompt's quantize_act aims at (7B pp512, timed per call
                       # with a sync on each side: 159 -> 77-93 us, where each of a token's
                       # K / 256 blocks summed the norm's squares; the synced calls add up to
                       # ~35 us a call more than the unsynced forward: launch and sync)


@overlapped
@cuda_jit
def _quantize_act(src, src2, w, eps, mode, xf, xq8, xd, xs, K):
    # One warp per 32-value block, a lane per value: coalesced, and the absmax and the sums are
    # warp butterflies. (The first version gave each thread a whole block and one CUDA block a
    # token: ~10 us a launch at decode, four launches a layer.) For the norm, every CUDA block
    # sums the row's squares itself (K floats from L2): cheaper than another launch.
    # A CUDA block walks the row's blocks in strides of the grid (prompts: a few CUDA blocks a
    # token, so the norm's sum is not redone by every one of K / 32 / QB blocks).
    ptx.grid_dep()
    t = cuda.blockIdx.y
    lane = cuda.threadIdx.x & 31
    nb = K // 32
    buf = cuda.shared.array(32, np.float32)
    scale = np.float32(1.0)
    if mode == MODE_NORM:
        ss = np.float32(0.0)
        for i in range(cuda.threadIdx.x, K, cuda.blockDim.x):
            ss += src[t, i] * src[t, i]
        ss = _block_sum(ss, buf)
        scale = np.float32(1.0) / math.sqrt(ss / np.float32(K) + eps)
    for b0 in range(cuda.blockIdx.x * QB, nb, cuda.gridDim.x * QB):   # (block-uniform trips)
        b = b0 + (cuda.threadIdx.x >> 5)
        i = 32 * min(b, nb - 1) + lane   # warps past the last block redo it and store nothing
        v = src[t, i]
        if mode == MODE_NORM:
            v = v * scale * w[i]
        elif mode != MODE_COPY:
            v = gated(v, src2[t, i], mode)
        if b < nb:
            xf[t, i] = v
        quant32(v, b < nb, xq8, xd, xs, t, b)


def quantize_act(act: ActBuffers, src, T: int, stream, mode=MODE_COPY, w=None, eps=0.0, src2=None):
    """act <- src[:T] (K = src.shape[1] columns), transformed by `mode`, as float and as q8."""
    K = src.shape[1]
    a = act.cols(K)
    nx = (K // 32 + QB - 1) // QB
    if T > 1:   # prompts: enough CUDA blocks in all, each with several of the row's blocks
        nx = max(1, min(nx, PROMPT_BLOCKS // T))
    launch(_quantize_act, (nx, T), 32 * QB, stream,
        src, src if src2 is None else src2, act.empty if w is None else w, np.float32(eps), mode,
        a.xf, a.xq8, a.xd, a.xs, K)
    return a


# ---------------------------------------------------------------------------------------------

def _make_embed(unit):
    @cuda_jit
    def embed(x, tokens, w, o_qh, o_sc, s_qs, s_qh, s_sc, n_units, scale):
        t = cuda.blockIdx.x
        r = tokens[t]
        for u in range(cuda.threadIdx.x, n_units, cuda.blockDim.x):
            l0, l1, l2, l3, h0, h1, h2, h3, d0, m0, d1, m1, e0, e1 = unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u)
            _put4(x, t, e0, l0, d0, m0, scale)
            _put4(x, t, e0 + 4, l1, d0, m0, scale)
            _put4(x, t, e0 + 8, l2, d0, m0, scale)
            _put4(x, t, e0 + 12, l3, d0, m0, scale)
            _put4(x, t, e1, h0, d1, m1, scale)
            _put4(x, t, e1 + 4, h1, d1, m1, scale)
            _put4(x, t, e1 + 8, h2, d1, m1, scale)
            _put4(x, t, e1 + 12, h3, d1, m1, scale)
    return embed


@cuda_jit(device=True)
def _put4(x, t, e, word, d, m, scale):
    for j in range(4):
        b = (word >> (8 * j)) & 0xFF
        b = b - 256 if b >= 128 else b
        x[t, e + j] = (d * np.float32(b) + m) * scale


@cuda_jit
def _embed_float(x, tokens, w, kind, K, scale):
    t = cuda.blockIdx.x
    r = tokens[t]
    for k in range(cuda.threadIdx.x, K, cuda.blockDim.x):
        if kind == 0:
            v = ptx.f32_bits(w[r * K + k])
        else:
            word = w[(r * K + k) >> 1] >> (16 * (k & 1))
            v = ptx.f16_bits(word & 0xFFFF) if kind == 1 else ptx.f32_bits((word & 0xFFFF) << 16)
        x[t, k] = v * scale


_EMBED: dict = {}


def embed(x, tokens, m: DeviceMatrix, T: int, scale: float, stream):
    """x[t] = row tokens[t] of the embedding matrix, times scale, for t < T."""
    if m.qtype in FLOAT_TYPES:
        launch(_embed_float, T, BLOCK, stream, x, tokens, m.w, FLOAT_TYPES[m.qtype], m.K, np.float32(scale))
        return
    k = _EMBED.get(m.qtype)
    if k is None:
        k = _EMBED[m.qtype] = _make_embed(UNITS[m.qtype])
    launch(k, T, 64, stream, x, tokens, m.w, m.o_qh, m.o_sc, m.s_qs, m.s_qh, m.s_sc, m.K // 32, np.float32(scale))


# ---------------------------------------------------------------------------------------------

def rope_table(n_ctx: int, rope_dim: int, base: float):
    """cos and sin of pos * base^(-2i/rope_dim), float64 math, stored float32 [n_ctx, rope_dim/2]."""
    inv = base ** (-2.0 * np.arange(rope_dim // 2) / rope_dim)
    ang = np.arange(n_ctx, dtype=np.float64)[:, None] * inv[None, :]
    return cuda.to_device(np.cos(ang).astype(np.float32)), cuda.to_device(np.sin(ang).astype(np.float32))


@overlapped
@cuda_jit
def _rope_kv(qkv, pos, rows, batched, n_head, n_head_kv, head_dim, head_dim_v, rope_dim, neox, cos, sin,
             q_norm, k_norm, eps, k_cache, v_cache):
    ptx.grid_dep()                  # (launched while the Q/K/V product ends: launch.py)
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y             # 0..n_head-1: a query head; then the kv heads
    p = pos[t] if batched else pos[0] + t
    row = rows[t] + p if batched else p
    buf = cuda.shared.array(32, np.float32)
    is_q = h < n_head
    o = h * head_dim if is_q else n_head * head_dim + (h - n_head) * head_dim
    nw = q_norm if is_q else k_norm
    scale = np.float32(1.0)
    if nw.shape[0] > 0:
        ss = np.float32(0.0)
        for i in range(cuda.threadIdx.x, head_dim, cuda.blockDim.x):
            ss += qkv[t, o + i] * qkv[t, o + i]
        ss = _block_sum(ss, buf)
        scale = np.float32(1.0) / math.sqrt(ss / np.float32(head_dim) + eps)
        cuda.syncthreads()
        for i in range(cuda.threadIdx.x, head_dim, cuda.blockDim.x):
            qkv[t, o + i] = qkv[t, o + i] * scale * nw[i]
        cuda.syncthreads()
    half = rope_dim // 2
    for i in range(cuda.threadIdx.x, half, cuda.blockDim.x):
        a = o + i if neox else o + 2 * i
        b = a + half if neox else a + 1
        c, s = cos[p, i], sin[p, i]
        x0, x1 = qkv[t, a], qkv[t, b]
        qkv[t, a] = x0 * c - x1 * s
        qkv[t, b] = x0 * s + x1 * c
    if not is_q:
        cuda.syncthreads()
        kh = h - n_head
        for i in range(cuda.threadIdx.x, head_dim, cuda.blockDim.x):
            k_cache[row, kh * head_dim + i] = np.float16(qkv[t, o + i])
        vo = n_head * head_dim + n_head_kv * head_dim + kh * head_dim_v
        for i in range(cuda.threadIdx.x, head_dim_v, cuda.blockDim.x):
            v_cache[row, kh * head_dim_v + i] = np.float16(qkv[t, vo + i])


def rope_kv(qkv, pos, T, c, table, q_norm, k_norm, k_cache, v_cache, stream, empty, rows=None):
    """In place on qkv[:T] = [q | k | v] columns: per-head norms (if given), RoPE on q and k;
    then k and v (f16) into the cache at positions pos[0] + t, or, for a batch of several
    sequences (rows given, int32 [T]), token t at position pos[t] into cache row rows[t] + pos[t]
    (rows[t]: the first row of its sequence's slot)."""
    cos, sin = table
    threads = min(128, max(32, c.head_dim // 2))
    launch(_rope_kv, (T, c.n_head + c.n_head_kv), threads, stream,
        qkv, pos, pos if rows is None else rows, rows is not None, c.n_head, c.n_head_kv, c.head_dim,
        c.head_dim_v, c.rope_dim, c.rope_neox, cos, sin,
        empty if q_norm is None else q_norm, empty if k_norm is None else k_norm, np.float32(c.norm_eps),
        k_cache, v_cache)


@cuda_jit
def _rmsnorm_add(x, y, w, eps, K):
    t = cuda.blockIdx.x
    buf = cuda.shared.array(32, np.float32)
    ss = np.float32(0.0)
    for i in range(cuda.threadIdx.x, K, cuda.blockDim.x):
        ss += y[t, i] * y[t, i]
    ss = _block_sum(ss, buf)
    scale = np.float32(1.0) / math.sqrt(ss / np.float32(K) + eps)
    for i in range(cuda.threadIdx.x, K, cuda.blockDim.x):
        x[t, i] += y[t, i] * scale * w[i]


def rmsnorm_add(x, y, w, eps, T, stream):
    """x[:T] += rmsnorm(y[:T]) * w."""
    launch(_rmsnorm_add, T, BLOCK, stream, x, y, w, np.float32(eps), x.shape[1])


ARGMAX_THREADS = 1024


@cuda_jit
def _rows_argmax(logits, ids):
    """ids[r] = the index of row r's largest value, the first on ties (NaN never wins): the
    host sampler's greedy choice (sampling._argmax). A block a row; the threads' bests meet in
    a tree in shared memory (the simulator has no shuffles of integers)."""
    r = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    n = logits.shape[1]
    bv = np.float32(-np.inf)
    bi = np.int32(n)
    for i in range(tid, n, ARGMAX_THREADS):   # (each thread's first maximum)
        v = logits[r, i]
        if v > bv:
            bv, bi = v, np.int32(i)
    sv = cuda.shared.array(ARGMAX_THREADS, np.float32)
    si = cuda.shared.array(ARGMAX_THREADS, np.int32)
    sv[tid], si[tid] = bv, bi
    cuda.syncthreads()
    h = ARGMAX_THREADS // 2
    while h > 0:
        if tid < h:
            ov, oi = sv[tid + h], si[tid + h]
            if ov > sv[tid] or (ov == sv[tid] and oi < si[tid]):
                sv[tid], si[tid] = ov, oi
        cuda.syncthreads()
        h //= 2
    if tid == 0:
        ids[r] = si[0] if si[0] < n else 0   # (a row of NaN only: 0, as the host's)


def rows_argmax(logits, ids, R: int, stream):
    """ids[:R] = the argmax of each of logits' first R rows (greedy decoding of a batch)."""
    launch(_rows_argmax, R, ARGMAX_THREADS, stream, logits, ids)
