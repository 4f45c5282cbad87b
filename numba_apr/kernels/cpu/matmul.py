"""Matrix products and row lookups over raw GGUF weights (any type in `numba_apr.quants`).

A weight matrix W has N rows (output features) of K columns (input features); GGUF stores it
with gguf shape [K, N] as N raw rows of `row_bytes` bytes, which is what these kernels take:
`w` is uint8 [N, row_bytes]. Activations are float32 [T, K] (T tokens: 1 when decoding, the
prompt length in prefill).

`matmul` is parallel over tiles of weight rows. Each thread decodes its tile once into a small
float32 scratch (`tile_rows` x K, reused across tiles) and dots it against every token row, so
prefill reads and decodes each weight byte once for the whole batch, and nothing the size of
N x K is ever allocated. The dots are float32 with fastmath reassociation so that LLVM turns
each one into vector FMAs over K; several rows x several tokens are done per pass over K so
every vector load feeds more than one FMA. (An integer dot over the packed blocks, without the
float decode, is a later optimisation.)

Each kernel has a float64 NumPy reference (`*_ref`) built on gguf-py's decoder: the tests' oracle.
Numba kernels have no bounds checks, so the Python wrappers validate shapes and dtypes first.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from numba import get_num_threads

from ..._numba import jit, pjit, prange
from ...quants import decode_row, quant_type

#: Rows per dot micro-kernel, and the smallest tile of weight rows (see `tile_rows`).
TILE = 4
#: Tokens per pass of the dot micro-kernel.
TOK = 4


# ---------------------------------------------------------------------------------------------
# Dot micro-kernels over a decoded tile `s` [TILE, K] and activations `x` [T, K]. Each keeps one
# accumulator per (token, row) pair; LLVM vectorises the k loop into one vector register per
# accumulator, so a pass loads TOK + TILE vectors and issues TOK * TILE FMAs.


@jit
def _dot_4x4(out, x, s, t, n0, K):
    """out[t:t+4, n0:n0+4] = x[t:t+4] . s[0:4]"""
    x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
    w0, w1, w2, w3 = s[0], s[1], s[2], s[3]
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    a30 = a31 = a32 = a33 = np.float32(0.0)
    for k in range(K):
        v0, v1, v2, v3 = w0[k], w1[k], w2[k], w3[k]
        u = x0[k]
        a00 += u * v0
        a01 += u * v1
        a02 += u * v2
        a03 += u * v3
        u = x1[k]
        a10 += u * v0
        a11 += u * v1
        a12 += u * v2
        a13 += u * v3
        u = x2[k]
        a20 += u * v0
        a21 += u * v1
        a22 += u * v2
        a23 += u * v3
        u = x3[k]
        a30 += u * v0
        a31 += u * v1
        a32 += u * v2
        a33 += u * v3
    o = out[t]
    o[n0], o[n0 + 1], o[n0 + 2], o[n0 + 3] = a00, a01, a02, a03
    o = out[t + 1]
    o[n0], o[n0 + 1], o[n0 + 2], o[n0 + 3] = a10, a11, a12, a13
    o = out[t + 2]
    o[n0], o[n0 + 1], o[n0 + 2], o[n0 + 3] = a20, a21, a22, a23
    o = out[t + 3]
    o[n0], o[n0 + 1], o[n0 + 2], o[n0 + 3] = a30, a31, a32, a33


@jit
def _dot_1x4(out, x, s, t, n0, K):
    """out[t, n0:n0+4] = x[t] . s[0:4]  (decode: T = 1, and prefill's leftover tokens)"""
    x0 = x[t]
    w0, w1, w2, w3 = s[0], s[1], s[2], s[3]
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(K):
        u = x0[k]
        a0 += u * w0[k]
        a1 += u * w1[k]
        a2 += u * w2[k]
        a3 += u * w3[k]
    o = out[t]
    o[n0], o[n0 + 1], o[n0 + 2], o[n0 + 3] = a0, a1, a2, a3


@jit
def _dot_1x1(x0, w0, K):
    """x0 . w0 (the last rows of a matrix whose N is not a multiple of TILE)"""
    a = np.float32(0.0)
    for k in range(K):
        a += x0[k] * w0[k]
    return a


@jit
def _dot_tile(out, x, s, n0, nr, K):
    """out[:, n0:n0+nr] = x . s[0:nr]: 4 tokens x 4 rows at a time, then the leftovers.

    Token groups are the outer loop so a group's 4 activation rows stay in L1 while every row
    group of the tile streams past them."""
    T = x.shape[0]
    nr4 = nr - nr % 4
    t = 0
    while t + TOK <= T:
        for r in range(0, nr4, 4):
            _dot_4x4(out, x, s[r:r + 4], t, n0 + r, K)
        t += TOK
    for t in range(t, T):
        for r in range(0, nr4, 4):
            _dot_1x4(out, x, s[r:r + 4], t, n0 + r, K)
    for t in range(T):
        for r in range(nr4, nr):
            out[t, n0 + r] = _dot_1x1(x[t], s[r], K)


@pjit
def _matmul_kernel(out, x, w, qtype, tile, n_threads):
    N = w.shape[0]
    K = x.shape[1]
    n_tiles = (N + tile - 1) // tile
    # One contiguous range of tiles per thread: the work per tile is uniform, and allocating the
    # scratch once per range (not per tile) keeps the allocator out of the loop.
    # (n_threads comes from the caller: numba.get_num_threads() inside a kernel would stop it
    # from being cached on disk.)
    n_chunks = max(1, min(n_tiles, n_threads))
    for c in prange(n_chunks):
        scratch = np.empty((tile, K), np.float32)
        for i in range(c * n_tiles // n_chunks, (c + 1) * n_tiles // n_chunks):
            n0 = i * tile
            nr = min(tile, N - n0)
            for r in range(nr):
                decode_row(w[n0 + r], qtype, scratch[r])
            _dot_tile(out, x, scratch, n0, nr, K)


def tile_rows(T: int, K: int) -> int:
    """Weight rows decoded per tile. With one or two tokens, 4 rows: the tile stays in L1 between
    its decode and its dots. With more tokens every tile streams all T activation rows past it,
    so a bigger tile (up to 64 rows or ~768 KiB, which stays in a 1-2 MiB L2) cuts that traffic
    as many times; measured on prefill shapes, past L2 it gets slower again."""
    if T <= 2:
        return TILE
    return max(TILE, min(64, (768 * 1024) // (4 * K)) // TILE * TILE)


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


def matmul(out: np.ndarray, x: np.ndarray, w: np.ndarray, qtype) -> np.ndarray:
    """out[T, N] = x[T, K] @ W.T, W being the N x K matrix stored as raw rows `w` of type `qtype`."""
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError("x must be a 2-D float32 array [T, K]")
    T, K = x.shape
    t = _check_weights(w, qtype, K)
    _check_f32(x, "x", (T, K))
    if not (isinstance(out, np.ndarray) and out.flags.writeable):
        raise ValueError("out must be a writable array")
    _check_f32(out, "out", (T, w.shape[0]))
    if T and w.shape[0]:
        _matmul_kernel(out, x, w, t.id, tile_rows(T, K), get_num_threads())
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


def matmul_ref(x: np.ndarray, w: np.ndarray, qtype) -> np.ndarray:
    """float64 x @ W.T, W decoded by gguf-py."""
    return np.asarray(x, np.float64) @ _ref_weights(w, qtype).T


def get_rows_ref(w: np.ndarray, qtype, ids) -> np.ndarray:
    """float64 rows `ids` of W, decoded by gguf-py."""
    return _ref_weights(np.asarray(w)[np.asarray(ids, np.int64).reshape(-1)], qtype)
