"""Integer matrix products over repacked weights: the fast CPU path.

A quantized weight matrix (N rows of K weights, raw GGUF rows) is repacked once, at load time,
into groups of GROUP = 16 rows. Within a group the blocks of the 16 rows are interleaved so that
one 64-byte vector holds 4 consecutive weights of each of the 16 rows, already unsigned and in
the order the dot wants them: a vector of 16 int32 lanes, one lane per row, then accumulates
`u8 weight x s8 activation` four products at a time (`simd.dot4`: one `vpdpbusd` with
AVX-512 VNNI, its form for each other instruction-set level elsewhere). Scales and
mins sit beside the quants of each block as plain per-row arrays (f16 scales, 6-bit sub-block
scales unpacked to bytes), so the inner loop is straight-line loads, nibble masks and dots.

Activations are quantized once per product to int8, exactly as llama.cpp does for the weight
type (Q8_0 per 32, Q8_1 per 32 with its f16 block sum, Q8_K per 256); the products are exact
int32 sums, converted to float once per block. A signed weight type is stored with an offset
(Q4_0 + 8, Q5_0 + 16, Q6_K + 32; Q8_0 + simd.Q8_BIAS: 128 for `vpdpbusd`, 0 elsewhere) that
the activation block sums take back out.

Repacked layouts (bytes per block of 16 rows; `_LAYOUT` has the sizes):
  32-blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0):
    d f16[16] | m f16[16] (Q4_1, Q5_1) | hb u8x64 (Q5_*) | quants
    Q8_0 quants: 8 vectors, vector c = weights 4c..4c+3 of each row (+ Q8_BIAS).
    4/5-bit quants: 4 vectors, vector c low nibbles = weights 4c..4c+3, high = 16+4c..16+4c+3;
    hb byte (row, i) bit c = 5th bit of weight 4c+i.
  Q4_K (256 weights): d f16[16] | dmin f16[16] | sc u8[8][16] | m u8[8][16] | 32 vectors:
    vector 8*jj+c low nibbles = weights 64jj+4c.., high nibbles = 64jj+32+4c..
  Q6_K (256 weights): d f16[16] | sc i8[16][16] | 32 nibble vectors: vector c low = weights
    4c.., high = 128+4c.. | 16 high-bit vectors: vector h bits 2f..2f+1 = top 2 bits of
    weights 64f+4h..

Prefill runs tiles of TILE tokens through each group while its weights are in L1/L2 (the
accumulators of a tile stay in registers); decoding takes the same code with a tile of 1.
The oracle is `matmul.matmul_ref` (float64 over gguf-py's decoder).
"""
from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import get_num_threads

from ..._numba import jit, pjit, prange
from .matmul import ACT_SCHEME, QScratch, _check_f32, _check_weights, quantize_q8  # noqa: F401 (QScratch re-exported)
from .simd import (Q8_BIAS, TILE, add_i32, dot4, dot4_q8, f32x16_buffer, fma_f32, get, hi_nibbles, i32x16_buffer, load_f16x16,
                   load_i8x16, load_u8x16, load_u8x64, lo_nibbles, mul_f32, mul_i32, or_u8x64, prefetch, put, shl_u8,
                   shr_u8, and_u8, splat_f32, splat_i32, store_f32x16, sub_i32, to_f32, zeros_f32x16,
                   zeros_i32x16)

GROUP = 16   # weight rows interleaved together: one int32 lane each
PREFETCH = 8192  # bytes ahead of the loads that the kernels ask the cache for (past the end is harmless)

_Q = GGMLQuantizationType
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K = (int(_Q.Q4_0), int(_Q.Q4_1), int(_Q.Q5_0), int(_Q.Q5_1),
                                            int(_Q.Q8_0), int(_Q.Q4_K), int(_Q.Q6_K))

#: qtype -> (weights per block, bytes per block of GROUP rows) of the repacked layout.
_LAYOUT = {Q4_0: (32, 288), Q4_1: (32, 320), Q5_0: (32, 352), Q5_1: (32, 384), Q8_0: (32, 544),
           Q4_K: (256, 2368), Q6_K: (256, 3360)}
#: Layout version: part of the on-disk cache key (with the level: Q8_0's bytes follow it),
#: bump it when a layout changes.
LAYOUT_VERSION = 2


def packable(qtype) -> bool:
    return int(qtype) in _LAYOUT


class PackedMatrix:
    """A weight matrix repacked for `qmatmul`: `data` is uint8 [ceil(N/16), K/block * unit]."""

    def __init__(self, name: str, qtype: int, n: int, k: int, data: np.ndarray):
        data = data.view()
        data.flags.writeable = False  # read-only, mapped from the cache or not: one kernel signature
        self.name, self.qtype, self.n, self.k, self.data = name, int(qtype), n, k, data
        self.scheme = ACT_SCHEME[self.qtype]  # how activations are quantized for it (products fuse when equal)

    @staticmethod
    def nbytes_for(qtype, n: int, k: int) -> int:
        block, unit = _LAYOUT[int(qtype)]
        return -(-n // GROUP) * (k // block) * unit


# ---------------------------------------------------------------------------------------------
# Repacking (NumPy, a slab of groups at a time so temporaries stay small).


def _f16_lanes(blk, o):
    """[G, 16, nb, bs] blocks -> [G, nb, 32]: the f16 at byte o of each row's block, row-major."""
    G, R, nb, _ = blk.shape
    return blk[..., o:o + 2].transpose(0, 2, 1, 3).reshape(G, nb, 2 * R)


def _vectors(q, n_chunks):
    """Unsigned quants [G, 16, nb, 4*n_chunks] -> [G, nb, n_chunks * 64]: chunk c of 4 weights
    of every row, row-major, one 64-byte vector per chunk."""
    G, R, nb, _ = q.shape
    return q.reshape(G, R, nb, n_chunks, 4).transpose(0, 2, 3, 1, 4).reshape(G, nb, n_chunks * 64)




def _hb_vector(hi):
    """5th bits [G, 16, nb, 32] -> one vector per block: byte (row, i) bit c = bit of weight 4c+i."""
    G, R, nb, _ = hi.shape
    h = hi.reshape(G, R, nb, 8, 4).astype(np.uint8)   # [.., c, i]
    byte = np.zeros((G, R, nb, 4), np.uint8)
    for c in range(8):
        byte |= h[:, :, :, c, :] << c
    return byte.transpose(0, 2, 1, 3).reshape(G, nb, 64)


def _q4k_scales(s):
    """Q4_K's 12 packed scale bytes [..., 12] -> (sc, m) each [..., 8] (6-bit values)."""
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    m = np.empty_like(sc)
    sc[..., :4], m[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, m


def _lanes(a):
    """[G, 16, nb, n] per-row bytes -> [G, nb, n * 16]: value j of the 16 rows together."""
    G, R, nb, n = a.shape
    return a.transpose(0, 2, 3, 1).reshape(G, nb, n * R)


def _q6k_values(blk):
    """Q6_K blocks [..., 210] -> unsigned 6-bit values [..., 256] (the weight + 32)."""
    ql, qh = blk[..., 0:128], blk[..., 128:192]
    q = np.empty(blk.shape[:-1] + (256,), np.uint8)
    for n in range(2):
        l_lo, l_hi, h = ql[..., 64 * n:64 * n + 32], ql[..., 64 * n + 32:64 * n + 64], qh[..., 32 * n:32 * n + 32]
        o = 128 * n
        q[..., o:o + 32] = (l_lo & 0xF) | ((h & 3) << 4)
        q[..., o + 32:o + 64] = (l_hi & 0xF) | (((h >> 2) & 3) << 4)
        q[..., o + 64:o + 96] = (l_lo >> 4) | (((h >> 4) & 3) << 4)
        q[..., o + 96:o + 128] = (l_hi >> 4) | (((h >> 6) & 3) << 4)
    return q


def _pack_slab(blk, qtype):
    """Blocks of G groups [G, 16, nb, type_size] -> repacked [G, nb, unit]."""
    parts = []
    if qtype == Q8_0:
        q = blk[..., 2:34] ^ np.uint8(Q8_BIAS)
        parts = [_f16_lanes(blk, 0), _vectors(q, 8)]
    elif qtype in (Q4_0, Q4_1, Q5_0, Q5_1):
        has_min = qtype in (Q4_1, Q5_1)
        qo = {Q4_0: 2, Q4_1: 4, Q5_0: 6, Q5_1: 8}[qtype]
        parts = [_f16_lanes(blk, 0)] + ([_f16_lanes(blk, 2)] if has_min else [])
        if qtype in (Q5_0, Q5_1):
            parts.append(_hb_vector(np.unpackbits(blk[..., qo - 4:qo], axis=-1, bitorder="little")))
        parts.append(_vectors(blk[..., qo:qo + 16], 4))
    elif qtype == Q4_K:
        sc, m = _q4k_scales(blk[..., 4:16])
        qs = blk[..., 16:144].reshape(blk.shape[:3] + (4, 32))            # [.., jj, byte]
        parts = [_f16_lanes(blk, 0), _f16_lanes(blk, 2), _lanes(sc), _lanes(m),
                 _vectors(qs.reshape(blk.shape[:3] + (128,)), 32)]
    elif qtype == Q6_K:
        q = _q6k_values(blk)                                            # [.., 256]
        nib = (q[..., :128] & 0xF) | ((q[..., 128:] & 0xF) << 4)
        top = q >> 4                                                    # 2 bits
        hb = top[..., 0:64] | (top[..., 64:128] << 2) | (top[..., 128:192] << 4) | (top[..., 192:256] << 6)
        parts = [_f16_lanes(blk, 208), _lanes(blk[..., 192:208]), _vectors(nib, 32), _vectors(hb, 16)]
    return np.concatenate(parts, axis=-1)


def repack(name: str, raw: np.ndarray, qtype, k: int, out: np.ndarray | None = None,
           slab_rows: int = 4096) -> PackedMatrix:
    """Repack raw GGUF rows [N, row_bytes] of `qtype` into a PackedMatrix (written into `out`,
    e.g. a memory-mapped cache file, when given). Rows past N are zero (they come out 0)."""
    t = _check_weights(raw, qtype, k)
    qt = t.id
    n = raw.shape[0]
    block, unit = _LAYOUT[qt]
    nb, G = k // block, -(-n // GROUP)
    if out is None:
        out = np.empty((G, nb * unit), np.uint8)
    slab = max(1, slab_rows // GROUP)
    for g0 in range(0, G, slab):
        g1 = min(G, g0 + slab)
        rows = raw[g0 * GROUP:min(n, g1 * GROUP)]
        if rows.shape[0] < (g1 - g0) * GROUP:  # pad the last group with zero rows
            rows = np.concatenate([rows, np.zeros(((g1 - g0) * GROUP - rows.shape[0], rows.shape[1]), np.uint8)])
        blk = np.asarray(rows).reshape(g1 - g0, GROUP, nb, t.type_size)
        out[g0:g1] = _pack_slab(blk, qt).reshape(g1 - g0, nb * unit)
    return PackedMatrix(name, qt, n, k, out)


# ---------------------------------------------------------------------------------------------
# One group of 16 rows times a tile of `nt` tokens (nt is a compile-time constant: the
# accumulators of the tile are then registers). out[t0 + t, 16g : 16g + 16] for t < nt.


@jit(inline="always")
def _zero_f(acc, nt):
    for t in range(nt):
        put(acc, t, zeros_f32x16())


@jit(inline="always")
def _store_tile(out, col, acc, t0, nt):
    """out[t0 + t, col : col + 16] = acc[t] for the tile's tokens (fewer columns at the end)."""
    for t in range(nt):
        store_f32x16(out[t0 + t], col, get(acc, t), min(GROUP, out.shape[1] - col))


@jit
def _group_b32(out, u, col, qtype, xq, xd, xs, xm, t0, nt):
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: blocks of 32 weights, one scale (and min) per block.
    qtype is a compile-time constant too: each type gets its own branch-free loop."""
    numba.literally(nt)
    numba.literally(qtype)
    has_min = qtype == Q4_1 or qtype == Q5_1
    five = qtype == Q5_0 or qtype == Q5_1
    unit = 544 if qtype == Q8_0 else 288 + 32 * has_min + 64 * five
    qo = 32 + 32 * has_min + 64 * five
    # The unsigned storage offset of the type, taken back out with the activations' block sums.
    off = Q8_BIAS if qtype == Q8_0 else (8 if qtype == Q4_0 else (16 if qtype == Q5_0 else 0))
    acc = f32x16_buffer(nt)
    isum = i32x16_buffer(nt)
    _zero_f(acc, nt)
    for b in range(xq.shape[1] // 32):
        o = b * unit
        for t in range(nt):
            put(isum, t, zeros_i32x16())
        if qtype == Q8_0:
            for c in range(8):
                prefetch(u, o + PREFETCH + qo + 64 * c)
                v = load_u8x64(u, o + qo + 64 * c)
                for t in range(nt):
                    put(isum, t, dot4_q8(get(isum, t), v, xq[t0 + t], 32 * b + 4 * c))
        else:
            hb = load_u8x64(u, o + qo - 64) if five else load_u8x64(u, o)
            prefetch(u, o + PREFETCH)
            for c in range(4):
                prefetch(u, o + PREFETCH + qo + 64 * c)
                v = load_u8x64(u, o + qo + 64 * c)
                lo, hi = lo_nibbles(v), hi_nibbles(v)
                if five:
                    lo = or_u8x64(lo, and_u8(shl_u8(hb, 4 - c), 16))
                    hi = or_u8x64(hi, and_u8(shr_u8(hb, c), 16))
                for t in range(nt):
                    s = dot4(get(isum, t), lo, xq[t0 + t], 32 * b + 4 * c)
                    put(isum, t, dot4(s, hi, xq[t0 + t], 32 * b + 16 + 4 * c))
        d = load_f16x16(u, o)
        for t in range(nt):
            s = get(isum, t)
            if off:
                s = sub_i32(s, splat_i32(off * (xs[t0 + t, 2 * b] + xs[t0 + t, 2 * b + 1])))
            a = fma_f32(mul_f32(d, splat_f32(xd[t0 + t, b])), to_f32(s), get(acc, t))
            if has_min:
                a = fma_f32(load_f16x16(u, o + 32), splat_f32(xm[t0 + t, b]), a)
            put(acc, t, a)
    _store_tile(out, col, acc, t0, nt)


@jit(inline="always")
def _zero(bufs_nt, a, b):
    """a[t] = b[t] = 0 for the tile's nt tokens."""
    for t in range(bufs_nt):
        put(a, t, zeros_i32x16())
        put(b, t, zeros_i32x16())


@jit(inline="always")
def _add_scaled(isum, msum, slo, shi, sc0, sc1, m0, m1, s0, s1, t):
    """For token t of a tile: isum += sc0 * slo + sc1 * shi (two sub-blocks' dots times their
    per-row scales) and msum += m0 * s0 + m1 * s1 (per-row mins or scales times the
    activations' sub-block sums: the min or offset term)."""
    put(isum, t, add_i32(get(isum, t), add_i32(mul_i32(sc0, get(slo, t)), mul_i32(sc1, get(shi, t)))))
    put(msum, t, add_i32(get(msum, t), add_i32(mul_i32(m0, splat_i32(s0)), mul_i32(m1, splat_i32(s1)))))


@jit
def _group_q4k(out, u, col, xq, xd, xs, t0, nt):
    """Q4_K: super-blocks of 256, 8 sub-blocks of 32 with 6-bit scales and mins."""
    numba.literally(nt)
    acc = f32x16_buffer(nt)
    isum, msum = i32x16_buffer(nt), i32x16_buffer(nt)
    slo, shi = i32x16_buffer(nt), i32x16_buffer(nt)
    _zero_f(acc, nt)
    for b in range(xq.shape[1] // 256):
        o = b * 2368
        _zero(nt, isum, msum)
        for jj in range(4):  # sub-blocks 2jj (low nibbles) and 2jj+1 (high nibbles)
            _zero(nt, slo, shi)
            xo = 256 * b + 64 * jj
            for c in range(8):
                prefetch(u, o + PREFETCH + 320 + 64 * (8 * jj + c))
                v = load_u8x64(u, o + 320 + 64 * (8 * jj + c))
                lo, hi = lo_nibbles(v), hi_nibbles(v)
                for t in range(nt):
                    put(slo, t, dot4(get(slo, t), lo, xq[t0 + t], xo + 4 * c))
                    put(shi, t, dot4(get(shi, t), hi, xq[t0 + t], xo + 32 + 4 * c))
            sc0, sc1 = load_u8x16(u, o + 64 + 32 * jj), load_u8x16(u, o + 80 + 32 * jj)
            m0, m1 = load_u8x16(u, o + 192 + 32 * jj), load_u8x16(u, o + 208 + 32 * jj)
            for t in range(nt):
                xs_t = xs[t0 + t]
                _add_scaled(isum, msum, slo, shi, sc0, sc1, m0, m1,
                            xs_t[16 * b + 4 * jj] + xs_t[16 * b + 4 * jj + 1],
                            xs_t[16 * b + 4 * jj + 2] + xs_t[16 * b + 4 * jj + 3], t)
        d, dmin = load_f16x16(u, o), load_f16x16(u, o + 32)
        for t in range(nt):
            dx = splat_f32(xd[t0 + t, b])
            a = fma_f32(mul_f32(d, dx), to_f32(get(isum, t)), get(acc, t))
            put(acc, t, fma_f32(mul_f32(dmin, dx), to_f32(sub_i32(zeros_i32x16(), get(msum, t))), a))
    _store_tile(out, col, acc, t0, nt)


@jit(inline="always")
def _q6k_top(h, f):
    """Bits 2f, 2f+1 of each byte of h, moved to bits 4, 5."""
    return and_u8(shl_u8(h, 4 - 2 * f), 0x30) if f <= 2 else and_u8(shr_u8(h, 2), 0x30)


@jit(inline="always")
def _q6k_half(u, o, xq, xs, b, t0, nt, isum, msum, slo, shi, f):
    """Sub-blocks 4f..4f+3 (low nibbles) and 8+4f.. (high) of super-block b; f is a constant
    (0 or 1) once inlined, so the bit shifts are immediates."""
    for s in range(4 * f, 4 * f + 4):
        _zero(nt, slo, shi)
        for c in range(4 * s, 4 * s + 4):
            prefetch(u, o + PREFETCH + 288 + 64 * c)
            v = load_u8x64(u, o + 288 + 64 * c)
            h = load_u8x64(u, o + 2336 + 64 * (c - 16 * f))
            lo = or_u8x64(lo_nibbles(v), _q6k_top(h, f))
            hi = or_u8x64(hi_nibbles(v), _q6k_top(h, f + 2))
            for t in range(nt):
                put(slo, t, dot4(get(slo, t), lo, xq[t0 + t], 256 * b + 4 * c))
                put(shi, t, dot4(get(shi, t), hi, xq[t0 + t], 256 * b + 128 + 4 * c))
        sc0, sc1 = load_i8x16(u, o + 32 + 16 * s), load_i8x16(u, o + 32 + 16 * (s + 8))
        for t in range(nt):
            _add_scaled(isum, msum, slo, shi, sc0, sc1, sc0, sc1, xs[t0 + t, 16 * b + s], xs[t0 + t, 16 * b + s + 8], t)


@jit
def _group_q6k(out, u, col, xq, xd, xs, t0, nt):
    """Q6_K: super-blocks of 256, 16 sub-blocks of 16 with int8 scales, weights - 32."""
    numba.literally(nt)
    acc = f32x16_buffer(nt)
    isum, msum = i32x16_buffer(nt), i32x16_buffer(nt)
    slo, shi = i32x16_buffer(nt), i32x16_buffer(nt)
    _zero_f(acc, nt)
    for b in range(xq.shape[1] // 256):
        o = b * 3360
        _zero(nt, isum, msum)
        _q6k_half(u, o, xq, xs, b, t0, nt, isum, msum, slo, shi, 0)
        _q6k_half(u, o, xq, xs, b, t0, nt, isum, msum, slo, shi, 1)
        d = load_f16x16(u, o)
        for t in range(nt):
            s32 = sub_i32(get(isum, t), mul_i32(get(msum, t), splat_i32(32)))
            put(acc, t, fma_f32(mul_f32(d, splat_f32(xd[t0 + t, b])), to_f32(s32), get(acc, t)))
    _store_tile(out, col, acc, t0, nt)


@jit
def _group(out, u, col, qtype, xq, xd, xs, xm, t0, nt):
    numba.literally(nt)
    if qtype == Q4_K:
        _group_q4k(out, u, col, xq, xd, xs, t0, nt)
    elif qtype == Q6_K:
        _group_q6k(out, u, col, xq, xd, xs, t0, nt)
    elif qtype == Q8_0:
        _group_b32(out, u, col, Q8_0, xq, xd, xs, xm, t0, nt)
    elif qtype == Q4_0:
        _group_b32(out, u, col, Q4_0, xq, xd, xs, xm, t0, nt)
    elif qtype == Q4_1:
        _group_b32(out, u, col, Q4_1, xq, xd, xs, xm, t0, nt)
    elif qtype == Q5_0:
        _group_b32(out, u, col, Q5_0, xq, xd, xs, xm, t0, nt)
    else:
        _group_b32(out, u, col, Q5_1, xq, xd, xs, xm, t0, nt)


@jit
def _all_tokens(out, col, u, qtype, xq, xd, xs, xm):
    """One group of rows times every token: tiles of TILE tokens, then the rest in tiles of 4
    (where TILE is 8), 2 and 1, so that a batch of 2 or 3 sequences' tokens still reads each
    weight once per tile rather than once per token."""
    T = xq.shape[0]
    t0 = 0
    while t0 + TILE <= T:
        _group(out, u, col, qtype, xq, xd, xs, xm, t0, TILE)
        t0 += TILE
    if TILE > 4 and t0 + 4 <= T:
        _group(out, u, col, qtype, xq, xd, xs, xm, t0, 4)
        t0 += 4
    if t0 + 2 <= T:
        _group(out, u, col, qtype, xq, xd, xs, xm, t0, 2)
        t0 += 2
    if t0 < T:
        _group(out, u, col, qtype, xq, xd, xs, xm, t0, 1)


@pjit
def _qmatmul_kernel(out0, w0, q0, out1, w1, q1, out2, w2, q2, xq, xd, xs, xm, n_threads):
    """Up to three products of the same activations (Q, K, V or gate, up) in one parallel
    region; an unused one has zero groups. Each thread takes one contiguous range of the
    groups of all three (the work per group is uniform)."""
    G0, G1 = w0.shape[0], w1.shape[0]
    G = G0 + G1 + w2.shape[0]
    n_chunks = max(1, min(G, n_threads))
    for c in prange(n_chunks):
        for g in range(c * G // n_chunks, (c + 1) * G // n_chunks):
            if g < G0:
                _all_tokens(out0, GROUP * g, w0[g], q0, xq, xd, xs, xm)
            elif g < G0 + G1:
                _all_tokens(out1, GROUP * (g - G0), w1[g - G0], q1, xq, xd, xs, xm)
            else:
                _all_tokens(out2, GROUP * (g - G0 - G1), w2[g - G0 - G1], q2, xq, xd, xs, xm)


_NO_OUT = np.zeros((0, 0), np.float32)
_NO_W = np.zeros((0, GROUP), np.uint8)
_NO_W.flags.writeable = False  # as every PackedMatrix's data: one compiled signature


def qmatmul(outs, x: np.ndarray, ws, scratch: QScratch | None = None, n_threads: int | None = None):
    """outs[i][T, N_i] = x[T, K] @ W_i.T over repacked W_i (one PackedMatrix and out, or up to
    three of each sharing x and its activation quantization), x quantized once as llama.cpp
    does. Returns outs."""
    if isinstance(ws, PackedMatrix):
        outs_l, ws_l = [outs], [ws]
    else:
        outs_l, ws_l = list(outs), list(ws)
    if not 1 <= len(ws_l) <= 3 or len(outs_l) != len(ws_l) or len({w.scheme for w in ws_l}) != 1:
        raise ValueError("qmatmul takes 1 to 3 matrices with one activation scheme, and as many outputs")
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError("x must be a 2-D float32 array [T, K]")
    T, K = x.shape
    _check_f32(x, "x", (T, K))
    for out, w in zip(outs_l, ws_l):
        if K != w.k:
            raise ValueError(f"{w.name} takes rows of {w.k} values, x has {K}")
        if not (isinstance(out, np.ndarray) and out.flags.writeable and out.ndim == 2 and out.dtype == np.float32
                and out.shape == (T, w.n) and out.strides[1] == 4):
            raise ValueError(f"out must be a writable float32 array of shape {(T, w.n)} with contiguous rows")
    if T:
        qmatmul_unchecked(outs_l, x, ws_l, scratch or QScratch(T, K), n_threads or get_num_threads())
    return outs


def qmatmul_unchecked(outs, x, ws, scratch: QScratch, n_threads: int) -> None:
    """`qmatmul` for callers whose shapes are right by construction (the model's forward: every
    matrix was shape-checked at load and the RunState is sized from the same Config): 1 to 3
    matrices of one activation scheme, no checks, a few microseconds less per product."""
    T, K = x.shape
    xq, xd, xs, xm = scratch.views(T, K)
    quantize_q8(xq, xd, xs, xm, x, ws[0].scheme)
    n = len(ws)
    w1, w2 = ws[1] if n > 1 else None, ws[2] if n > 2 else None
    _qmatmul_kernel(outs[0], ws[0].data, ws[0].qtype,
                    outs[1] if w1 else _NO_OUT, w1.data if w1 else _NO_W, w1.qtype if w1 else Q8_0,
                    outs[2] if w2 else _NO_OUT, w2.data if w2 else _NO_W, w2.qtype if w2 else Q8_0,
                    xq, xd, xs, xm, n_threads)
