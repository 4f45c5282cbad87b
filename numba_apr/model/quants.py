"""GGML tensor types: the table of supported formats and one Numba decoder for all of them.

A GGUF tensor is stored row by row; each row is a run of fixed-size *blocks*, and each block
holds `block_size` elements in `type_size` bytes (plain floats are blocks of one element).
`QUANT_TYPES` lists the types numba_apr reads, keyed by the type id GGUF writes
(`gguf.GGMLQuantizationType`), with the sizes from `gguf.constants.GGML_QUANT_SIZES`.

Decoding is one kernel family: an inlined `@jit` helper per format decodes one block (or, for
the 32-element formats, four consecutive blocks in one loop) from raw `uint8` bytes at a byte
offset into float32 at an element offset, and `decode_blocks` picks the helper once per call
from the integer type id, then loops over blocks. Every other kernel (matmul, row lookup,
whole-tensor `dequantize`) calls `decode_blocks`/`decode_row`, so each bit layout lives in one
place. The layouts follow ggml's `dequantize_row_*` (ggml-quants.c) and
gguf-py's `gguf/quants.py`, which the tests use as the oracle.

Numba has no float16 type, so half floats are rebuilt from their bits (`_f16`), and every
helper reads bytes one at a time: that works at any alignment and LLVM still vectorises it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .._numba import jit, pjit, prange
from ..errors import UnsupportedError


@dataclass(frozen=True)
class QuantType:
    """One GGML tensor type: `block_size` elements are stored in `type_size` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int

    def row_bytes(self, n_elements: int) -> int:
        """Bytes of a row of `n_elements` (which must be a whole number of blocks)."""
        if n_elements % self.block_size:
            raise ValueError(f"{self.name} rows hold a multiple of {self.block_size} elements, not {n_elements}")
        return n_elements // self.block_size * self.type_size

    def row_elements(self, n_bytes: int) -> int:
        """Elements of a row stored in `n_bytes` (which must be a whole number of blocks)."""
        if n_bytes % self.type_size:
            raise ValueError(f"{self.name} rows take a multiple of {self.type_size} bytes, not {n_bytes}")
        return n_bytes // self.type_size * self.block_size


_Q = GGMLQuantizationType
_SUPPORTED = (_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K)

#: Supported types by GGUF type id.
QUANT_TYPES: dict[int, QuantType] = {
    int(t): QuantType(int(t), t.name, *GGML_QUANT_SIZES[t]) for t in _SUPPORTED
}

# Type ids as plain ints: Numba freezes module globals into the machine code as constants, so
# the dispatch in `decode_blocks` compares against literals.
F32, F16, BF16 = int(_Q.F32), int(_Q.F16), int(_Q.BF16)
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = int(_Q.Q8_0), int(_Q.Q4_0), int(_Q.Q4_1), int(_Q.Q5_0), int(_Q.Q5_1)
Q4_K, Q5_K, Q6_K = int(_Q.Q4_K), int(_Q.Q5_K), int(_Q.Q6_K)

# Sizes indexed by type id (0 = unsupported), for kernels that need them at run time.
_MAX_ID = max(QUANT_TYPES) + 1
BLOCK_SIZE = np.zeros(_MAX_ID, np.int64)
TYPE_SIZE = np.zeros(_MAX_ID, np.int64)
for _t in QUANT_TYPES.values():
    BLOCK_SIZE[_t.id] = _t.block_size
    TYPE_SIZE[_t.id] = _t.type_size


def type_name(qtype) -> str:
    """GGML name of a type id ("Q4_K"), or the number itself when GGUF does not know it."""
    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return str(int(qtype))


def check_supported(qtype, name: str) -> QuantType:
    """The `QuantType` of tensor `name`, or `UnsupportedError` when we cannot decode its type."""
    t = QUANT_TYPES.get(int(qtype))
    if t is None:
        raise UnsupportedError(f"tensor {name} has type {type_name(qtype)}, which numba_apr does not support")
    return t


def quant_type(qtype) -> QuantType:
    """The `QuantType` for a type id (int or `GGMLQuantizationType`)."""
    return check_supported(qtype, "<unnamed>")


# ---------------------------------------------------------------------------------------------
# How the decoders are written so that LLVM vectorises them (checked with `inspect_asm`):
# * Indices are cast to unsigned (`_U`). Numba wraps negative signed indices (`a[-1]`) with a
#   select per access, which makes the address non-affine and stops the loop vectoriser.
# * Element loops run to a bound derived from `bs`, the block size, which the dispatcher computes
#   at run time (it is always the block size, but LLVM cannot tell). A loop with a constant trip
#   count of 16 or 32 is fully unrolled before the loop vectoriser runs, and the SLP vectoriser
#   that would then be the only chance gives up because it cannot prove `src` and `dst` do not
#   overlap. A runtime bound keeps the loop, and the loop vectoriser checks overlap once.
# * Bytes are converted straight to float32 (uint8 -> float), offsets applied in float (e.g.
#   Q4_0 x = d*q - 8d, one FMA), so the integer part stays 8/32 bits wide instead of Numba's
#   default int64, which would halve the lanes per vector.
# * Small `@jit(inline="always")` helpers are inlined by Numba itself: LLVM would not inline
#   Numba-compiled callees with exception plumbing, and a call per element never vectorises.

_U = np.uint64
_TWO_112 = np.float32(2.0**112)


@jit(inline="always")
def _bits_f32(bits):
    """Reinterpret a 32-bit pattern as float32."""
    return np.uint32(bits).view(np.float32)


@jit(inline="always")
def _half(h):
    """float32 value of the IEEE half with bit pattern `h` (exact, subnormals and inf/nan too).

    Shifting the 15 exponent+mantissa bits up by 13 lines them up with float32's fields but
    leaves the exponent biased by 15 instead of 127; multiplying by 2**112 fixes the bias and
    also turns half subnormals (which land on float32 subnormals) into the right normal value.
    Only exponent 31 (inf/nan) needs its own case.
    """
    em = np.uint32(h) & np.uint32(0x7FFF)
    f = _bits_f32(em << np.uint32(13)) * _TWO_112
    if em >= np.uint32(0x7C00):
        f = _bits_f32((em << np.uint32(13)) | np.uint32(0x7F800000))
    if np.uint32(h) & np.uint32(0x8000):
        f = -f
    return f


@jit(inline="always")
def _to_f16(v):
    """float32 rounded to the nearest float16 value (kept as float32)."""
    return _half(_half_bits(v))


@jit(inline="always")
def _nearest(f):
    """Round float32 `f` (|f| < 2**22) to the nearest integer, ties to even, as ggml's
    `nearest_int`: adding 1.5 * 2**23 makes the FPU round the value into the low mantissa bits.
    A bit cast, not `(f + c) - c`, reads it back, so fast-math cannot fold the add away."""
    v = np.float32(np.float32(f) + np.float32(12582912.0)).view(np.uint32)
    return np.int32(v & np.uint32(0x7FFFFF)) - np.int32(0x400000)


@jit(inline="always")
def _half_bits(f):
    """IEEE half bits of float32 `f`, rounded to nearest even (numpy's float16 cast): inf past
    the half range, a quiet nan for nan, subnormal halves below 2**-14."""
    u = np.float32(f).view(np.uint32)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x47800000):  # |f| >= 65536, inf or nan
        h = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif a < np.uint32(0x38800000):  # |f| < 2**-14: adding 0.5 leaves |f| / 2**-24, rounded,
        # in the low mantissa bits (0.5's own bits are 0x3F000000)
        h = np.float32(np.uint32(a).view(np.float32) + np.float32(0.5)).view(np.uint32) - np.uint32(0x3F000000)
    else:  # rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even;
        # a carry out of the mantissa correctly bumps the exponent (up to inf at 65520)
        h = (a + np.uint32(0x0FFF) + ((a >> np.uint32(13)) & np.uint32(1)) - np.uint32(0x38000000)) >> np.uint32(13)
    return np.uint32(sign | h)


@jit(inline="always")
def _f16(src, o):
    """The little-endian half float at byte offset `o` of `src`, as float32."""
    return _half(np.uint32(src[_U(o)]) | (np.uint32(src[_U(o + 1)]) << np.uint32(8)))


@jit(inline="always")
def _bf16(src, o):
    """The little-endian bfloat16 at byte offset `o` of `src`: its bits are float32's top half."""
    return _bits_f32((np.uint32(src[_U(o)]) << np.uint32(16)) | (np.uint32(src[_U(o + 1)]) << np.uint32(24)))


@jit(inline="always")
def _u32(src, o):
    """The little-endian uint32 at byte offset `o` of `src`."""
    return (
        np.uint32(src[_U(o)])
        | (np.uint32(src[_U(o + 1)]) << np.uint32(8))
        | (np.uint32(src[_U(o + 2)]) << np.uint32(16))
        | (np.uint32(src[_U(o + 3)]) << np.uint32(24))
    )


@jit(inline="always")
def _s8(b):
    """A raw byte read as a signed int8, as float32."""
    return np.float32(np.int8(b))  # same-width cast: a reinterpretation, then one sign-extend


@jit(inline="always")
def _fu8(v):
    """float32 of an integer that fits in a byte. Going through uint8 tells LLVM so: Numba does
    integer arithmetic in int64, and an int64 -> float conversion vectorises at half the lanes."""
    return np.float32(np.uint8(v))


@jit(inline="always")
def _scale_min_k4(src, sc, j):
    """(scale, min) of sub-block `j` of a Q4_K/Q5_K block whose 12 scale bytes start at `sc`.

    Sub-blocks 0-3: low 6 bits of bytes j (scale) and j+4 (min). Sub-blocks 4-7: low 4 bits in
    the two nibbles of byte j+4, top 2 bits in the spare top bits of bytes j-4 and j."""
    if j < 4:
        return np.float32(src[_U(sc + j)] & 63), np.float32(src[_U(sc + j + 4)] & 63)
    s = (src[_U(sc + j + 4)] & 0xF) | ((src[_U(sc + j - 4)] >> 6) << 4)
    m = (src[_U(sc + j + 4)] >> 4) | ((src[_U(sc + j)] >> 6) << 4)
    return np.float32(s), np.float32(m)


# ---------------------------------------------------------------------------------------------
# Block decoders: decode the block at byte `so` of `src` into dst[do : do + bs]. `bs` is the
# block size (see above for why it is an argument). Element order within a block is ggml's; the
# comments give the byte layout.


@jit(inline="always")
def _dq_q8_0(src, so, dst, do, bs):
    # 34 bytes: f16 d, 32 x int8 q; x = d * q
    d = _f16(src, so)
    for j in range(bs):
        dst[_U(do + j)] = d * _s8(src[_U(so + 2 + j)])


@jit(inline="always")
def _dq_q8_0_x4(src, so, dst, do, bs):
    # Four consecutive Q8_0 blocks in one loop: a 32-element loop's fixed cost (overlap check,
    # remainder) is as large as its body, so this pays it once per 128 elements.
    d0, d1, d2, d3 = _f16(src, so), _f16(src, so + 34), _f16(src, so + 68), _f16(src, so + 102)
    for j in range(bs):
        dst[_U(do + j)] = d0 * _s8(src[_U(so + 2 + j)])
        dst[_U(do + 32 + j)] = d1 * _s8(src[_U(so + 36 + j)])
        dst[_U(do + 64 + j)] = d2 * _s8(src[_U(so + 70 + j)])
        dst[_U(do + 96 + j)] = d3 * _s8(src[_U(so + 104 + j)])


@jit(inline="always")
def _dq_q4_0(src, so, dst, do, bs):
    # 18 bytes: f16 d, 16 bytes of nibbles; element j is the low nibble of byte j, element
    # j+16 the high nibble; x = d * (q - 8), computed as d*q - 8d (one FMA, no int widening)
    d = _f16(src, so)
    m = np.float32(-8.0) * d
    q = so + 2
    for j in range(bs >> 1):
        b = src[_U(q + j)]
        dst[_U(do + j)] = d * _fu8(b & 0xF) + m
        dst[_U(do + 16 + j)] = d * _fu8(b >> 4) + m


@jit(inline="always")
def _dq_q4_1(src, so, dst, do, bs):
    # 20 bytes: f16 d, f16 m, 16 bytes of nibbles (as Q4_0); x = d * q + m
    d = _f16(src, so)
    m = _f16(src, so + 2)
    q = so + 4
    for j in range(bs >> 1):
        b = src[_U(q + j)]
        dst[_U(do + j)] = d * _fu8(b & 0xF) + m
        dst[_U(do + 16 + j)] = d * _fu8(b >> 4) + m


@jit(inline="always")
def _dq_q4_x4(src, so, ts, dst, do, bs, has_min):
    # Four consecutive Q4_0 (ts = 18) or Q4_1 (ts = 20, has_min) blocks in one loop, as Q8_0.
    d0, d1, d2, d3 = _f16(src, so), _f16(src, so + ts), _f16(src, so + 2 * ts), _f16(src, so + 3 * ts)
    if has_min:
        m0, m1 = _f16(src, so + 2), _f16(src, so + ts + 2)
        m2, m3 = _f16(src, so + 2 * ts + 2), _f16(src, so + 3 * ts + 2)
    else:
        m0, m1, m2, m3 = np.float32(-8.0) * d0, np.float32(-8.0) * d1, np.float32(-8.0) * d2, np.float32(-8.0) * d3
    q = so + ts - 16
    for j in range(bs >> 1):
        b = src[_U(q + j)]
        dst[_U(do + j)] = d0 * _fu8(b & 0xF) + m0
        dst[_U(do + 16 + j)] = d0 * _fu8(b >> 4) + m0
        b = src[_U(q + ts + j)]
        dst[_U(do + 32 + j)] = d1 * _fu8(b & 0xF) + m1
        dst[_U(do + 48 + j)] = d1 * _fu8(b >> 4) + m1
        b = src[_U(q + 2 * ts + j)]
        dst[_U(do + 64 + j)] = d2 * _fu8(b & 0xF) + m2
        dst[_U(do + 80 + j)] = d2 * _fu8(b >> 4) + m2
        b = src[_U(q + 3 * ts + j)]
        dst[_U(do + 96 + j)] = d3 * _fu8(b & 0xF) + m3
        dst[_U(do + 112 + j)] = d3 * _fu8(b >> 4) + m3


@jit(inline="always")
def _dq_q5(src, dst, do, bs, d, m, qh, q):
    # Q5_0/Q5_1 body: low nibbles as Q4_0 at byte q, the 5th bit of element j is bit j of the
    # uint32 qh; x = d * q + m
    for j in range(bs >> 1):
        b = src[_U(q + j)]
        lo = _fu8(b & 0xF) + _fu8((qh >> j) & 1) * np.float32(16.0)
        hi = _fu8(b >> 4) + _fu8((qh >> (j + 16)) & 1) * np.float32(16.0)
        dst[_U(do + j)] = d * lo + m
        dst[_U(do + 16 + j)] = d * hi + m


@jit(inline="always")
def _dq_q5_0(src, so, dst, do, bs):
    # 22 bytes: f16 d, uint32 qh, 16 bytes of low nibbles; x = d * (q - 16)
    d = _f16(src, so)
    _dq_q5(src, dst, do, bs, d, np.float32(-16.0) * d, _u32(src, so + 2), so + 6)


@jit(inline="always")
def _dq_q5_1(src, so, dst, do, bs):
    # 24 bytes: f16 d, f16 m, uint32 qh, 16 bytes of low nibbles; x = d * q + m
    _dq_q5(src, dst, do, bs, _f16(src, so), _f16(src, so + 2), _u32(src, so + 4), so + 8)


@jit(inline="always")
def _k4_scales(src, so):
    """The 8 sub-block scales d * scale and mins dmin * min of the Q4_K / Q5_K block at `so`."""
    d = _f16(src, so)
    dmin = _f16(src, so + 2)
    s0, m0 = _scale_min_k4(src, so + 4, 0)
    s1, m1 = _scale_min_k4(src, so + 4, 1)
    s2, m2 = _scale_min_k4(src, so + 4, 2)
    s3, m3 = _scale_min_k4(src, so + 4, 3)
    s4, m4 = _scale_min_k4(src, so + 4, 4)
    s5, m5 = _scale_min_k4(src, so + 4, 5)
    s6, m6 = _scale_min_k4(src, so + 4, 6)
    s7, m7 = _scale_min_k4(src, so + 4, 7)
    return (d * s0, d * s1, d * s2, d * s3, d * s4, d * s5, d * s6, d * s7,
            dmin * m0, dmin * m1, dmin * m2, dmin * m3, dmin * m4, dmin * m5, dmin * m6, dmin * m7)


@jit(inline="always")
def _dq_q4_k(src, so, dst, do, bs):
    # 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks of 32,
    # 128 bytes of nibbles: bytes 32c..32c+31 hold sub-block 2c (low nibbles) and 2c+1 (high).
    # x = d * scale * q - dmin * min. One loop over j does all 8 sub-blocks (8 outputs per
    # byte position), so the loop's fixed cost (overlap check, remainder) is paid once a block.
    d0, d1, d2, d3, d4, d5, d6, d7, n0, n1, n2, n3, n4, n5, n6, n7 = _k4_scales(src, so)
    q = so + 16
    for j in range(bs >> 3):
        b = src[_U(q + j)]
        dst[_U(do + j)] = d0 * _fu8(b & 0xF) - n0
        dst[_U(do + 32 + j)] = d1 * _fu8(b >> 4) - n1
        b = src[_U(q + 32 + j)]
        dst[_U(do + 64 + j)] = d2 * _fu8(b & 0xF) - n2
        dst[_U(do + 96 + j)] = d3 * _fu8(b >> 4) - n3
        b = src[_U(q + 64 + j)]
        dst[_U(do + 128 + j)] = d4 * _fu8(b & 0xF) - n4
        dst[_U(do + 160 + j)] = d5 * _fu8(b >> 4) - n5
        b = src[_U(q + 96 + j)]
        dst[_U(do + 192 + j)] = d6 * _fu8(b & 0xF) - n6
        dst[_U(do + 224 + j)] = d7 * _fu8(b >> 4) - n7


@jit(inline="always")
def _dq_q5_k(src, so, dst, do, bs):
    # 176 bytes: as Q4_K, plus 32 bytes qh after the scales (bytes 16..47): bit s of qh[j] is
    # the 5th bit of element j of sub-block s. Nibbles follow at byte 48. One loop, as Q4_K.
    d0, d1, d2, d3, d4, d5, d6, d7, n0, n1, n2, n3, n4, n5, n6, n7 = _k4_scales(src, so)
    h = so + 16
    q = so + 48
    for j in range(bs >> 3):
        hb = src[_U(h + j)]
        b = src[_U(q + j)]
        dst[_U(do + j)] = d0 * _fu8((b & 0xF) | ((hb & 1) << 4)) - n0
        dst[_U(do + 32 + j)] = d1 * _fu8((b >> 4) | ((hb & 2) << 3)) - n1
        b = src[_U(q + 32 + j)]
        dst[_U(do + 64 + j)] = d2 * _fu8((b & 0xF) | ((hb & 4) << 2)) - n2
        dst[_U(do + 96 + j)] = d3 * _fu8((b >> 4) | ((hb & 8) << 1)) - n3
        b = src[_U(q + 64 + j)]
        dst[_U(do + 128 + j)] = d4 * _fu8((b & 0xF) | (hb & 16)) - n4
        dst[_U(do + 160 + j)] = d5 * _fu8((b >> 4) | ((hb & 32) >> 1)) - n5
        b = src[_U(q + 96 + j)]
        dst[_U(do + 192 + j)] = d6 * _fu8((b & 0xF) | ((hb & 64) >> 2)) - n6
        dst[_U(do + 224 + j)] = d7 * _fu8((b >> 4) | ((hb & 128) >> 3)) - n7


@jit(inline="always")
def _dq_q6_k(src, so, dst, do, bs):
    # 210 bytes: ql[128] low nibbles, qh[64] 2-bit highs, 16 int8 scales (one per 16 elements),
    # f16 d. Two halves of 128 elements; in half h, element 32k + l (k = 0..3, l = 0..31) takes
    # nibble (k >> 1) of ql[64h + 32(k & 1) + l] and bits 2k..2k+1 of qh[32h + l].
    # x = d * scale * (q - 32). One loop per half over l = 0..15 makes 8 outputs (l and l + 16
    # of each k), so every output stream has a single scale.
    d = _f16(src, so + 208)
    for hh in range(2):
        sc = so + 192 + 8 * hh
        e0 = d * _s8(src[_U(sc)])
        e1 = d * _s8(src[_U(sc + 1)])
        e2 = d * _s8(src[_U(sc + 2)])
        e3 = d * _s8(src[_U(sc + 3)])
        e4 = d * _s8(src[_U(sc + 4)])
        e5 = d * _s8(src[_U(sc + 5)])
        e6 = d * _s8(src[_U(sc + 6)])
        e7 = d * _s8(src[_U(sc + 7)])
        ql = so + 64 * hh
        qh = so + 128 + 32 * hh
        o = do + 128 * hh
        z = np.float32(32.0)
        for l in range(bs >> 4):
            a, a2 = src[_U(ql + l)], src[_U(ql + 16 + l)]
            c, c2 = src[_U(ql + 32 + l)], src[_U(ql + 48 + l)]
            h, h2 = src[_U(qh + l)], src[_U(qh + 16 + l)]
            dst[_U(o + l)] = e0 * (_fu8((a & 0xF) | ((h & 3) << 4)) - z)
            dst[_U(o + 16 + l)] = e1 * (_fu8((a2 & 0xF) | ((h2 & 3) << 4)) - z)
            dst[_U(o + 32 + l)] = e2 * (_fu8((c & 0xF) | ((h & 12) << 2)) - z)
            dst[_U(o + 48 + l)] = e3 * (_fu8((c2 & 0xF) | ((h2 & 12) << 2)) - z)
            dst[_U(o + 64 + l)] = e4 * (_fu8((a >> 4) | (h & 48)) - z)
            dst[_U(o + 80 + l)] = e5 * (_fu8((a2 >> 4) | (h2 & 48)) - z)
            dst[_U(o + 96 + l)] = e6 * (_fu8((c >> 4) | ((h & 192) >> 2)) - z)
            dst[_U(o + 112 + l)] = e7 * (_fu8((c2 >> 4) | ((h2 & 192) >> 2)) - z)


# ---------------------------------------------------------------------------------------------
# The dispatching decoder.


@jit
def decode_blocks(src, qtype, b0, nb, dst):
    """Decode blocks b0 .. b0+nb-1 of the raw row `src` (uint8) into dst[0 : nb * block_size].

    Decodes only whole blocks that fit in `dst`. The type test runs once per call, so the
    per-block loops below are straight code. Returns False for a type id it does not know
    (callers validate first; this is a backstop).
    """
    n = dst.shape[0]
    if qtype == Q4_K or qtype == Q5_K or qtype == Q6_K:
        nb = min(nb, n // 256)
        bs = min(n, 256)  # == 256 whenever a block is decoded; see the notes above
        if qtype == Q4_K:
            for b in range(nb):
                _dq_q4_k(src, (b0 + b) * 144, dst, b * 256, bs)
        elif qtype == Q6_K:
            for b in range(nb):
                _dq_q6_k(src, (b0 + b) * 210, dst, b * 256, bs)
        else:
            for b in range(nb):
                _dq_q5_k(src, (b0 + b) * 176, dst, b * 256, bs)
    elif qtype == Q8_0 or qtype == Q4_0 or qtype == Q4_1 or qtype == Q5_0 or qtype == Q5_1:
        nb = min(nb, n // 32)
        bs = min(n, 32)  # == 32 whenever a block is decoded
        nb4 = nb - nb % 4
        if qtype == Q8_0:
            for b in range(0, nb4, 4):
                _dq_q8_0_x4(src, (b0 + b) * 34, dst, b * 32, bs)
            for b in range(nb4, nb):
                _dq_q8_0(src, (b0 + b) * 34, dst, b * 32, bs)
        elif qtype == Q4_0:
            for b in range(0, nb4, 4):
                _dq_q4_x4(src, (b0 + b) * 18, 18, dst, b * 32, bs, False)
            for b in range(nb4, nb):
                _dq_q4_0(src, (b0 + b) * 18, dst, b * 32, bs)
        elif qtype == Q4_1:
            for b in range(0, nb4, 4):
                _dq_q4_x4(src, (b0 + b) * 20, 20, dst, b * 32, bs, True)
            for b in range(nb4, nb):
                _dq_q4_1(src, (b0 + b) * 20, dst, b * 32, bs)
        elif qtype == Q5_0:
            for b in range(nb):
                _dq_q5_0(src, (b0 + b) * 22, dst, b * 32, bs)
        else:
            for b in range(nb):
                _dq_q5_1(src, (b0 + b) * 24, dst, b * 32, bs)
    elif qtype == F32:
        s = 4 * b0
        for i in range(min(nb, n)):
            dst[_U(i)] = _bits_f32(_u32(src, s + 4 * i))
    elif qtype == F16:
        s = 2 * b0
        for i in range(min(nb, n)):
            dst[_U(i)] = _f16(src, s + 2 * i)
    elif qtype == BF16:
        s = 2 * b0
        for i in range(min(nb, n)):
            dst[_U(i)] = _bf16(src, s + 2 * i)
    else:
        return False
    return True


@jit
def decode_row(src, qtype, dst):
    """Decode the raw row `src` into `dst`; len(dst) (a whole number of blocks) says how many
    elements the row holds. Returns False for a type id it does not know."""
    if qtype < 0 or qtype >= BLOCK_SIZE.shape[0] or BLOCK_SIZE[qtype] == 0:
        return False  # (no bounds checks in kernels: never index the table with a bad id)
    return decode_blocks(src, qtype, 0, dst.shape[0] // BLOCK_SIZE[qtype], dst)


@pjit
def _dequantize_rows(raw, qtype, out):
    for r in prange(raw.shape[0]):
        decode_row(raw[r], qtype, out[r])


def dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    """Decode a raw GGUF tensor (uint8, [rows, row_bytes], or one row 1D) to float32 [rows, cols]."""
    t = quant_type(qtype)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim not in (1, 2):
        raise ValueError(f"dequantize wants raw uint8 rows, got {raw.dtype} with shape {raw.shape}")
    rows = np.ascontiguousarray(raw.reshape(-1, raw.shape[-1]))
    out = np.empty((rows.shape[0], t.row_elements(rows.shape[1])), np.float32)
    _dequantize_rows(rows, t.id, out)
    return out if raw.ndim == 2 else out[0]
