"""Quantized matrix products on the GPU (numba.cuda): out[t, r] = x[t] . W[r] for every GGUF type.

Device layout (`DeviceMatrix`, made once at upload). A GGUF block interleaves its fields (scales,
high bits, quants) in 18-, 20-, 22-, 34- or 210-byte records, so most blocks do not start on a
16-byte boundary. At upload each field is split into its own stream, row-major, all in one
uint32 array: `qs` (the 4-bit or 8-bit quants), `qh` (5th / 5th-6th bits, where the type has
them) and `sc` (f16 scales and mins, K-quant sub-block scales). A warp then reads a row's quants
as consecutive 16-byte loads (`ptx.ldg4`, 512 bytes a warp instruction, through the read-only
cache). Bytes per weight stay GGUF's (Q6_K: +2 bytes of padding per 210-byte block).

Arithmetic, as llama.cpp's CUDA backend does it (mmvq): activations are quantized once per
product to int8 with a float scale per 32 values (q8_1, q8.py: written by `quantize_act` in
ops.py, or in decode steps by the kernel that makes the values, see below); a weight "unit" is 32 weights = two halves of 16, each half with its own scale d
and offset m (w = d * q + m, q the stored small integer); a half's dot is 4 `dp4a` of packed
bytes, and

    x . w  =  xd * (d0 * dot(q, xq)_0 + m0 * sum(xq)_0 + d1 * dot_1 + m1 * sum_1)

where sum(xq) over 16 values comes from xs. Per type only `_unit_<type>` differs: where a unit's
weights, scales and activations are. Kernel factories build the product for each type:
`_make_decode_kernel` for one token, `_make_kernel` for NT = `PREFILL_NT` tokens a block (small
batches: each weight is read once per NT tokens).

Launch: one warp per output row, 4 warps a block, lanes strided over the row's units; the 32
partial sums meet in a butterfly (`ptx.warp_sum`). Decoding, a plan per shape (`_plan`) may
split a long row over 2-4 warps or give a warp two short rows, and its first trip's weights
are loaded before the kernel ahead has finished; an output head (a vocabulary of rows) has a
kernel of its own, four rows a warp (`_make_head_kernel`). Epilogue: + bias, and either store
or add into the output (the residual stream), selected by an argument; decoding, also the
next product's q8 input (`qmatmul_quant`, `qmatmul_gated`), or RoPE and the KV-cache write
(`qmatmul_rope`): see `_make_decode_kernel`. Decoding a small model, a product may instead take
rmsnorm(x) * w unquantized and quantize it into shared memory itself (`ActBuffers.normed`,
QIN_MAX_K).

Prompts (T >= MMA_MIN_T) go to the int8 tensor cores instead (`_make_mma_kernel`, inline
`mma.sync` from ptx.py): a block decodes a 128-row x 128-column weight tile through the same
units into shared memory, next to the 64-token q8 activation tile, and each of its 16 warps
multiplies 16 rows by 32 tokens, scaling each int32 result by its halves' d and m as above; the
next step's loads are in flight while a step multiplies.

F32 / F16 / BF16 matrices use `_float_kernel` on the float activations (llama.cpp does not
quantize activations for them either).

`qmatmul_ref` is the float64 NumPy oracle: gguf's dequantized weights times the same quantized
activations, so a test compares only summation order.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import cuda

from ..._numba import cuda_jit
from ...errors import NumbaAprError
from . import ptx
from .launch import launch, overlapped
from .q8 import gated, quant8, quant16, quant32

WARPS = 4            # rows (warps) per block
PREFILL_NT = 8       # tokens per block for prompts

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
# The product kernel, built per (type, tile width).

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


def _make_kernel(unit, NT):
    """Small batches (1 < T < MMA_MIN_T): NT tokens a block, one warp a row."""
    @cuda_jit(device=True)
    def accumulate(acc, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u, xq, xd, xs, t0, T):
        l0, l1, l2, l3, h0, h1, h2, h3, d0, m0, d1, m1, e0, e1 = unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, r, u)
        for i in range(NT):
            t = min(t0 + i, T - 1)
            acc[i] += _unit_dot(xq, xd, xs, t, l0, l1, l2, l3, h0, h1, h2, h3, d0, m0, d1, m1, e0, e1)

    @cuda_jit
    def kernel(out, col, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, T, bias, accumulate_out):
        lane = cuda.threadIdx.x & 31
        r = cuda.blockIdx.x * WARPS + (cuda.threadIdx.x >> 5)
        t0 = cuda.blockIdx.y * NT
        acc = cuda.local.array(NT, np.float32)
        for i in range(NT):
            acc[i] = 0.0
        rr = min(r, rows - 1)  # warps past the last row compute row rows-1 and store nothing
        for u in range(lane, n_units, 32):
            accumulate(acc, w, o_qh, o_sc, s_qs, s_qh, s_sc, rr, u, xq, xd, xs, t0, T)
        for i in range(NT):
            v = ptx.warp_sum(acc[i])
            t = t0 + i
            if lane == 0 and r < rows and t < T:
                _store(out, bias, col + r, t, v, accumulate_out)
    return kernel


# Decoding (T = 1). A block takes 4 * RW rows: each row is taken by KS warps (1, 2 or 4: rows of
# 64+ units are split over KS warps, which add their sums in shared memory; the block has 4 * KS
# warps), and a warp takes RW rows (EPI_GATED: RW gate rows and their up rows); each lane one or
# two units (UNROLL) of each row in flight per trip. The plan (`_plan`) aims at one short
# dependent chain a warp: a DRAM load takes ~0.6 us, and a warp that walks its units in several
# trips waits for each (a 896 x 4864 Q6_K product 7.2 -> 5.7 us with its plan). Many small
# blocks, so that even a 896-row product spreads over all multiprocessors (28 blocks of 32 rows
# leave 104 of 132 idle). Figures: docs/experiments.md#trips-and-warps-a-row.
# The split warps stay in the block of their row (tried and not kept: a block taking 4 / KS rows,
# docs/experiments.md#trips-and-warps-a-row).
#
# Epilogues (EPI, a compile-time choice):
#   EPI_STORE  out[0, col + r] = v (+ bias), or += v;
#   EPI_QUANT  out[0, r] (+)= v, then the next product's input from the new out: q8 of out * nw
#              (the next RMS norm's weight; its 1 / rms, a whole-vector quantity, is left to the
#              consumer) and ss_out[g] = the sum of squares of out's 32-value block g;
#   EPI_GATED  rows [0, half) are gate, [half, 2 half) up (one matrix): the output is
#              act(gate) * up, as float (xf) and q8;
#   EPI_ROPE   the Q/K/V product (columns col.. of [q | k | v]): a warp takes the two rows that
#              RoPE rotates together (`_rope_pair`), rotates them at position pos[0], and stores
#              q into out, k and v into the f16 caches (the work of ops.rope_kv, whose launch
#              this saves).
# The q8 of a 32-value block needs all 32 values, which 32 / (rows a block) blocks compute: each
# block counts itself in `count[g]` after storing its rows, and the last of the group quantizes
# the block and sets the count back to 0 for the next launch (the CUDA threadFenceReduction
# pattern; values are read back with atomics, which go to L2, so no stale L1 line is read). This
# saves the quantizer launch a product used to need. Where the plan allows (GROUP_BLOCKS), a
# block takes 32 rows instead and quantizes them itself (LOCAL).
# The input: q8 of x, or of x * w with ss_in holding x's sums of squares per 32 (as EPI_QUANT
# writes them): then every result is scaled by 1 / rms(x), which commutes with the product.
EPI_STORE, EPI_QUANT, EPI_GATED, EPI_ROPE = 0, 1, 2, 3


@cuda_jit(device=True)
def _rope_pair(j, n_rot, hd, neox):
    """Columns (a, b) of [q | k | v] that pair j holds: in q and k (the first n_rot columns) the
    two that RoPE rotates together (NeoX: i and i + hd/2 of a head; else 2i and 2i + 1), in v
    two neighbours."""
    if 2 * j >= n_rot:
        return 2 * j, 2 * j + 1
    h2 = hd // 2
    head = j // h2
    i = j - head * h2
    if neox:
        return head * hd + i, head * hd + i + h2
    return head * hd + 2 * i, head * hd + 2 * i + 1


def _env_int(name: str, default: int) -> int:
    """A tuning bound from the environment (set only to measure it)."""
    v = os.environ.get(name, str(default))
    if not v.isdigit():
        raise NumbaAprError(f"{name} must be a whole number, got {v!r}")
    return int(v)


SPLIT_ROWS = 4096    # split rows over warps only while rows x warps a row stay within this
# ... or twice that for rows of LONG_ROW_UNITS units and more (8+ trips a warp unsplit): the 7B's
# down product 979 -> 845 us a step, while shorter rows lost (docs/experiments.md#long-rows-split-further).
LONG_ROW_UNITS = 512


# Products of up to this many bytes of weights send them to L2 before waiting for the kernel
# ahead (PRE in _plan): 0.5B tg128 1,174 -> 1,256 tok/s when added; the bound's history:
# docs/experiments.md#l2-prefetch-before-the-wait. NUMBA_APR_PREFETCH sets it (to measure it).
PREFETCH_BYTES = _env_int("NUMBA_APR_PREFETCH", 12 << 20)
# Tried and not kept: trip-by-trip L2 prefetch for products without PRE (docs/experiments.md#trip-by-trip-l2-prefetch)
# Tried and not kept: leads into later products' weights (docs/experiments.md#leads-into-later-products)
# Staged activations (SK in _plan) for rows of STAGE_MIN_K .. STAGE_MAX_K (K + K/8 + K/4 bytes of
# static shared memory): the 7B's down product (K = 18944) 7 us faster a call, but gate/up (K =
# 3584) and the output head slower (docs/experiments.md#staged-activations).
STAGE_MIN_K, STAGE_MAX_K = 8192, 32768
# Decoding, products whose input x (the residual stream) has up to QIN_MAX_K values quantize
# rmsnorm(x) * w themselves (QIN, see the kernel); the products that write x then end without
# EPI_QUANT's tail (a fence, a counter, the last block's read-back). The 0.5B's step (K = 896)
# 0.606 -> 0.571 ms, the 1.5B's (K = 1536) 1.240 -> 1.284: every block reads x (4 bytes a value,
# not q8's 1.1) from L2 after the wait, a burst that grows with K and with the blocks
# (docs/experiments.md#inputs-quantized-by-their-consumer). NUMBA_APR_QIN_MAX_K sets the bound
# (to measure it).
# Tried and not kept: the norm's weights in shared memory; the tails gathered in thread block
# clusters (docs/experiments.md#inputs-quantized-by-their-consumer)
QIN_MAX_K = _env_int("NUMBA_APR_QIN_MAX_K", 1024)
# The bound for the Q/K/V product alone (attention's input; gate/up's stays QIN_MAX_K): its
# launch is few blocks (1.5B: 256, against gate/up's 1,120), so its burst of x reads is small,
# and the down product before it ends without its tail: 1.5B 1,238 -> 1,218 us a step, the 7B's
# K = 3584 unchanged (docs/experiments.md#inputs-quantized-by-their-consumer).
QIN_QKV_MAX_K = _env_int("NUMBA_APR_QIN_QKV_MAX_K", max(QIN_MAX_K, 2048))
# Decode products that quantize their output, with one warp a row (KS = 1, RW = 1) and an input
# quantized ahead (not QIN), run as blocks of 32 warps: each block holds a whole q8 block of the
# output and quantizes it from shared memory (LOCAL in the kernel), where blocks of 4 rows need
# the tail (a fence, a counter, the last block's read-back): 1.5B 1,126 -> 1,068 us a step; not
# for the 0.5B's gated product (two rows a warp, QIN), which lost
# (docs/experiments.md#output-q8-blocks-quantized-in-one-block). Bit 1: EPI_GATED, bit 2: EPI_QUANT.
GROUP_BLOCKS = _env_int("NUMBA_APR_GROUP_BLOCKS", 3)
# Values a q8 block of the gated products' output (decoding): 16, each with its own scale, where
# the rest of the q8 is 32 (quant16; the down product reads it through a view with x16). A LOCAL
# block is a q8 block of rows, and a LOCAL block of 32 warps of 64 registers takes a whole
# multiprocessor: the 1.5B's gate/up (280 such blocks on 132 multiprocessors) ran 3 waves for
# 2.12 waves of work; blocks of 16 warps, two a multiprocessor, cut the last wave to 16 rows a
# block (1.5B 1,006 -> 951 us a step, docs/experiments.md#gated-outputs-in-q8-blocks-of-16). The
# finer scales make the q8 closer to the values, not coarser. NUMBA_APR_GATED_GROUP=32 sets the
# old blocks of 32 (to measure it).
# Tried and not kept: EPI_QUANT's output in blocks of 16 too (docs/experiments.md#gated-outputs-in-q8-blocks-of-16)
GATED_GROUP = _env_int("NUMBA_APR_GATED_GROUP", 16)
if GATED_GROUP not in (16, 32):
    raise NumbaAprError(f"NUMBA_APR_GATED_GROUP must be 16 or 32, got {GATED_GROUP}")


# These products are bound by their instructions more than by their bytes or their latency: the
# structural changes below were measured and lost. Kept from them: scalar loads without numba's
# wraparound (`_ld`) and scale bytes converted in 32 bits (`_byte_f32`): 1.5B 1,217 -> 1,147 us a
# step (docs/experiments.md#fewer-instructions-a-unit).
# Tried and not kept: gate/up capped at 56 registers (docs/experiments.md#gateup-capped-at-56-registers)
# Tried and not kept: persistent blocks (docs/experiments.md#persistent-blocks)
# Tried and not kept: bytes in flight in shared memory, cp.async (docs/experiments.md#bytes-in-flight-in-shared-memory)
# Tried and not kept: units in slots (docs/experiments.md#units-in-slots)
# Tried and not kept: four units a lane, several rows a warp (docs/experiments.md#more-units-or-rows-a-warp)
# Tried and not kept: coherent weight loads; gate/up capped at 72 registers (docs/experiments.md#fewer-instructions-a-unit)
# Tried and not kept: one unit a lane in trips past the row (docs/experiments.md#one-unit-a-lane-in-a-trip-past-the-row)
# Tried and not kept: a warp's rows sharing their activation loads (docs/experiments.md#activations-shared-by-a-warps-rows)


def _plan(n_units: int, rows: int, epi: int, nbytes: int) -> tuple[int, int, int, bool, int]:
    """(UNROLL, KS, RW, PRE, SK) of a decode product of `rows` rows of n_units units, nbytes of
    weights. Rows are split over KS warps only where there are too few rows to fill the card (a
    7B's products have thousands, and its 512-thread blocks, one a multiprocessor at 80
    registers, read 16% slower), a bound twice as high for long rows (LONG_ROW_UNITS). PRE: the
    warps send their rows to L2 before waiting for the kernel ahead (see the kernel). SK: the
    row length K where a block stages the activations in shared memory first (else 0): big
    products of long rows (see STAGE_MIN_K)."""
    split_rows = SPLIT_ROWS * (2 if n_units >= LONG_ROW_UNITS else 1)
    KS = max(k for k in (1, 2, 4) if k == 1 or (n_units >= 32 * k and rows * k <= split_rows))
    UNROLL = 2 if n_units > 32 * KS else 1
    RW = 2 if epi == EPI_ROPE or (epi == EPI_GATED and KS == 1 and UNROLL == 1) else 1
    PRE = nbytes <= PREFETCH_BYTES
    return UNROLL, KS, RW, PRE, 32 * n_units if not PRE and STAGE_MIN_K <= 32 * n_units <= STAGE_MAX_K else 0


@cuda_jit(device=True)
def _rope_consts(bias, a, b, p, cos, sin, n_rot, hd, neox):
    """What EPI_ROPE's stores of columns a, b at position p read besides the products: their
    biases (0 without) and the rotation's cos and sin (1, 0 in v). Weights and tables, none
    written by the kernel ahead: loaded before its wait."""
    ba, bb = np.float32(0.0), np.float32(0.0)
    if bias.shape[0] > 0:
        ba, bb = bias[a], bias[b]
    if a >= n_rot:
        return ba, bb, np.float32(1.0), np.float32(0.0)
    i = a % hd if neox else (a % hd) // 2
    return ba, bb, cos[p, i], sin[p, i]


@cuda_jit(device=True)
def _rope_store(out, va, vb, a, b, p, c, sn, k_cache, v_cache, n_rot, n_q):
    """EPI_ROPE's stores for columns a, b of [q | k | v] at position p (biases added, c / sn
    from _rope_consts): q rotated into out, k rotated into the cache, v into the cache."""
    if a >= n_rot:
        v_cache[p, a - n_rot] = np.float16(va)
        v_cache[p, b - n_rot] = np.float16(vb)
        return
    x0, x1 = va * c - vb * sn, va * sn + vb * c
    if a < n_q:
        out[0, a] = x0
        out[0, b] = x1
    else:
        k_cache[p, a - n_q] = np.float16(x0)
        k_cache[p, b - n_q] = np.float16(x1)


@cuda_jit(device=True, inline=True)
def _rms_scale(ss_in, eps, lane):
    """1 / rms(x) from ss_in, the sums of squares of x per 32 values (1 where there are none:
    the input needs no norm). A warp collective."""
    if ss_in.shape[0] == 0:
        return np.float32(1.0)
    s = np.float32(0.0)
    for i in range(lane, ss_in.shape[0], 32):
        s += ss_in[i]
    s = ptx.warp_sum(s)
    return np.float32(1.0) / math.sqrt(s / np.float32(32 * ss_in.shape[0]) + eps)


def _make_fetcher(unit, EPI, RW, unit_dot):
    """(fetch, dots): fetch loads unit u of the warp's rows (r, then r1 with two rows a warp,
    then their up rows where gated) into the register arrays qa / fa / ea from slot i0 on; dots
    adds their products with the activations."""
    @cuda_jit(device=True, inline=True)
    def put(qa, fa, ea, i, v):
        qa[i, 0], qa[i, 1], qa[i, 2], qa[i, 3] = v[0], v[1], v[2], v[3]
        qa[i, 4], qa[i, 5], qa[i, 6], qa[i, 7] = v[4], v[5], v[6], v[7]
        fa[i, 0], fa[i, 1], fa[i, 2], fa[i, 3] = v[8], v[9], v[10], v[11]
        ea[i, 0], ea[i, 1] = v[12], v[13]

    @cuda_jit(device=True, inline=True)
    def fetch(qa, fa, ea, i0, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u):
        put(qa, fa, ea, i0, unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r, rows - 1), u))
        if RW == 2:
            put(qa, fa, ea, i0 + 1, unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r1, rows - 1), u))
        if EPI == EPI_GATED:
            put(qa, fa, ea, i0 + RW, unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, r + half, u))
            if RW == 2:
                put(qa, fa, ea, i0 + RW + 1, unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, r1 + half, u))

    @cuda_jit(device=True, inline=True)
    def dot1(acc, j, qa, fa, ea, i, keep, xq, xd, xs):
        acc[j] += keep * unit_dot(xq, xd, xs, 0, qa[i, 0], qa[i, 1], qa[i, 2], qa[i, 3], qa[i, 4], qa[i, 5],
                                  qa[i, 6], qa[i, 7], fa[i, 0], fa[i, 1], fa[i, 2], fa[i, 3], ea[i, 0], ea[i, 1])

    @cuda_jit(device=True, inline=True)
    def dots(acc, qa, fa, ea, i0, keep, xq, xd, xs):
        dot1(acc, 0, qa, fa, ea, i0, keep, xq, xd, xs)
        if RW == 2:
            dot1(acc, 1, qa, fa, ea, i0 + 1, keep, xq, xd, xs)
        if EPI == EPI_GATED:
            dot1(acc, RW, qa, fa, ea, i0 + RW, keep, xq, xd, xs)
            if RW == 2:
                dot1(acc, RW + 1, qa, fa, ea, i0 + RW + 1, keep, xq, xd, xs)
    return fetch, dots


@cuda_jit(device=True, inline=True)
def _quant_group(v, g, G, store, nwv, q8, qd, qs, ss_out, sums):
    """q8 block g of G values (32, or 16: see GATED_GROUP) of a decode product's output from a
    warp's values (v: this lane's, value G g + lane): of v * nwv (this lane's norm weight, or 1);
    with `sums`, also ss_out[g] = the sum of v^2 (where ss_out has entries). Written only where
    `store` (with G = 16, lanes 16-31 must not store). A warp collective (see quant32)."""
    if G == 16:
        quant16(v * nwv, store, q8, qd, qs, 0, g)
    else:
        quant32(v * nwv, store, q8, qd, qs, 0, g)
    if sums and ss_out.shape[0] > 0:
        s2 = ptx.warp_sum(v * v)
        if store and (cuda.threadIdx.x & 31) == 0:
            ss_out[g] = s2


def _out_group(epi: int) -> int:
    """Values a q8 block of what a quantizing decode epilogue writes (GATED_GROUP)."""
    return GATED_GROUP if epi == EPI_GATED else 32


def _make_decode_kernel(unit, EPI, UNROLL, KS, RW, PRE, SK, unit2=None, QIN=False, LOCAL=False, X16=False):
    # (two rows a warp are RoPE's pair or two gate rows: the plain epilogues store one row a warp)
    assert RW == 1 or (RW == 2 and EPI in (EPI_ROPE, EPI_GATED)), (EPI, RW)
    assert not LOCAL or (KS == 1 and RW == 1 and EPI in (EPI_QUANT, EPI_GATED)), (EPI, KS, RW)
    NR = 2 if EPI == EPI_GATED else 1
    NA = NR * RW                         # accumulators a lane
    assert not (QIN and X16), "QIN quantizes its input itself, a scale per 32"
    G = _out_group(EPI)                  # values a q8 block of the output
    RWB = G if LOCAL else WARPS          # warps of rows a block (LOCAL: a whole q8 block of rows)
    GROUP = G // (WARPS * RW)            # blocks a q8 block of the output takes (not LOCAL)
    NWB = RWB * KS                       # warps a block (a plain constant: a shared array's shape)
    TAIL = EPI in (EPI_QUANT, EPI_GATED)
    TWO = unit2 is not None              # EPI_ROPE: blocks from nb1 on take a second matrix (w2 ..)
    XSH = 4 if X16 else 5                # the input's scales: one per 2**XSH values
    unit_dot = _dots(ptx.ld4_2d if SK else ptx.ldg4_2d, XSH)[0]
    fetch1, dots = _make_fetcher(unit, EPI, RW, unit_dot)
    fetch2 = _make_fetcher(unit2, EPI, RW, unit_dot)[0] if TWO else fetch1
    NP = NA * UNROLL                     # units a lane holds: a trip's

    @cuda_jit(device=True, inline=True)
    def fetch_trip(qa, fa, ea, second, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u0, u1):
        """A trip's units into registers: u0 (and with UNROLL 2, u1) of the warp's rows, from
        the matrix the block takes."""
        if TWO and second:
            fetch2(qa, fa, ea, 0, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u0)
            if UNROLL == 2:
                fetch2(qa, fa, ea, NA, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u1)
        else:
            fetch1(qa, fa, ea, 0, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u0)
            if UNROLL == 2:
                fetch1(qa, fa, ea, NA, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u1)

    @cuda_jit(device=True, inline=True)
    def dots_trip(acc, qa, fa, ea, keep0, keep1, xq, xd, xs):
        """acc += a fetched trip's products, unit u0's weighted keep0 and u1's keep1."""
        dots(acc, qa, fa, ea, 0, keep0, xq, xd, xs)
        if UNROLL == 2:
            dots(acc, qa, fa, ea, NA, keep1, xq, xd, xs)
    NTHR = 32 * NWB
    QT = max(1, -(-SK // (8 * NTHR)))    # QIN: trips of 8 input values a thread
    # shared shapes: plain constants, never 0 (sq: 3 words spare for aligned16)
    SQ, SD, SX = max(SK, 32) // 4 + 3, max(SK, 32) >> XSH, max(SK, 32) // 16

    @overlapped
    @cuda_jit(**({"max_registers": 64} if LOCAL else {}))   # (1024 threads a block: 64 at most)
    def kernel(out, col, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, ss_in, eps, xf_in, nw_in,
               bias, accumulate_out, half, mode, nw, q8, qd, qs, qf, ss_out, count,
               pos, cos, sin, k_cache, v_cache, n_rot, n_q, hd, neox,
               w2, o_qh2, o_sc2, s_qs2, s_qh2, s_sc2, rows2, nb1):
        lane = cuda.threadIdx.x & 31
        warp = cuda.threadIdx.x >> 5
        kw = warp % KS                   # this warp's share of its row's units
        bx = cuda.blockIdx.x
        second = False
        if TWO and bx >= nb1:            # (block-uniform) the second matrix's rows, after the first's
            second = True
            bx -= nb1
            col += rows
            w, o_qh, o_sc, s_qs, s_qh, s_sc, rows = w2, o_qh2, o_sc2, s_qs2, s_qh2, s_sc2, rows2
        r = (bx * RWB + warp // KS) * RW
        r1 = r + 1
        # What the epilogue reads besides the products, loaded before the wait (after it, each
        # is a memory round trip on the kernel's critical path): weights, tables and the
        # position (which the step's last kernel moves), and EPI_QUANT's out, the residual
        # stream, which the kernel two or more launches ahead wrote (see qmatmul_quant).
        # 1.5B 1,067 -> 1,027 us a step (docs/experiments.md#epilogue-inputs-loaded-before-the-wait).
        if EPI == EPI_ROPE:              # rows r, r1: a RoPE pair (columns a, b of [q | k | v])
            a, b = _rope_pair(min(r, rows - 2) + col >> 1, n_rot, hd, neox)
            r, r1 = a - col, b - col
            p = pos[0]
            ba, bb, c, sn = _rope_consts(bias, a, b, p, cos, sin, n_rot, hd, neox)
        if EPI == EPI_QUANT:
            rr = min(r, rows - 1)
            base = bias[rr] if bias.shape[0] > 0 else np.float32(0.0)
            if accumulate_out:
                base += out[0, rr]
        if TAIL:                         # the output's q8 block g: this lane's norm weight in it
            g = bx if LOCAL else bx // GROUP
            nwv = nw[32 * g + lane] if EPI == EPI_QUANT and nw.shape[0] > 0 else np.float32(1.0)
        # The weights do not depend on the kernel before: the warp's rows go to L2 while that
        # kernel still runs (launched early, see launch.overlapped), then wait for its output.
        if PRE:
            if EPI == EPI_ROPE:          # (RoPE pairs: rows a head dimension apart)
                if lane == 0 and kw == 0:
                    _prefetch_rows(w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r, rows - 1), 1)
                    _prefetch_rows(w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r1, rows - 1), 1)
            elif cuda.threadIdx.x == 0:
                # The block's rows are consecutive: one thread sends them all, a prefetch a
                # stream (per warp, the ~40 instructions of each prefetch were ~20% of what a
                # 1.5B gate/up warp issues).
                r0 = bx * RWB * RW
                nr = min(RWB * RW, (half if EPI == EPI_GATED else rows) - r0)
                _prefetch_rows(w, o_qh, o_sc, s_qs, s_qh, s_sc, r0, nr)
                if EPI == EPI_GATED:
                    _prefetch_rows(w, o_qh, o_sc, s_qs, s_qh, s_sc, r0 + half, nr)
        # The first trip's units, into registers before the wait as well (a 0.5B's rows are all
        # one trip): after it, only the activations are read. 0.5B tg128 1,505 -> 1,595 tok/s
        # (docs/experiments.md#first-trip-loaded-before-the-wait).
        qa = cuda.local.array((NP, 8), np.uint32)
        fa = cuda.local.array((NP, 4), np.float32)
        ea = cuda.local.array((NP, 2), np.int64)
        ua = lane + 32 * kw
        ub = ua + 32 * KS
        fetch_trip(qa, fa, ea, second, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half,
                   min(ua, n_units - 1), min(ub, n_units - 1))
        if QIN:                          # the norm's weights this thread applies (constants)
            wq = cuda.local.array((QT, 8), np.float32)
            for k in range(QT):
                i = min(k * NTHR + cuda.threadIdx.x, SK // 8 - 1)
                for j in range(8):
                    wq[k, j] = nw_in[8 * i + j]
        ptx.grid_dep()
        if QIN:
            # The input as the product ahead left it (x, the residual stream): the block
            # quantizes rmsnorm(x) * nw_in into shared memory itself, 8 values a thread, its
            # 1 / rms applied to the results as with ss_in. The product ahead then needs no
            # quantizing tail (see QIN_MAX_K).
            sq = ptx.aligned16(cuda.shared.array((1, SQ), np.int32))
            sd = cuda.shared.array((1, SD), np.float32)
            sx = cuda.shared.array((1, SX), np.int32)
            s2 = cuda.shared.array(SD, np.float32)
            for k in range(QT):          # (block-uniform trips: quant8 is a collective)
                i = k * NTHR + cuda.threadIdx.x
                quant8(xf_in, wq[k], 0, 0, min(i, SK // 8 - 1), i < SK // 8, sq, sd, sx, s2)
            cuda.syncthreads()
            xq, xd, xs, ss_in = sq, sd, sx, s2
        elif SK:
            # The q8 activations, staged in shared memory once a block: the products' reads of
            # them then make no L1 lookups (a probe without those reads ran the 7B's big
            # products 13-25% faster; see STAGE_MIN_K for where staging pays).
            sq = ptx.aligned16(cuda.shared.array((1, SQ), np.int32))   # (16-byte loads)
            sd = cuda.shared.array((1, SD), np.float32)
            sx = cuda.shared.array((1, SX), np.int32)
            tid = cuda.threadIdx.x
            for i in range(4 * tid, SK // 4, 4 * NTHR):
                a0, a1, a2, a3 = ptx.ldg4_2d(xq, 0, i)
                sq[0, i] = a0
                sq[0, i + 1] = a1
                sq[0, i + 2] = a2
                sq[0, i + 3] = a3
            for i in range(tid, SK >> XSH, NTHR):
                sd[0, i] = xd[0, i]
            for i in range(tid, SK // 16, NTHR):
                sx[0, i] = xs[0, i]
            cuda.syncthreads()
            xq, xd, xs = sq, sd, sx
        # 1 / rms of the input: its loads (written by the kernel ahead) in flight with the dots'
        scale = _rms_scale(ss_in, eps, lane)
        acc = cuda.local.array(NA, np.float32)
        for j in range(NA):
            acc[j] = 0.0
        if LOCAL:
            vals = cuda.shared.array(32, np.float32)
        one = np.float32(1.0)
        zero = np.float32(0.0)
        dots_trip(acc, qa, fa, ea, one if ua < n_units else zero, one if ub < n_units else zero, xq, xd, xs)
        for u0 in range(ua + 32 * KS * UNROLL, n_units, 32 * KS * UNROLL):
            # (the second unit, with UNROLL 2, weighted 0 past the row's end)
            u1 = min(u0 + 32 * KS, n_units - 1)
            fetch_trip(qa, fa, ea, second, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u0, u1)
            dots_trip(acc, qa, fa, ea, one, one if u0 + 32 * KS < n_units else zero, xq, xd, xs)
        for j in range(NA):
            acc[j] = ptx.warp_sum(acc[j]) * scale
        if KS > 1:
            part = cuda.shared.array((NWB, NA), np.float32)
            if lane == 0:
                for j in range(NA):
                    part[warp, j] = acc[j]
            cuda.syncthreads()
            for j in range(NA):
                t = np.float32(0.0)
                for i in range(KS):
                    t += part[warp - kw + i, j]
                acc[j] = t
        if EPI == EPI_ROPE:
            if lane == 0 and kw == 0 and (bx * RWB + warp // KS) * 2 < rows:
                _rope_store(out, acc[0] + ba, acc[1] + bb, a, b, p, c, sn, k_cache, v_cache, n_rot, n_q)
        elif lane == 0 and kw == 0:
            # (EPI_QUANT / EPI_GATED: each storing lane fences its own stores, below, for the
            # block that quantizes; a fence by every thread of a 512-thread block cost ~1.5 us)
            for j in range(RW):
                v = acc[j]
                if EPI == EPI_GATED:
                    v = gated(v, acc[RW + j], mode)
                    qf[0, r + j] = v
                elif r < rows:
                    if EPI == EPI_QUANT:
                        v += base
                        out[0, r] = v
                    else:
                        _store(out, bias, col + r, 0, v, accumulate_out)
                if LOCAL:                # (one row a warp: r = G bx + warp)
                    vals[warp] = v
            if TAIL and not LOCAL:
                # (tried and not kept: fence.acq_rel.gpu, docs/experiments.md#a-stronger-fence-in-the-tails)
                cuda.threadfence()       # this lane's values, visible to the last block
        if TAIL and LOCAL:
            # The block's G rows are a whole q8 block of the output: quantized here, from shared
            # memory (no fence, counter or read-back: see GROUP_BLOCKS).
            cuda.syncthreads()
            if ptx.SIM or warp == 0:     # (the simulator's warp collectives take the whole block)
                _quant_group(vals[lane % G], g, G, warp == 0 and lane < G, nwv, q8, qd, qs, ss_out, EPI == EPI_QUANT)
        elif TAIL:
            last = cuda.shared.array(1, np.int32)
            cuda.syncthreads()
            if cuda.threadIdx.x == 0:
                last[0] = cuda.atomic.add(count, g, 1) == GROUP - 1
            cuda.syncthreads()
            if last[0]:
                i = G * g + lane % G
                v = cuda.atomic.add(qf, (0, i), 0.0) if EPI == EPI_GATED else cuda.atomic.add(out, (0, i), 0.0)
                _quant_group(v, g, G, cuda.threadIdx.x < G, nwv, q8, qd, qs, ss_out, EPI == EPI_QUANT)
                if cuda.threadIdx.x == 0:
                    count[g] = 0
    return kernel


# Prompts: the int8 tensor cores (ptx.mma_s8), as llama.cpp's mmq. A block computes a tile of
# 16 WR weight rows x 32 WT tokens (`mma_tiles`), walking K in steps of MMA_K. Each step, its
# threads decode the weight tile through the same units as above (each 16-value half of a unit
# is one k16 slice of the tile, with its own d and m) into shared memory as int8, next to the q8
# activation tile, then each warp runs 16 rows x 32 tokens as (MMA_K / 16) x 4 mma
# instructions. The int32 result of one k16 slice is scaled at once: acc += xd * (d * dot + m *
# sum(xq)); where the two k16 slices of each 32 values share d and m (every type but Q6_K, whose
# scales are per 16), they go through one m16n8k32 instruction and one scaling instead.
# Straight-line loads, 128 x 64 tiles of 16 warps and the next step's loads in flight during the
# multiply took it from 13-20 to 26-40 TMAC/s on 7B shapes (docs/experiments.md#from-13-to-40-tmacs).
MMA_NTILE = 4                # column tiles of 8 tokens a warp: 16 accumulators a lane (8 went
                             # to the stack: numba's loops over them were not unrolled)
MMA_K = 128                  # K a step: 4 units a row (K steps of 256 measured slower)
MMA_MIN_T = 16               # from this many tokens up, products go to the tensor cores


def mma_tiles() -> tuple[int, int]:
    """(WR, WT): warps a prompt-product block has along rows x along tokens; its tile is 16 WR
    rows x 8 MMA_NTILE WT tokens. 8 x 2 (76 KB of static shared memory, double-buffered) where
    it was measured, compute capability 9.0 (H100); 4 x 1 (38 KB: within the 48 KB that every
    GPU allows a block without opting in) on others; 2 x 1 on the simulator, which runs a
    thread at a time in Python (test_prompt_product_gpu_tiles also runs 8 x 2 there once)."""
    if not _MMA_TILES:
        _MMA_TILES.append((2, 1) if ptx.SIM else (8, 2) if cuda.get_current_device().compute_capability >= (9, 0)
                          else (4, 1))
    return _MMA_TILES[0]


_MMA_TILES: list = []


@cuda_jit(device=True)
def _scale4(acc, i, c0, c1, c2, c3, dA, mA, dB, mB, sX, sS, p, ta, kx, ks):
    """acc[i..i+4] += the int32 mma result of rows (A, B) x tokens (ta, ta+1), scaled:
    xd * (d * dot + m * sum(xq)), with xd * sum(xq) staged in sS (buffer p)."""
    xa, xb = sX[p, ta, kx], sX[p, ta + 1, kx]
    sa, sb = sS[p, ta, ks], sS[p, ta + 1, ks]
    acc[i] += mA * sa                     # (two fma a value)
    acc[i] += xa * dA * np.float32(c0)
    acc[i + 1] += mA * sb
    acc[i + 1] += xb * dA * np.float32(c1)
    acc[i + 2] += mB * sa
    acc[i + 2] += xa * dB * np.float32(c2)
    acc[i + 3] += mB * sb
    acc[i + 3] += xb * dB * np.float32(c3)


def _make_mma_kernel(unit, K32, WR, WT):
    """The tensor-core product: WR x WT warps, each 16 rows x 8 * NTILE tokens; a block's tile is
    16 * WR rows x 8 * NTILE * WT tokens (grid: x over token tiles, y over row tiles, so the blocks
    that share a weight tile run together and find it in L2)."""
    KSTEP = MMA_K
    assert KSTEP == 128              # (`multiply` below is written out for it)
    NTILE = MMA_NTILE
    NACC = 4 * NTILE                 # (sizes as closure constants: numba.cuda wants array
    NTOK_W = 8 * NTILE               #  shapes fixed at compile time, not expressions)
    NTOK = NTOK_W * WT
    ROWS = 16 * WR
    NTHR = 32 * WR * WT
    U = KSTEP // 32                  # units a row a step
    SW = KSTEP // 4 + 4              # words a row of a shared tile: +4 puts the 32 lanes'
                                     # fragment loads (row g, word 4kk + q) on 32 banks
    KS = KSTEP // 16                 # k16 slices a step
    K32S = KSTEP // 32
    NA = ROWS * U                    # units a tile
    NB = NTOK * (KSTEP // 4)         # activation words a tile
    NSC = NTOK * KS
    KW4 = KSTEP // 4                 # activation words a token a step
    NAI = (NA + NTHR - 1) // NTHR    # units a thread a step
    NBI = NB // NTHR                 # activation words a thread a step
    NSI = NSC // NTHR                # activation scales a thread a step

    @cuda_jit(device=True)
    def fetch(ku, tid, r0, t0, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, T, kw,
              bw, sx, ss, qa, fa, ea):
        """Step ku's loads into registers, all issued before any is waited on: the activations
        first (plain loads), then the weight units (each decodes once its loads are in)."""
        for i in range(NBI):
            idx = i * NTHR + tid
            t = min(t0 + idx // KW4, T - 1)
            k = ku * 8 + idx % KW4
            v = xq[t, min(k, kw - 1)]
            bw[i] = v if k < kw else 0
        for i in range(NSI):
            idx = i * NTHR + tid
            t = min(t0 + idx // KS, T - 1)
            j = idx % KS
            b = ku + (j >> 1)
            s = xd[t, min(b, n_units - 1)]
            sx[i] = s if b < n_units else np.float32(0.0)
            if K32:   # sS: xd * the sum of the quants of each 32, in the first K32S entries
                b2 = ku + (j & (K32S - 1))
                bc = min(b2, n_units - 1)
                v2 = xd[t, bc] * np.float32(xs[t, 2 * bc] + xs[t, 2 * bc + 1])
                ss[i] = v2 if b2 < n_units else np.float32(0.0)
            else:     # of each k16 slice
                ss[i] = sx[i] * np.float32(xs[t, min(2 * ku + j, 2 * n_units - 1)])
        for i in range(NAI):
            idx = min(i * NTHR + tid, NA - 1)
            u = ku + idx % U
            l0, l1, l2, l3, h0, h1, h2, h3, d0, m0, d1, m1, e0, e1 = unit(
                w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r0 + idx // U, rows - 1), min(u, n_units - 1))
            ok = u < n_units   # (only types of 32-value blocks have a K that KSTEP does not divide)
            qa[i, 0], qa[i, 1], qa[i, 2], qa[i, 3] = l0, l1, l2, l3
            qa[i, 4], qa[i, 5], qa[i, 6], qa[i, 7] = h0, h1, h2, h3
            fa[i, 0] = d0 if ok else np.float32(0.0)
            fa[i, 1] = m0 if ok else np.float32(0.0)
            fa[i, 2] = d1 if ok else np.float32(0.0)
            fa[i, 3] = m1 if ok else np.float32(0.0)
            ea[i, 0] = e0 - 32 * ku if ok else 32 * (u - ku)
            ea[i, 1] = e1 - 32 * ku if ok else 32 * (u - ku) + 16

    @cuda_jit(device=True)
    def put(p, tid, bw, sx, ss, qa, fa, ea, sA, sD, sM, sB, sX, sS):
        """The registers of fetch into shared buffer p."""
        for i in range(NBI):
            idx = i * NTHR + tid
            sB[p, idx // KW4, idx % KW4] = bw[i]
        for i in range(NSI):
            idx = i * NTHR + tid
            tk = idx // KS
            j = idx % KS
            if (j & 1) == 0:
                sX[p, tk, j >> 1] = sx[i]
            if not K32 or j < K32S:
                sS[p, tk, j] = ss[i]
        for i in range(NAI):
            idx = i * NTHR + tid
            if NA % NTHR == 0 or idx < NA:
                rl = idx // U
                j = ea[i, 0] >> 2
                sA[p, rl, j], sA[p, rl, j + 1], sA[p, rl, j + 2], sA[p, rl, j + 3] = qa[i, 0], qa[i, 1], qa[i, 2], qa[i, 3]
                j = ea[i, 1] >> 2
                sA[p, rl, j], sA[p, rl, j + 1], sA[p, rl, j + 2], sA[p, rl, j + 3] = qa[i, 4], qa[i, 5], qa[i, 6], qa[i, 7]
                sD[p, rl, ea[i, 0] >> 4], sM[p, rl, ea[i, 0] >> 4] = fa[i, 0], fa[i, 1]
                sD[p, rl, ea[i, 1] >> 4], sM[p, rl, ea[i, 1] >> 4] = fa[i, 2], fa[i, 3]

    @cuda_jit(device=True)
    def k32(acc, p, kk, ra, tw, g, q, sA, sD, sM, sB, sX, sS):
        """32 values of K: one k32 mma a column tile (every type but Q6_K: both k16 slices of
        each 32 share d and m, so one scaling)."""
        a0, a1 = sA[p, ra, 8 * kk + q], sA[p, ra + 8, 8 * kk + q]
        a2, a3 = sA[p, ra, 8 * kk + 4 + q], sA[p, ra + 8, 8 * kk + 4 + q]
        dA, mA, dB, mB = sD[p, ra, 2 * kk], sM[p, ra, 2 * kk], sD[p, ra + 8, 2 * kk], sM[p, ra + 8, 2 * kk]
        for nt in range(NTILE):
            tb = tw + 8 * nt
            c0, c1, c2, c3 = ptx.mma_s8_k32(a0, a1, a2, a3, sB[p, tb + g, 8 * kk + q], sB[p, tb + g, 8 * kk + 4 + q])
            _scale4(acc, 4 * nt, c0, c1, c2, c3, dA, mA, dB, mB, sX, sS, p, tb + 2 * q, kk, kk)

    @cuda_jit(device=True)
    def k16(acc, p, kk, ra, tw, g, q, sA, sD, sM, sB, sX, sS):
        """16 values of K: one k16 mma a column tile (Q6_K: scales per 16)."""
        a0, a1 = sA[p, ra, 4 * kk + q], sA[p, ra + 8, 4 * kk + q]
        dA, mA, dB, mB = sD[p, ra, kk], sM[p, ra, kk], sD[p, ra + 8, kk], sM[p, ra + 8, kk]
        for nt in range(NTILE):
            tb = tw + 8 * nt
            c0, c1, c2, c3 = ptx.mma_s8(a0, a1, sB[p, tb + g, 4 * kk + q])
            _scale4(acc, 4 * nt, c0, c1, c2, c3, dA, mA, dB, mB, sX, sS, p, tb + 2 * q, kk >> 1, kk)

    @cuda_jit(device=True)
    def multiply(acc, p, ra, tw, g, q, sA, sD, sM, sB, sX, sS):
        """The step's mma from shared buffer p, written out (KSTEP = 128) so that the
        addresses are constants and the instructions of the slices interleave."""
        if K32:
            k32(acc, p, 0, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k32(acc, p, 1, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k32(acc, p, 2, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k32(acc, p, 3, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
        else:
            k16(acc, p, 0, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 1, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 2, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 3, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 4, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 5, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 6, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 7, ra, tw, g, q, sA, sD, sM, sB, sX, sS)

    @cuda_jit(max_registers=min(255, 65536 // NTHR))   # (8 x 2: one block fills the register file)
    def kernel(out, col, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, T, bias, accumulate_out):
        tid = cuda.threadIdx.x
        lane = tid & 31
        g = lane >> 2
        q = lane & 3
        wi = tid >> 5
        ra = (wi % WR) * 16 + g             # this lane's A rows: ra and ra + 8
        tw = (wi // WR) * NTOK_W            # this warp's first token in the tile
        r0 = cuda.blockIdx.y * ROWS
        t0 = cuda.blockIdx.x * NTOK
        sA = cuda.shared.array((2, ROWS, SW), np.uint32)     # weight quants, int8
        sD = cuda.shared.array((2, ROWS, KS), np.float32)    # their d per k16 slice
        sM = cuda.shared.array((2, ROWS, KS), np.float32)    # and m
        sB = cuda.shared.array((2, NTOK, SW), np.int32)      # activation quants, int8
        sX = cuda.shared.array((2, NTOK, K32S), np.float32)  # their scale per 32
        sS = cuda.shared.array((2, NTOK, KS), np.float32)    # scale * sum of the slice's quants
        acc = cuda.local.array(NACC, np.float32)
        for i in range(NACC):
            acc[i] = 0.0
        bw = cuda.local.array(NBI, np.int32)                 # a step's loads, in registers
        sx = cuda.local.array(NSI, np.float32)
        ss = cuda.local.array(NSI, np.float32)
        qa = cuda.local.array((NAI, 8), np.uint32)
        fa = cuda.local.array((NAI, 4), np.float32)
        ea = cuda.local.array((NAI, 2), np.int64)
        kw = xq.shape[1]
        # One step ahead: step s + 1's loads are in flight while step s multiplies from the
        # other buffer (the last step fetches itself again: no branch in between). Every warp
        # computes all its NTILE column tiles, those past T on copies of token T - 1: no branch
        # between the mma either.
        fetch(0, tid, r0, t0, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, T, kw, bw, sx, ss, qa, fa, ea)
        put(0, tid, bw, sx, ss, qa, fa, ea, sA, sD, sM, sB, sX, sS)
        cuda.syncthreads()
        last = ((n_units - 1) // U) * U
        p = 0
        for ku in range(0, n_units, U):
            fetch(min(ku + U, last), tid, r0, t0, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, T, kw,
                  bw, sx, ss, qa, fa, ea)
            multiply(acc, p, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            put(1 - p, tid, bw, sx, ss, qa, fa, ea, sA, sD, sM, sB, sX, sS)
            cuda.syncthreads()
            p = 1 - p
        for nt in range(NTILE):
            for j in range(4):
                r = r0 + ra + 8 * (j >> 1)
                t = t0 + tw + 8 * nt + 2 * q + (j & 1)
                if r < rows and t < T:
                    _store(out, bias, col + r, t, acc[4 * nt + j], accumulate_out)
    return kernel


# Output heads (decoding, a vocabulary of rows, plain stores): a warp takes HEAD_RW consecutive
# rows, each lane the same units of the four, so that a lane has four rows' loads in flight at
# once (HEAD_RW * UNROLL units) and the blocks are a quarter as many. A kernel of its own: as a
# plan of the shared decode kernel, the code written for any rows a warp ran every other product
# slower. As this kernel: 0.5B-shaped head 77 -> 56 us, 7B 241 -> 189
# (docs/experiments.md#four-rows-a-warp).
HEAD_ROWS, HEAD_RW = 32768, 4
# Half-warp rows. Lanes walk a row's units 32 apart, so rows of 48 units (K = 1,536: the 1.5B's)
# take 64 unit slots, 16 of them weighted 0: a lane of the head computes 8 unit products where
# 6 would do. Rows of an odd number of 16-unit halves, up to HALF_MAX_UNITS (16 or 48: past
# that, 5+ units a lane), go to half-warps instead: lanes 0-15 take two of the warp's rows,
# lanes 16-31 the other two, 3 units of each a lane (the 1.5B's head 105.4 -> 80.9 us,
# docs/experiments.md#half-warp-rows). NUMBA_APR_HALF_MAX_UNITS sets the bound (0: off, to
# measure it).
# Tried and not kept: half-warp rows in the decode kernel's two-row warps (docs/experiments.md#half-warp-rows-in-two-row-warps)
HALF_MAX_UNITS = _env_int("NUMBA_APR_HALF_MAX_UNITS", 48)


def _head_plan(n_units: int) -> tuple[int, int]:
    """(UNROLL, LW) of an output head of n_units units a row: units a lane a trip, lanes a row.
    The kernel takes up to 3 units a lane, so half-warps stop at 48 units whatever the bound."""
    if n_units % 32 == 16 and n_units <= min(HALF_MAX_UNITS, 48):
        return n_units // 16, 16
    return 2 if n_units > 32 else 1, 32


def _make_head_kernel(unit, UNROLL, LW):
    assert UNROLL <= 3 and LW in (16, 32), (UNROLL, LW)
    HALF = LW == 16          # lanes 0-15 take rows r, r + 1, lanes 16-31 rows r + 2, r + 3
    NRL = HEAD_RW // 2 if HALF else HEAD_RW   # rows a lane

    @cuda_jit(device=True, inline=True)
    def add(acc, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, rows, u, keep, xq, xd, xs):
        """acc[i] += keep * unit u of row r + i, i < NRL (written out: a loop over the rows stays
        a loop in the PTX, with one row's loads in flight)."""
        acc[0] += keep * _row_unit(unit, w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r, rows - 1), u, xq, xd, xs)
        acc[1] += keep * _row_unit(unit, w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r + 1, rows - 1), u, xq, xd, xs)
        if NRL == 4:
            acc[2] += keep * _row_unit(unit, w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r + 2, rows - 1), u, xq, xd, xs)
            acc[3] += keep * _row_unit(unit, w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r + 3, rows - 1), u, xq, xd, xs)

    @overlapped
    @cuda_jit
    def kernel(out, col, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, ss_in, eps, bias,
               accumulate_out):
        lane = cuda.threadIdx.x & 31
        r = (cuda.blockIdx.x * WARPS + (cuda.threadIdx.x >> 5)) * HEAD_RW
        if HALF:
            r += NRL * (lane >> 4)
        ptx.grid_dep()
        acc = cuda.local.array(NRL, np.float32)
        for j in range(NRL):
            acc[j] = 0.0
        one, zero = np.float32(1.0), np.float32(0.0)
        last = n_units - 1
        for u0 in range(lane & (LW - 1), n_units, LW * UNROLL):
            add(acc, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, rows, u0, one, xq, xd, xs)
            # (as in the decode kernel: more units, each weighted 0 past the row)
            if UNROLL >= 2:
                add(acc, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, rows, min(u0 + LW, last),
                    one if u0 + LW < n_units else zero, xq, xd, xs)
            if UNROLL >= 3:
                add(acc, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, rows, min(u0 + 2 * LW, last),
                    one if u0 + 2 * LW < n_units else zero, xq, xd, xs)
        scale = _rms_scale(ss_in, eps, lane)
        for j in range(NRL):
            v = ptx.lanes_sum(acc[j], LW) * scale
            if (lane & (LW - 1)) == 0 and r + j < rows:
                _store(out, bias, col + r + j, 0, v, accumulate_out)
    return kernel


@cuda_jit
def _float_kernel(out, col, w, kind, K, rows, x, T, bias, accumulate):
    """F32 (kind 0) / F16 (1) / BF16 (2) rows times float32 activations, one warp per row."""
    lane = cuda.threadIdx.x & 31
    r = cuda.blockIdx.x * WARPS + (cuda.threadIdx.x >> 5)
    rr = min(r, rows - 1)
    for t in range(T):
        acc = np.float32(0.0)
        for k in range(lane, K, 32):
            if kind == 0:
                v = ptx.f32_bits(w[rr * K + k])
            else:
                word = w[(rr * K + k) >> 1] >> (16 * (k & 1))
                v = ptx.f16_bits(word & 0xFFFF) if kind == 1 else ptx.f32_bits((word & 0xFFFF) << 16)
            acc += v * x[t, k]
        acc = ptx.warp_sum(acc)
        if lane == 0 and r < rows:
            _store(out, bias, col + r, t, acc, accumulate)


_KERNELS: dict = {}


def _kernel(qtype: int, NT: int, tc: bool = False, epi=None, plan=None, qtype2=None, qin=False, local=False,
            x16=False):
    """The product for a type: NT tokens a block on the CUDA cores, or on the tensor cores (tc),
    or the decode kernel with epilogue `epi` and `plan` (see _plan) (and a second matrix's type;
    qin: it quantizes its input itself; x16: its input has a scale per 16), or with epi "head"
    the output head's, plan (UNROLL, LW)."""
    key = (qtype, NT, tc, epi, plan, qtype2, qin, local, x16)
    k = _KERNELS.get(key)
    if k is None:
        unit = UNITS[qtype]
        k = _KERNELS[key] = (
            _make_mma_kernel(unit, qtype != Q.Q6_K, *mma_tiles()) if tc
            else _make_head_kernel(unit, *plan) if epi == "head"
            else _make_decode_kernel(unit, epi, *plan, None if qtype2 is None else UNITS[qtype2], qin, local, x16)
            if epi is not None else _make_kernel(unit, NT))
    return k


def qmatmul(out, m: DeviceMatrix, act, T: int, stream, bias=None, accumulate=False, col=0):
    """out[t, col:col + m.rows] (+)= x[t] . W.T (+ bias[col:col + m.rows]) for t < T. `act` is the
    ActBuffers the input was quantized into (ops.quantize_act, or a decode epilogue): its q8 view
    for quantized W, its float view for float W. Launch only: no allocation, no synchronisation
    (graph-capturable). (`col` rather than a column slice of out: see ActBuffers.cols on what
    slicing costs.)"""
    bias = act.empty if bias is None else bias
    assert act.nw is None or (T == 1 and m.qtype not in FLOAT_TYPES and m.rows < HEAD_ROWS), \
        "only decode products of quantized matrices quantize their input themselves"
    assert not act.x16 or (T == 1 and m.rows < HEAD_ROWS), "only decode products read scales per 16"
    grid_x = (m.rows + WARPS - 1) // WARPS
    if m.qtype in FLOAT_TYPES:
        launch(_float_kernel, grid_x, 32 * WARPS, stream, out, col, m.w, FLOAT_TYPES[m.qtype], m.K, m.rows,
                                                  act.xf, T, bias, accumulate)
        return
    n_units = m.K // 32
    if T == 1 and m.rows >= HEAD_ROWS:
        per_block = WARPS * HEAD_RW
        launch(_kernel(m.qtype, 0, epi="head", plan=_head_plan(n_units)), -(-m.rows // per_block),
               32 * WARPS, stream, out, col, m.w, m.o_qh, m.o_sc, m.s_qs, m.s_qh, m.s_sc, m.rows, n_units,
               act.xq, act.xd, act.xs, act.ss, np.float32(act.eps), bias, accumulate)
        return
    if T == 1:
        _decode(EPI_STORE, out, m, act, stream, bias, accumulate, col, m.rows, 0, 0, act.empty, act)
        return
    if T >= MMA_MIN_T:
        WR, WT = mma_tiles()
        grid = (-(-T // (8 * MMA_NTILE * WT)), -(-m.rows // (16 * WR)))
        launch(_kernel(m.qtype, 0, tc=True), grid, 32 * WR * WT, stream,
            out, col, m.w, m.o_qh, m.o_sc, m.s_qs, m.s_qh, m.s_sc, m.rows, n_units,
            act.xq, act.xd, act.xs, T, bias, accumulate)
        return
    k = _kernel(m.qtype, PREFILL_NT)
    launch(k, (grid_x, (T + PREFILL_NT - 1) // PREFILL_NT), 32 * WARPS, stream,
        out, col, m.w, m.o_qh, m.o_sc, m.s_qs, m.s_qh, m.s_sc, m.rows, n_units,
        act.xq, act.xd, act.xs, T, bias, accumulate)


def qmatmul_quant(out, m: DeviceMatrix, act, stream, dst, norm_w=None, ss=None, eps=0.0, accumulate=True):
    """Decoding: out[0] (+)= x . W.T, and the next product's input quantized from the new out[0]
    into dst (ActBuffers): q8 of out * norm_w, with ss [m.rows / 32] the sums of squares that
    make the norm's 1 / rms (see ActBuffers.pending). Returns the ActBuffers view to pass on.
    The kernel reads out before it waits for the kernel launched ahead of it (programmatic
    dependent launch, launch.py): that one must not write out (in a decode step the kernel
    that last wrote the residual stream is two or more launches back)."""
    d = dst.cols(m.rows)
    _decode(EPI_QUANT, out, m, act, stream, act.empty, accumulate, 0, m.rows, 0, 0,
            act.empty if norm_w is None else norm_w, d, act.empty if ss is None else ss)
    return d if ss is None else d.pending(ss, eps)


def qmatmul_gated(m: DeviceMatrix, act, stream, dst, mode):
    """Decoding, m = [gate; up] rows: act(x . gate) * (x . up) into dst (float, and q8 with a
    scale per GATED_GROUP values); returns its view."""
    half = m.rows // 2
    d = dst.cols(half, x16=GATED_GROUP == 16)
    _decode(EPI_GATED, d.xf, m, act, stream, act.empty, False, 0, half, half, mode, act.empty, d)
    return d


def qmatmul_rope(out, mats, act, stream, bias, pos, table, k_cache, v_cache, n_rot, n_q, hd, neox):
    """Decoding, mats = one or two (matrix, first column) of the Q/K/V projection, the second's
    rows right after the first's (columns [q | k | v], the first n_rot rotated, the first n_q
    queries): q . W rotated by RoPE at position pos[0] (table: cos, sin [n_ctx, hd / 2]) into
    out[0], k rotated and v into the f16 caches' row pos[0] (ops.rope_kv's work, for models
    without q/k norms that rotate whole heads), in one launch."""
    bias = act.empty if bias is None else bias
    (m, col), second = mats[0], mats[1:]
    rope = (pos, *table, k_cache, v_cache, n_rot, n_q, hd, bool(neox))
    nb1 = -(-m.rows // (2 * WARPS))          # blocks of the first matrix (a pair a warp)
    if second:
        m2, col2 = second[0]
        assert col2 == col + m.rows and m2.K == m.K
        rope += (m2.w, m2.o_qh, m2.o_sc, m2.s_qs, m2.s_qh, m2.s_sc, m2.rows, nb1)
        n_out = 2 * WARPS * nb1 + m2.rows
    else:
        rope += _placeholders()[1]
        n_out, m2 = m.rows, None
    _decode(EPI_ROPE, out, m, act, stream, bias, False, col, n_out, 0, 0, act.empty, act, rope=rope, m2=m2)


_PLACEHOLDERS: list = []


def _placeholders():
    """Arguments for the kernel parameters an epilogue does not use, typed as the real ones and
    made once: (RoPE's: pos .. neox; a second matrix's: w2 .. nb1)."""
    if not _PLACEHOLDERS:
        f32, f16 = cuda.device_array((1, 1), np.float32), cuda.device_array((1, 1), np.float16)
        _PLACEHOLDERS.append(((cuda.device_array(1, np.int32), f32, f32, f16, f16, 0, 0, 2, False),
                              (cuda.device_array(4, np.uint32), 0, 0, 0, 0, 0, 0, 0)))
    return _PLACEHOLDERS[0]


def _decode(epi, out, m, act, stream, bias, accumulate, col, n_out, half, mode, nw, dst, ss_out=None, rope=None,
            m2=None):
    """The decode kernel for n_out output rows (gated: n_out = half); m2: RoPE's second matrix."""
    qtype2 = None if m2 is None else m2.qtype
    plan = _plan(m.K // 32, n_out, epi, m.nbytes + (0 if m2 is None else m2.nbytes))
    qin = act.nw is not None
    if qin:                       # the input staged in shared memory: quantized there (QIN)
        plan = plan[:4] + (m.K,)
    _, KS, RW, _, _ = plan
    G = _out_group(epi)
    local = (KS == 1 and RW == 1 and not qin and n_out % G == 0
             and bool(GROUP_BLOCKS & {EPI_GATED: 1, EPI_QUANT: 2}.get(epi, 0)))
    rwb = G if local else WARPS                      # warps of rows a block (the kernel's RWB)
    launch(_kernel(m.qtype, 0, epi=epi, plan=plan, qtype2=qtype2, qin=qin, local=local, x16=act.x16),
           -(-n_out // (rwb * RW)), 32 * rwb * KS, stream,
        out, col, m.w, m.o_qh, m.o_sc, m.s_qs, m.s_qh, m.s_sc, m.rows, m.K // 32,
        act.xq, act.xd, act.xs, act.ss, np.float32(act.eps), act.xf, act.empty if act.nw is None else act.nw,
        bias, accumulate, half, mode, nw,
        dst.xq8, dst.xd, dst.xs, dst.xf, act.empty if ss_out is None else ss_out, dst.count,
        *(rope or _placeholders()[0] + _placeholders()[1]))


# ---------------------------------------------------------------------------------------------
# Reference.

def quantize_act_ref(x: np.ndarray, group: int = 32):
    """q8 activations as quantize_act computes them: int8 [T, K], scale per 32 [T, K/32] (or per
    `group` values: quant16's 16)."""
    T, K = x.shape
    xb = x.reshape(T, K // group, group).astype(np.float32)
    amax = np.abs(xb).max(axis=2)
    d = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.trunc(xb * inv[:, :, None] + np.copysign(0.5, xb)), -127, 127).astype(np.int8)
    return q.reshape(T, K), d


def qmatmul_ref(raw: np.ndarray, qtype: int, K: int, x: np.ndarray) -> np.ndarray:
    """float64 oracle: dequantized W (gguf-py) times the q8-quantized x ([T, K])."""
    from gguf.quants import dequantize
    W = dequantize(np.ascontiguousarray(raw), Q(qtype)).reshape(raw.shape[0], K).astype(np.float64)
    if qtype in FLOAT_TYPES:
        return x.astype(np.float64) @ W.T
    q, d = quantize_act_ref(x)
    xdq = (q.reshape(x.shape[0], K // 32, 32).astype(np.float64) * d[:, :, None]).reshape(x.shape)
    return xdq @ W.T

