"""Quantized weight matrices on the GPU: their device layout, upload, and the per-type unit loaders
that every product kernel (qmatmul.py and the modules it dispatches to) reads weights through.

Device layout (`DeviceMatrix`, made once at upload). A GGUF block interleaves its fields (scales,
high bits, quants) in 18-, 20-, 22-, 34- or 210-byte records, so most blocks do not start on a
16-byte boundary. At upload each field is split into its own stream, row-major, all in one
uint32 array: `qs` (the 4-bit or 8-bit quants), `qh` (5th / 5th-6th bits, where the type has
them) and `sc` (f16 scales and mins, K-quant sub-block scales). A warp then reads a row's quants
as consecutive 16-byte loads (`ptx.ldg4`, 512 bytes a warp instruction, through the read-only
cache). Bytes per weight stay GGUF's (Q6_K: +2 bytes of padding per 210-byte block).

Arithmetic, as llama.cpp's CUDA backend does it (mmvq): activations are quantized once per
product to int8 with a float scale per 32 values (q8_1, q8.py: written by `quantize_act` in
ops.py, or in decode steps by the kernel that makes the values); a weight "unit" is 32 weights =
two halves of 16, each half with its own scale d and offset m (w = d * q + m, q the stored small
integer); a half's dot is 4 `dp4a` of packed bytes, and

    x . w  =  xd * (d0 * dot(q, xq)_0 + m0 * sum(xq)_0 + d1 * dot_1 + m1 * sum_1)

where sum(xq) over 16 values comes from xs. Per type only `_unit_<type>` (`UNITS`) differs: where
a unit's weights, scales and activations are. `_dots` makes the unit's dot with the activations
(read from global or from shared memory); `_store` is every product's plain epilogue.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import cuda

from ..._numba import cuda_jit
from ...errors import NumbaAprError
from . import ptx

WARPS = 4            # rows (warps) per block

# Per type: GGUF block (weights, bytes) and its fields as (stream, byte offset, bytes); the
# streams are laid out row-major in that order, a field padded to whole 32-bit words per block
# (a lone 2-byte f16 scale is packed two blocks a word instead).
_FIELDS = {
    Q.Q4_0: (32, 18, (("sc", 0, 2), ("qs", 2, 16))),
    Q.Q4_1: (32, 20, (("sc", 0, 4), ("qs", 4, 16))),
    Q.Q5_0: (32, 22, (("sc", 0, 2), ("qh", 2, 4), ("qs", 6, 16))),
    Q.Q5_1: (32, 24, (("sc", 0, 4), ("qh", 4, 4), ("qs", 8, 16))),
    Q.Q8_0: (32, 34, (("sc", 0, 2), ("qs", 2, 32))),
    Q.Q4_K: (256, 144, (("sc", 0, 16), ("qs", 16, 128))),   # sc: 16 -> 20 bytes, see _unpack_k4
    Q.Q5_K: (256, 176, (("sc", 0, 16), ("qh", 16, 32), ("qs", 48, 128))),
    Q.Q6_K: (256, 210, (("sc", 192, 18), ("qh", 128, 64), ("qs", 0, 128))),
}
FLOAT_TYPES = {Q.F32: 0, Q.F16: 1, Q.BF16: 2}
SUPPORTED = tuple(_FIELDS) + tuple(FLOAT_TYPES)


@dataclass
class DeviceMatrix:
    """One weight matrix on the device: [rows, K] of one GGUF type, split into streams."""
    qtype: int
    rows: int
    K: int
    w: object          # uint32 device array: qs rows, then qh rows, then sc rows
    o_qh: int          # word offset of the qh stream
    o_sc: int          # word offset of the sc stream
    s_qs: int          # words per row of each stream
    s_qh: int
    s_sc: int

    @property
    def nbytes(self) -> int:
        return self.w.size * 4


def _unpack_k4(hdr: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K headers [..., 16] (f16 d, f16 dmin, 12 bytes of 6-bit scales and mins) ->
    [..., 20]: d, dmin, then per 32-byte chunk c of quants (sub-blocks 2c and 2c + 1, the low
    and high nibbles) the word [scale 2c, scale 2c + 1, min 2c, min 2c + 1]: a unit reads its
    four bytes in one load. Decoding the 6-bit packing took more instructions than the dot
    itself (measured 810 GB/s on a Q4_K product, against 2170 for Q8_0); 4 more bytes per 256
    weights is +2.8% of the bytes read."""
    q = hdr[..., 4:16].astype(np.uint16)
    sc, mn = np.empty(hdr.shape[:-1] + (8,), np.uint8), np.empty(hdr.shape[:-1] + (8,), np.uint8)
    sc[..., :4], mn[..., :4] = q[..., 0:4] & 63, q[..., 4:8] & 63
    sc[..., 4:] = (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    words = np.stack([sc.reshape(sc.shape[:-1] + (4, 2)), mn.reshape(mn.shape[:-1] + (4, 2))], axis=-2)
    return np.concatenate([hdr[..., :4], words.reshape(hdr.shape[:-1] + (16,))], axis=-1)


def _split_streams(raw: np.ndarray, qtype: int) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """Host side of the upload: raw [rows, row bytes] -> (words, offsets, words per row)."""
    bs, bb, fields = _FIELDS[qtype]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, bb)
    nb = blocks.shape[1]
    parts, offs, strides, off = {}, {}, {}, 0
    for name in ("qs", "qh", "sc"):
        f = [fl for fl in fields if fl[0] == name]
        if not f:
            parts[name], offs[name], strides[name] = None, off, 0
            continue
        _, o, n = f[0]
        field = blocks[:, :, o:o + n]
        if name == "sc" and qtype in (Q.Q4_K, Q.Q5_K):
            field, n = _unpack_k4(field), 20
        if n == 2:   # a lone f16 scale: packed two blocks a word, the row padded to whole words
            a = np.zeros((rows, (nb + 1) // 2 * 2, 2), np.uint8)
        else:        # each block's field padded to whole words (Q6_K: 18 -> 20 bytes)
            a = np.zeros((rows, nb, (n + 3) // 4 * 4), np.uint8)
        a[:, :nb, :n] = field
        parts[name] = a.reshape(rows, -1).view(np.uint32)
        offs[name], strides[name] = off, parts[name].shape[1]
        off += parts[name].size
    words = np.concatenate([p.reshape(-1) for p in parts.values() if p is not None])
    return words, (offs["qh"], offs["sc"]), (strides["qs"], strides["qh"], strides["sc"])


def upload(raw: np.ndarray, qtype: int, K: int, stream=0) -> DeviceMatrix:
    """Copy one GGUF matrix to the device in the streamed layout (float types as they are)."""
    rows = raw.shape[0]
    if qtype in FLOAT_TYPES:
        words = np.ascontiguousarray(raw).reshape(-1).view(np.uint32)
        return DeviceMatrix(qtype, rows, K, cuda.to_device(words, stream=stream), 0, 0,
                            words.size // rows, 0, 0)
    if qtype not in _FIELDS:
        raise NumbaAprError(f"tensor type {Q(qtype).name} has no CUDA kernel")
    if K % 32:
        raise NumbaAprError(f"row length {K} is not a multiple of 32")
    words, (o_qh, o_sc), (s_qs, s_qh, s_sc) = _split_streams(np.ascontiguousarray(raw), qtype)
    return DeviceMatrix(qtype, rows, K, cuda.to_device(words, stream=stream), o_qh, o_sc, s_qs, s_qh, s_sc)


def concat(mats: list[np.ndarray]) -> np.ndarray:
    """Row-concatenate raw matrices of one type (Q/K/V or gate/up into one product)."""
    return np.concatenate([np.ascontiguousarray(m) for m in mats], axis=0)


# ---------------------------------------------------------------------------------------------
# Units: for weight unit u of row r, the 4 + 4 int32 words of quants (bytes, 16 per half), the
# half scales/offsets (d0, m0, d1, m1) and the index in x of each half's first element.

@cuda_jit(device=True, inline=True)
def _ld(a, i):
    """a[i] for an index known not to be negative: numba's wraparound of a negative index costs
    ~5 instructions a load, and a Q4_K unit makes 6 scalar loads (2 of scales, 4 of the
    activations' xs / xd)."""
    return a[np.uint64(i)]


@cuda_jit(device=True, inline=True)
def _ld2(a, i, j):
    """a[i, j], both known not to be negative (see _ld)."""
    return a[np.uint64(i), np.uint64(j)]


@cuda_jit(device=True)
def _h16(w, o, j):
    """j-th f16 of a stream of packed f16 pairs starting at word o, as float32."""
    v = w[o + (j >> 1)]      # (not _ld: slower on the device, docs/experiments.md#fewer-instructions-a-unit)
    return ptx.f16_bits((v >> ((j & 1) * 16)) & 0xFFFF)


@cuda_jit(device=True)
def _spread4(b):
    """The 4 low bits of b to bit 4 of each of 4 bytes (the 5th bit of 4 quants)."""
    return (((b & 0xF) * 0x00204081) & 0x01010101) << 4


@cuda_jit(device=True)
def _nib(a, b, c, d, shift):
    m = 0x0F0F0F0F
    return (a >> shift) & m, (b >> shift) & m, (c >> shift) & m, (d >> shift) & m


@cuda_jit(device=True)
def _unit_q4_0(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u):
    a, b, c, d = ptx.ldg4(w, r * s_qs + 4 * u)
    dd = _h16(w, o_sc + r * s_sc, u)
    l0, l1, l2, l3 = _nib(a, b, c, d, 0)
    h0, h1, h2, h3 = _nib(a, b, c, d, 4)
    m = np.float32(-8.0) * dd
    return l0, l1, l2, l3, h0, h1, h2, h3, dd, m, dd, m, 32 * u, 32 * u + 16


@cuda_jit(device=True)
def _unit_q4_1(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u):
    a, b, c, d = ptx.ldg4(w, r * s_qs + 4 * u)
    dd = _h16(w, o_sc + r * s_sc, 2 * u)
    m = _h16(w, o_sc + r * s_sc, 2 * u + 1)
    l0, l1, l2, l3 = _nib(a, b, c, d, 0)
    h0, h1, h2, h3 = _nib(a, b, c, d, 4)
    return l0, l1, l2, l3, h0, h1, h2, h3, dd, m, dd, m, 32 * u, 32 * u + 16


@cuda_jit(device=True)
def _q5_words(w, o_qh, s_qh, r, u, a, b, c, d):
    """Q5_0/Q5_1 quants: nibbles plus the 5th bit from the block's 32-bit qh word."""
    qh = w[o_qh + r * s_qh + u]      # (not _ld, as in _h16)
    l0, l1, l2, l3 = _nib(a, b, c, d, 0)
    h0, h1, h2, h3 = _nib(a, b, c, d, 4)
    l0 |= _spread4(qh)
    l1 |= _spread4(qh >> 4)
    l2 |= _spread4(qh >> 8)
    l3 |= _spread4(qh >> 12)
    h0 |= _spread4(qh >> 16)
    h1 |= _spread4(qh >> 20)
    h2 |= _spread4(qh >> 24)
    h3 |= _spread4(qh >> 28)
    return l0, l1, l2, l3, h0, h1, h2, h3


@cuda_jit(device=True)
def _unit_q5_0(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u):
    a, b, c, d = ptx.ldg4(w, r * s_qs + 4 * u)
    l0, l1, l2, l3, h0, h1, h2, h3 = _q5_words(w, o_qh, s_qh, r, u, a, b, c, d)
    dd = _h16(w, o_sc + r * s_sc, u)
    m = np.float32(-16.0) * dd
    return l0, l1, l2, l3, h0, h1, h2, h3, dd, m, dd, m, 32 * u, 32 * u + 16


@cuda_jit(device=True)
def _unit_q5_1(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u):
    a, b, c, d = ptx.ldg4(w, r * s_qs + 4 * u)
    l0, l1, l2, l3, h0, h1, h2, h3 = _q5_words(w, o_qh, s_qh, r, u, a, b, c, d)
    dd = _h16(w, o_sc + r * s_sc, 2 * u)
    m = _h16(w, o_sc + r * s_sc, 2 * u + 1)
    return l0, l1, l2, l3, h0, h1, h2, h3, dd, m, dd, m, 32 * u, 32 * u + 16


@cuda_jit(device=True)
def _unit_q8_0(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u):
    l0, l1, l2, l3 = ptx.ldg4(w, r * s_qs + 8 * u)
    h0, h1, h2, h3 = ptx.ldg4(w, r * s_qs + 8 * u + 4)
    dd = _h16(w, o_sc + r * s_sc, u)
    z = np.float32(0.0)
    return l0, l1, l2, l3, h0, h1, h2, h3, dd, z, dd, z, 32 * u, 32 * u + 16


@cuda_jit(device=True, inline=True)
def _byte_f32(v, k):
    """Byte k of the 32-bit word v as float32, in 32-bit arithmetic (numba's own would widen to
    64 bits: I2F.S64 is a slow conversion)."""
    return np.float32(np.uint32((v >> (8 * k)) & 0xFF))


@cuda_jit(device=True)
def _k4_common(w, o_sc, s_sc, r, u):
    """Q4_K/Q5_K: unit u -> (32-byte chunk c, offset o in it, half scales, x offsets). The sc
    stream holds per superblock 5 words: d | dmin, then chunk c's scale and min bytes
    (_unpack_k4)."""
    b = u >> 3
    j = u & 7
    c = j >> 1
    o = (j & 1) * 16
    so = o_sc + r * s_sc + 5 * b
    dm = _ld(w, so)
    d = ptx.f16_bits(dm & 0xFFFF)
    dmin = -ptx.f16_bits(dm >> 16)
    sm = _ld(w, so + 1 + c)
    e0 = 256 * b + 64 * c + o
    return (c, o, d * _byte_f32(sm, 0), dmin * _byte_f32(sm, 2), d * _byte_f32(sm, 1), dmin * _byte_f32(sm, 3),
            e0, e0 + 32)


@cuda_jit(device=True)
def _with_high_bits(a, b, c, d, q0, q1, q2, q3, s_lo, s_hi, mask):
    """K-quant quants of 5 or 6 bits: the low and high nibbles of the quant words a..d, each
    byte with its top bits from the qh words q0..q3 (bits at s_lo for the low nibbles, s_hi for
    the high ones, `mask` per byte) put above bit 4."""
    l0, l1, l2, l3 = _nib(a, b, c, d, 0)
    h0, h1, h2, h3 = _nib(a, b, c, d, 4)
    return (l0 | (((q0 >> s_lo) & mask) << 4), l1 | (((q1 >> s_lo) & mask) << 4),
            l2 | (((q2 >> s_lo) & mask) << 4), l3 | (((q3 >> s_lo) & mask) << 4),
            h0 | (((q0 >> s_hi) & mask) << 4), h1 | (((q1 >> s_hi) & mask) << 4),
            h2 | (((q2 >> s_hi) & mask) << 4), h3 | (((q3 >> s_hi) & mask) << 4))


@cuda_jit(device=True)
def _unit_q4_k(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u):
    a, b, c, d = ptx.ldg4(w, r * s_qs + 4 * u)
    ch, o, d0, m0, d1, m1, e0, e1 = _k4_common(w, o_sc, s_sc, r, u)
    l0, l1, l2, l3 = _nib(a, b, c, d, 0)
    h0, h1, h2, h3 = _nib(a, b, c, d, 4)
    return l0, l1, l2, l3, h0, h1, h2, h3, d0, m0, d1, m1, e0, e1


@cuda_jit(device=True)
def _unit_q5_k(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u):
    a, b, c, d = ptx.ldg4(w, r * s_qs + 4 * u)
    ch, o, d0, m0, d1, m1, e0, e1 = _k4_common(w, o_sc, s_sc, r, u)
    # qh byte l holds the 5th bit of element l of sub-block 2c (bit 2c) and 2c+1 (bit 2c+1).
    q0, q1, q2, q3 = ptx.ldg4(w, o_qh + r * s_qh + 8 * (u >> 3) + (o >> 2))
    l0, l1, l2, l3, h0, h1, h2, h3 = _with_high_bits(a, b, c, d, q0, q1, q2, q3, 2 * ch, 2 * ch + 1, 0x01010101)
    return l0, l1, l2, l3, h0, h1, h2, h3, d0, m0, d1, m1, e0, e1


@cuda_jit(device=True, inline=True)
def _sbyte_f32(v, k):
    """Byte k of the 32-bit word v as a signed byte, as float32 (32-bit, see _byte_f32)."""
    return np.float32(np.int8(np.uint32((v >> (8 * k)) & 0xFF)))


@cuda_jit(device=True)
def _unit_q6_k(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u):
    # Superblock b = two halves n of 128; unit j covers ql bytes [64n + 16r4, +16): low nibbles
    # are elements 128n + 32g + l.. (g = r4 // 2, l = 16 (r4 % 2)), high nibbles the same + 64;
    # their top 2 bits are in qh[32n + l ..] at bits 2g and 4 + 2g.
    b = u >> 3
    j = u & 7
    n = j >> 2
    r4 = j & 3
    g = r4 >> 1
    l = (r4 & 1) * 16
    a, bb, c, d = ptx.ldg4(w, r * s_qs + 4 * u)
    q0, q1, q2, q3 = ptx.ldg4(w, o_qh + r * s_qh + 16 * b + 8 * n + (l >> 2))
    l0, l1, l2, l3, h0, h1, h2, h3 = _with_high_bits(a, bb, c, d, q0, q1, q2, q3, 2 * g, 4 + 2 * g, 0x03030303)
    so = o_sc + r * s_sc + 5 * b
    e0 = 256 * b + 128 * n + 32 * g + l
    i0 = 8 * n + 2 * g + (r4 & 1)   # scale of 16 elements e0 .. (index e0 // 16 in the block)
    dd = ptx.f16_bits(_ld(w, so + 4) & 0xFFFF)
    d0 = dd * _sbyte_f32(_ld(w, so + (i0 >> 2)), i0 & 3)
    i1 = i0 + 4
    d1 = dd * _sbyte_f32(_ld(w, so + (i1 >> 2)), i1 & 3)
    m32 = np.float32(-32.0)
    return l0, l1, l2, l3, h0, h1, h2, h3, d0, m32 * d0, d1, m32 * d1, e0, e0 + 64


UNITS = {Q.Q4_0: _unit_q4_0, Q.Q4_1: _unit_q4_1, Q.Q5_0: _unit_q5_0, Q.Q5_1: _unit_q5_1,
         Q.Q8_0: _unit_q8_0, Q.Q4_K: _unit_q4_k, Q.Q5_K: _unit_q5_k, Q.Q6_K: _unit_q6_k}



# ---------------------------------------------------------------------------------------------
# What the product kernels share: a unit's dot with the activations, the L2 prefetch of rows,
# the plain epilogue.

@functools.lru_cache(maxsize=None)
def _dots(load4, XSH=5):
    """(unit_dot, row_unit) reading the q8 activations with load4(xq, t, j) -> xq[t, j..j+3]:
    ptx.ldg4_2d where they are in global memory, ptx.ld4_2d where a block staged them in shared
    memory (the decode plan's SK); a scale xd per 2**XSH values (32, or 16: an ActBuffers view
    with x16). Every half unit is 16 values from a multiple of 16, so either way one scale."""
    @cuda_jit(device=True)
    def half_dot(xq, t, e, q0, q1, q2, q3):
        """dot of 16 quants (4 words) with the activation bytes x[t, e .. e+16), read in one
        16-byte load: the lanes of a warp read 32-byte-apart chunks, so each load instruction
        touches 8 cache lines, and 4-byte loads made the L1 lookups, not memory, the limit of
        decode products."""
        x0, x1, x2, x3 = load4(xq, t, e >> 2)
        s = ptx.dp4a(q0, x0, 0)
        s = ptx.dp4a(q1, x1, s)
        s = ptx.dp4a(q2, x2, s)
        return ptx.dp4a(q3, x3, s)

    @cuda_jit(device=True)
    def unit_dot(xq, xd, xs, t, l0, l1, l2, l3, h0, h1, h2, h3, d0, m0, d1, m1, e0, e1):
        """A unit's 32 weights times the q8 activations of token t: xd * (d * dot + m * sum(xq))."""
        s0 = half_dot(xq, t, e0, l0, l1, l2, l3)
        s1 = half_dot(xq, t, e1, h0, h1, h2, h3)
        a0 = d0 * np.float32(s0) + m0 * np.float32(_ld2(xs, t, e0 >> 4))
        a1 = d1 * np.float32(s1) + m1 * np.float32(_ld2(xs, t, e1 >> 4))
        return _ld2(xd, t, e0 >> XSH) * a0 + _ld2(xd, t, e1 >> XSH) * a1

    @cuda_jit(device=True, inline=True)
    def row_unit(unit, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u, xq, xd, xs):
        """Unit u of row r times token 0's q8 activations."""
        l0, l1, l2, l3, h0, h1, h2, h3, d0, m0, d1, m1, e0, e1 = unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u)
        return unit_dot(xq, xd, xs, 0, l0, l1, l2, l3, h0, h1, h2, h3, d0, m0, d1, m1, e0, e1)

    return unit_dot, row_unit


_unit_dot, _row_unit = _dots(ptx.ldg4_2d)


@cuda_jit(device=True)
def _prefetch_rows(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, n):
    """Rows r .. r + n's quants, high bits and scales into L2: each of the three streams (see
    DeviceMatrix) holds its rows one after another, so one bulk prefetch a stream."""
    ptx.prefetch_l2(w, r * s_qs, n * s_qs)
    if s_qh > 0:
        ptx.prefetch_l2(w, o_qh + r * s_qh, n * s_qh)
    ptx.prefetch_l2(w, o_sc + r * s_sc, n * s_sc)


@cuda_jit(device=True)
def _store(out, bias, c, t, v, accumulate):
    """The epilogue: out[t, c] = v (+ bias[c]), or += (the residual stream)."""
    if bias.shape[0] > 0:
        v += bias[c]
    if accumulate:
        out[t, c] += v
    else:
        out[t, c] = v
