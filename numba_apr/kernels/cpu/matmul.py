"""Matrix products and row lookups over raw GGUF weights (any type in `numba_apr.model.quants`).

A weight matrix W has N rows (output features) of K columns (input features); GGUF stores it
with gguf shape [K, N] as N raw rows of `row_bytes` bytes, which is what these kernels take:
`w` is uint8 [N, row_bytes]. Activations are float32 [T, K] (T tokens: 1 when decoding, the
prompt length in prefill).

`matmul` is parallel over tiles of weight rows. Each thread decodes its tile once into a small
float32 scratch (`tile_rows` x K, allocated once by the caller) and dots it against every token row, so
prefill reads and decodes each weight byte once for the whole batch, and nothing the size of
N x K is ever allocated. The dots are float32 with fastmath reassociation so that LLVM turns
each one into vector FMAs over K, one (token, row) pair at a time through the same code, so a
token's result never depends on the batch it came in. Activations are first quantized to 8
bits exactly as llama.cpp does (see ACT_SCHEME). This is the plain path, for the types that
qmatmul.py (integer dots over repacked weights, the fast path) does not repack.

Each kernel has a float64 NumPy reference (`*_ref`) built on gguf-py's decoder: the tests' oracle.
Numba kernels have no bounds checks, so the Python wrappers validate shapes and dtypes first.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
import numba
from numba import get_num_threads

from ..._numba import jit, pjit, prange
from ...model.quants import _f16, _nearest, _to_f16, decode_row, quant_type

#: The smallest tile of weight rows (see `tile_rows`).
TILE = 4


# ---------------------------------------------------------------------------------------------
# The dot of one activation row with one decoded weight row.


@jit
def _dot_1x1(x0, w0, K):
    """x0 . w0"""
    a = np.float32(0.0)
    for k in range(K):
        a += x0[k] * w0[k]
    return a


@jit
def _dot_tile(out, x, s, n0, nr, K):
    """out[:, n0:n0+nr] = x . s[0:nr], one (token, row) dot at a time through the same code.

    Every dot takes the same path whatever T is, so a token's result does not depend on how
    many tokens share the call: decoding one token gives bit for bit what the prompt batch gave
    (llama.cpp has the same property, and with 8-bit activations a last-bit difference can flip
    a rounding and grow). Register blocking over several tokens and rows would sum in another
    order; it comes back with integer dots, whose sums do not depend on the order."""
    T = x.shape[0]
    for t in range(T):
        for r in range(nr):
            out[t, n0 + r] = _dot_1x1(x[t], s[r], K)


# ---------------------------------------------------------------------------------------------
# Activations as llama.cpp's CPU backend sees them. Before a quantized product it quantizes the
# activations to 8 bits (its `vec_dot_type`): Q8_0 per 32 (for Q4_0, Q5_0, Q8_0 weights), Q8_1
# per 32 with the block sum kept as f16 (Q4_1, Q5_1), Q8_K per 256 (Q4_K, Q5_K, Q6_K). Real
# models amplify such small differences: on SmolLM2 the logits of an exact float product and of
# llama.cpp differ by up to ~0.9. So we quantize the same way and multiply the dequantized
# values (exact small integers times the same scales), which reproduces llama.cpp's arithmetic
# up to float32 rounding. F16/BF16/F32 weights take the activations as they are.

ACT_F32, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = 0, 1, 2, 3
_Q = GGMLQuantizationType
ACT_SCHEME = {_Q.Q8_0: ACT_Q8_0, _Q.Q4_0: ACT_Q8_0, _Q.Q5_0: ACT_Q8_0, _Q.Q4_1: ACT_Q8_1,
              _Q.Q5_1: ACT_Q8_1, _Q.Q4_K: ACT_Q8_K, _Q.Q5_K: ACT_Q8_K, _Q.Q6_K: ACT_Q8_K}


@jit(fastmath=False)  # no contraction of x * scale into the rounding: exact ggml rounding
def quantize_blocks(xq, xd, xs, xm, x, scheme, b0, b1):
    """Blocks b0..b1-1 of one row (1-D arrays): the int8 quants xq, the block scales xd (per 32,
    per 256 for Q8_K), the int sums of every 16 quants xs and, for Q8_1, llama.cpp's f16 block
    sums d * sum(q) in xm."""
    bs = 256 if scheme == ACT_Q8_K else 32
    for b in range(b0, b1):
        o = b * bs
        if scheme == ACT_Q8_K:
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for i in range(256):
                a = abs(x[o + i])
                if a > amax:
                    amax, vmax = a, x[o + i]
            if amax == 0.0:
                xd[b] = 0.0
                for i in range(256):
                    xq[o + i] = 0
            else:
                iscale = np.float32(-127.0) / vmax
                for i in range(256):
                    xq[o + i] = min(127, _nearest(np.float32(iscale * x[o + i])))
                xd[b] = np.float32(1.0) / iscale
        else:
            amax = np.float32(0.0)
            for i in range(32):
                amax = max(amax, abs(x[o + i]))
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
            qsum = 0
            for i in range(32):
                q = _nearest(np.float32(x[o + i] * inv))
                qsum += q
                xq[o + i] = q
            xd[b] = _to_f16(d)
            if scheme == ACT_Q8_1:
                xm[b] = _to_f16(np.float32(d * np.float32(qsum)))
    for s in range(b0 * bs // 16, b1 * bs // 16):
        a = 0
        for i in range(16):
            a += np.int32(xq[16 * s + i])
        xs[s] = a


@pjit
def quantize_q8(xq, xd, xs, xm, x, scheme):
    """xq[t] = x[t] as int8, with per-block scales xd[t] (per 32, or per 256 for Q8_K), int sums
    of every 16 quants xs[t] and, for Q8_1, llama.cpp's f16 block sums d * sum(q) in xm[t]."""
    T, K = x.shape
    for t in prange(T):
        quantize_blocks(xq[t], xd[t], xs[t], xm[t], x[t], scheme, 0, K // (256 if scheme == ACT_Q8_K else 32))


@pjit(fastmath=False)  # each value one rounding, as llama.cpp's dequantized view
def _dequantize_act(xf, corr, xq, xd, xs, xm, scheme):
    T, K = xq.shape
    for t in prange(T):
        for i in range(K):
            xf[t, i] = np.float32(xq[t, i]) * xd[t, i // 256 if scheme == ACT_Q8_K else i // 32]
        if scheme == ACT_Q8_1:
            for b in range(K // 32):
                corr[t, b] = xm[t, b] - np.float32(xd[t, b] * np.float32(xs[t, 2 * b] + xs[t, 2 * b + 1]))


def quantize_act(xf, corr, x, scheme, q8: "QScratch | None" = None):
    """xf = x quantized as llama.cpp does for `scheme` (quantize_q8), then dequantized. For
    ACT_Q8_1, corr[t, b] = (f16 block sum) - (the sum of xf's block): the product adds
    min[b] * corr[t, b]. `q8` holds the int8 stage (allocated here when not given)."""
    T, K = x.shape
    xq, xd, xs, xm = (q8 or QScratch(T, K)).views(T, K)
    quantize_q8(xq, xd, xs, xm, x, scheme)
    _dequantize_act(xf, corr, xq, xd, xs, xm, scheme)


@jit(inline="always")
def _min_term(w, r, qtype, corr, t):
    """sum over 32-blocks of the row's min (m, an f16 at byte 2 of Q4_1 / Q5_1 blocks) times the
    activation block-sum correction."""
    size = 20 if qtype == _Q41 else 24
    a = np.float32(0.0)
    for b in range(corr.shape[1]):
        a += _f16(w[r], b * size + 2) * corr[t, b]
    return a


_Q41, _Q51 = int(_Q.Q4_1), int(_Q.Q5_1)
_NO_CORR = np.zeros((0, 0), np.float32)


@pjit
def _matmul_kernel(out, x, w, qtype, tile, n_threads, corr, tiles):
    N = w.shape[0]
    K = x.shape[1]
    n_tiles = (N + tile - 1) // tile
    # One contiguous range of tiles per thread (the work per tile is uniform), each thread
    # decoding into its own row of `tiles`, which the caller allocated once.
    # (n_threads comes from the caller: numba.get_num_threads() inside a kernel would stop it
    # from being cached on disk.)
    n_chunks = max(1, min(n_tiles, n_threads))
    for c in prange(n_chunks):
        scratch = tiles[c, :tile * K].reshape((tile, K))
        for i in range(c * n_tiles // n_chunks, (c + 1) * n_tiles // n_chunks):
            n0 = i * tile
            nr = min(tile, N - n0)
            for r in range(nr):
                decode_row(w[n0 + r], qtype, scratch[r])
            _dot_tile(out, x, scratch, n0, nr, K)
            if qtype == _Q41 or qtype == _Q51:
                for r in range(nr):
                    for t in range(x.shape[0]):
                        out[t, n0 + r] += _min_term(w, n0 + r, qtype, corr, t)


def tile_rows(T: int, K: int) -> int:
    """Weight rows decoded per tile. With one or two tokens, 4 rows: the tile stays in L1 between
    its decode and its dots. With more tokens every tile streams all T activation rows past it,
    so a bigger tile (up to 64 rows or ~768 KiB, which stays in a 1-2 MiB L2) cuts that traffic
    as many times; measured on prefill shapes, past L2 it gets slower again."""
    if T <= 2:
        return TILE
    return max(TILE, min(64, TILE_BYTES // (4 * K)) // TILE * TILE)


TILE_BYTES = 768 * 1024


@pjit
def _get_rows_kernel(out, w, qtype, ids):
    for i in prange(ids.shape[0]):
        decode_row(w[ids[i]], qtype, out[i])


def _check_weights(w: np.ndarray, qtype, K: int):
    """The QuantType of `w`, after checking that it holds raw rows of K elements of that type."""
    t = quant_type(qtype)
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.ndim != 2 or not w.flags.c_contiguous:
        raise ValueError("weights must be a C-contiguous uint8 array of raw rows [N, row_bytes]")
    if K % t.block_size or w.shape[1] != t.row_bytes(K):
        raise ValueError(f"{t.name} rows of {K} elements take {K // t.block_size * t.type_size} bytes, "
                         f"weights have {w.shape[1]}")
    return t


def _check_f32(a: np.ndarray, what: str, shape: tuple[int, int]):
    if (not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != shape
            or not a.flags.c_contiguous):
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{what} must be C-contiguous float32 of shape {shape}, got {got}")


class QScratch:
    """The int8 activations of up to `rows` tokens of up to `width` values, allocated once."""

    def __init__(self, rows: int, width: int):
        self.xq = np.zeros((rows, width), np.int8)           # quants
        self.xd = np.zeros((rows, width // 32), np.float32)  # scale per 32 (per 256 for Q8_K)
        self.xs = np.zeros((rows, width // 16), np.int32)    # sum of every 16 quants
        self.xm = np.zeros((rows, width // 32), np.float32)  # Q8_1: f16(d * block sum)
        self._views = {}

    def views(self, T: int, K: int):
        """C-contiguous views of the buffers for T tokens of K values (made once per shape)."""
        v = self._views.get((T, K))
        if v is None:
            if T > self.xq.shape[0] or K > self.xq.shape[1]:
                raise ValueError(f"scratch {self.xq.shape} is too small for {(T, K)}")
            v = self._views[(T, K)] = tuple(a.reshape(-1)[:T * (K // n)].reshape(T, K // n) for a, n in
                                            ((self.xq, 1), (self.xd, 32), (self.xs, 16), (self.xm, 32)))
        return v


class ActScratch:
    """What a product needs besides its operands, allocated once: the quantized activations of
    up to `rows` tokens of up to `width` values, and each thread's tile of decoded weights."""

    def __init__(self, rows: int, width: int):
        self.q8 = QScratch(rows, width)                      # the int8 stage
        self.xq = np.zeros((rows, width), np.float32)        # activations, quantized + dequantized
        self.corr = np.zeros((rows, width // 32), np.float32)  # Q8_1 block-sum corrections
        # [thread, tile_rows x width] decoded weight rows; sized for the most threads Numba allows.
        per_thread = max(TILE_BYTES // 4, TILE * width)
        self.tiles = np.zeros((numba.config.NUMBA_NUM_THREADS, per_thread), np.float32)


def matmul(out: np.ndarray, x: np.ndarray, w: np.ndarray, qtype,
           scratch: ActScratch | None = None) -> np.ndarray:
    """out[T, N] = x[T, K] @ W.T, W being the N x K matrix stored as raw rows `w` of type `qtype`,
    with x quantized first as llama.cpp does for that type (see ACT_SCHEME). `scratch` holds the
    quantized activations and the threads' decoded tiles (allocated here when not given; the
    RunState passes its own, so decoding allocates nothing)."""
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError("x must be a 2-D float32 array [T, K]")
    T, K = x.shape
    t = _check_weights(w, qtype, K)
    _check_f32(x, "x", (T, K))
    if not (isinstance(out, np.ndarray) and out.flags.writeable):
        raise ValueError("out must be a writable array")
    _check_f32(out, "out", (T, w.shape[0]))
    if T and w.shape[0]:
        scheme = ACT_SCHEME.get(t.id, ACT_F32)
        scratch = scratch or ActScratch(T, K)
        if scratch.xq.shape[0] < T or scratch.xq.shape[1] < K:
            raise ValueError(f"scratch {scratch.xq.shape} is too small for {(T, K)}")
        if scheme != ACT_F32:
            xq, corr = scratch.xq[:T, :K], scratch.corr[:T, :K // 32]
            if not xq.flags.c_contiguous:  # a narrower product than the scratch was made for
                xq = scratch.xq.reshape(-1)[:T * K].reshape(T, K)
                corr = scratch.corr.reshape(-1)[:T * (K // 32)].reshape(T, K // 32)
            quantize_act(xq, corr, x, scheme, scratch.q8)
            x = xq
        else:
            corr = _NO_CORR
        _matmul_kernel(out, x, w, t.id, tile_rows(T, K), get_num_threads(), corr, scratch.tiles)
    return out


def get_rows(out: np.ndarray, w: np.ndarray, qtype, ids) -> np.ndarray:
    """out[i, :] = row ids[i] of W, decoded (the token-embedding lookup)."""
    t = quant_type(qtype)
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError("weights must be a 2-D uint8 array of raw rows [N, row_bytes]")
    K = t.row_elements(w.shape[1])
    _check_weights(w, t.id, K)
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise ValueError(f"row ids must lie in [0, {w.shape[0]}), got {ids.min()}..{ids.max()}")
    if not (isinstance(out, np.ndarray) and out.flags.writeable):
        raise ValueError("out must be a writable array")
    _check_f32(out, "out", (ids.size, K))
    if ids.size:
        _get_rows_kernel(out, w, t.id, ids)
    return out


# ---------------------------------------------------------------------------------------------
# float64 references (the tests' oracle): gguf-py decodes, NumPy multiplies.


def _ref_weights(w: np.ndarray, qtype) -> np.ndarray:
    return np.asarray(gguf_quants.dequantize(np.asarray(w, np.uint8), GGMLQuantizationType(quant_type(qtype).id)), np.float64)


def quantize_act_ref(x: np.ndarray, scheme: int):
    """llama.cpp's activation quantization, written plainly after its quantize_row_q8_{0,1,K}:
    returns the dequantized activations and the Q8_1 block-sum corrections (float64)."""
    x = np.asarray(x, np.float32)
    T, K = x.shape
    if scheme == ACT_F32:
        return x.astype(np.float64), np.zeros((T, 0))
    if scheme == ACT_Q8_K:
        xb = x.reshape(T, K // 256, 256)
        vmax = np.take_along_axis(xb, np.abs(xb).argmax(-1)[..., None], -1)
        with np.errstate(divide="ignore"):
            iscale = np.where(vmax != 0, np.float32(-127.0) / vmax, 0).astype(np.float32)
        q = np.minimum(127, np.rint(iscale * xb))  # np.rint: half to even, as nearest_int
        d = np.where(iscale != 0, np.float32(1.0) / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
        return (q * d).reshape(T, K).astype(np.float64), np.zeros((T, K // 32))
    xb = x.reshape(T, K // 32, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    d = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.where(amax != 0, np.float32(127.0) / np.where(amax != 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * inv)
    d16 = d.astype(np.float16).astype(np.float64)
    xq = (q * d16).reshape(T, K)
    qsum = q.sum(-1)
    corr = np.zeros((T, K // 32))
    if scheme == ACT_Q8_1:
        corr = (d[..., 0] * qsum).astype(np.float32).astype(np.float16).astype(np.float64) - d16[..., 0] * qsum
    return xq, corr


def matmul_ref(x: np.ndarray, w: np.ndarray, qtype) -> np.ndarray:
    """float64 x @ W.T, W decoded by gguf-py, x quantized first as llama.cpp does for the type."""
    qt = quant_type(qtype).id
    scheme = ACT_SCHEME.get(qt, ACT_F32)
    xq, corr = quantize_act_ref(x, scheme)
    out = xq @ _ref_weights(w, qtype).T
    if scheme == ACT_Q8_1:  # the weights' block minimum (an f16 at byte 2 of each block)
        size = 20 if qt == _Q41 else 24
        m = np.asarray(w).reshape(w.shape[0], -1, size)[:, :, 2:4].copy().view(np.float16)[..., 0]
        out += corr @ m.astype(np.float64).T
    return out


def get_rows_ref(w: np.ndarray, qtype, ids) -> np.ndarray:
    """float64 rows `ids` of W, decoded by gguf-py."""
    return _ref_weights(np.asarray(w)[np.asarray(ids, np.int64).reshape(-1)], qtype)
