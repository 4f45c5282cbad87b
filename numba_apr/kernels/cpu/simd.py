"""Fixed-width SIMD vectors for Numba kernels: the few operations the integer dots need.

LLVM vectorises plain loops well when the vector runs along the loop, but the quantized dots
want the vector *across* 16 weight rows and an 8-bit multiply-add that sums 4 products per
32-bit lane (x86 `vpdpbusd`), which no loop vectoriser produces. So this module gives Numba
three vector value types, held in registers like any scalar:

    U8x64   64 unsigned bytes (16 rows x 4 consecutive weights of each)
    I32x16  16 int32 lanes (one per row)
    F32x16  16 float32 lanes (one per row)

and intrinsics that emit LLVM vector IR for them. `dot4` is the workhorse: for each of the 16
lanes, acc += sum over its 4 bytes of u8 weight x s8 activation, with the same 4 activation
bytes broadcast to every lane. On a CPU with AVX-512 VNNI that is one `vpdpbusd`; elsewhere it
is written as plain widening multiplies and adds, which LLVM lowers to what the CPU has
(AVX2 `vpmaddwd`, NEON, ...), slower but exact. `NUMBA_APR_SIMD=generic` forces the portable
form (the tests run both); the choice is made once, at import.

Numba has no bounds checks here either: callers pass offsets they have validated.
"""
from __future__ import annotations

import os

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from ...errors import NumbaAprError



def _host_has_vnni() -> bool:
    feats = llvm.get_host_cpu_features()
    return bool(feats.get("avx512vnni") and feats.get("avx512bw") and feats.get("avx512f"))


#: "vnni" (AVX-512 VNNI instructions) or "generic" (portable LLVM vector IR).
MODE = os.environ.get("NUMBA_APR_SIMD", "").lower() or ("vnni" if _host_has_vnni() else "generic")
if MODE not in ("vnni", "generic"):
    raise NumbaAprError(f"NUMBA_APR_SIMD must be 'vnni' or 'generic', not {MODE!r}")


class Vec(types.Type):
    """A fixed-width LLVM vector of `n` `elem`s, passed around by value."""

    def __init__(self, elem, n: int):
        self.elem, self.n = elem, n
        super().__init__(name=f"Vec({elem}x{n})")


U8x64, I32x16, F32x16 = Vec(types.uint8, 64), Vec(types.int32, 16), Vec(types.float32, 16)


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.elem).get_value_type(), fe_type.n))


_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V64I8, _V16I32, _V16F32 = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)


def _addr(context, builder, aryty, ary, off):
    """Pointer to element `off` of a 1-D array."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [off], source_etype=context.get_data_type(aryty.dtype))


def _load(builder, ptr, ty):
    return builder.load(ptr, typ=ty, align=1)


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _vconst(vty, value):
    return ir.Constant(vty, [ir.Constant(vty.element, value)] * vty.count)


def _check_1d(ary, dtype):
    return isinstance(ary, types.Array) and ary.ndim == 1 and ary.dtype == dtype


# ---------------------------------------------------------------------------------------------
# Loads and stores (1-D arrays; `off` counts elements of the array's dtype).


@intrinsic
def load_u8x64(typingctx, ary, off):
    """The 64 bytes ary[off:off+64] of a uint8 array."""
    if not (_check_1d(ary, types.uint8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return _load(builder, _addr(context, builder, sig.args[0], args[0], args[1]), _V64I8)
    return U8x64(ary, off), codegen


def _widening_load(src_dtype, signed):
    @intrinsic
    def load(typingctx, ary, off):
        if not (_check_1d(ary, types.uint8) and isinstance(off, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            src = ir.VectorType(ir.HalfType() if src_dtype == types.float16 else context.get_data_type(src_dtype), 16)
            v = _load(builder, _addr(context, builder, sig.args[0], args[0], args[1]), src)
            if src_dtype == types.float16:
                return builder.fpext(v, _V16F32)
            if src_dtype == types.float32:
                return v
            return (builder.sext if signed else builder.zext)(v, _V16I32)
        out = F32x16 if src_dtype in (types.float16, types.float32) else I32x16
        return out(ary, off), codegen
    return load


# 16 values read from the bytes of a uint8 array at byte offset `off`, widened to 32 bits.
load_u8x16 = _widening_load(types.uint8, False)     # uint8 -> I32x16
load_i8x16 = _widening_load(types.int8, True)       # int8 -> I32x16
load_f16x16 = _widening_load(types.float16, False)  # float16 -> F32x16 (exact)
load_f32x16 = _widening_load(types.float32, False)  # float32 -> F32x16


@intrinsic
def store_f32x16(typingctx, ary, off, v, n):
    """ary[off:off+n] = v[:n] (n <= 16; the rest of the vector is not written)."""
    if not (_check_1d(ary, types.float32) and v == F32x16 and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _addr(context, builder, sig.args[0], args[0], args[1])
        lanes = ir.Constant(_V16I32, list(range(16)))
        n32 = builder.trunc(args[3], _I32) if args[3].type.width > 32 else args[3]
        mask = builder.icmp_signed("<", lanes, _splat(builder, n32, _V16I32))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_V16F32, ptr.type, _I32, mask.type]),
            "llvm.masked.store.v16f32.p0")
        builder.call(fn, [args[2], ptr, ir.Constant(_I32, 4), mask])
        return context.get_dummy_value()
    return types.none(ary, off, v, n), codegen


@intrinsic
def prefetch(typingctx, ary, off):
    """Hint the cache line holding ary[off] into the cache (never faults, even past the end)."""
    if not (isinstance(ary, types.Array) and ary.ndim == 1 and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.gep(data, [args[1]], source_etype=context.get_data_type(sig.args[0].dtype))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32]), "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return types.none(ary, off), codegen


# ---------------------------------------------------------------------------------------------
# Byte operations.


@intrinsic
def lo_nibbles(typingctx, v):
    """Each byte & 0x0F."""
    if v != U8x64:
        return None
    return U8x64(v), lambda context, builder, sig, args: builder.and_(args[0], _vconst(_V64I8, 0x0F))


@intrinsic
def hi_nibbles(typingctx, v):
    """Each byte >> 4."""
    if v != U8x64:
        return None
    return U8x64(v), lambda context, builder, sig, args: builder.lshr(args[0], _vconst(_V64I8, 4))


@intrinsic
def or_u8x64(typingctx, a, b):
    if a != U8x64 or b != U8x64:
        return None
    return U8x64(a, b), lambda context, builder, sig, args: builder.or_(args[0], args[1])


def _byte_op(op):
    @intrinsic
    def f(typingctx, v, n):
        if v != U8x64 or not isinstance(n, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            n = context.cast(builder, args[1], sig.args[1], types.uint8)
            return getattr(builder, op)(args[0], _splat(builder, n, _V64I8))
        return U8x64(v, n), codegen
    return f


shl_u8 = _byte_op("shl")     # each byte << n
shr_u8 = _byte_op("lshr")    # each byte >> n (logical)
and_u8 = _byte_op("and_")    # each byte & n


# ---------------------------------------------------------------------------------------------
# The 8-bit dot: acc[l] += sum_{i<4} w[4l+i] * x[off+i], w unsigned, x signed.


def _dot4_generic(builder, acc, w, xb):
    wz = builder.zext(w, ir.VectorType(_I32, 64))
    xs = builder.sext(xb, ir.VectorType(_I32, 64))
    p = builder.mul(wz, xs)
    undef = ir.Constant(p.type, ir.Undefined)
    for i in range(4):
        lane = builder.shuffle_vector(p, undef, ir.Constant(_V16I32, [4 * l + i for l in range(16)]))
        acc = builder.add(acc, lane)
    return acc


@intrinsic
def dot4(typingctx, acc, w, x, off):
    """acc + (16 lanes: the 4 weight bytes of each lane . the 4 int8 activations x[off:off+4])."""
    if not (acc == I32x16 and w == U8x64 and _check_1d(x, types.int8) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        x4 = _load(builder, _addr(context, builder, sig.args[2], args[2], args[3]), _I32)
        xb = builder.bitcast(_splat(builder, x4, _V16I32), _V64I8)
        if MODE == "vnni":
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_V16I32, [_V16I32, _V64I8, _V64I8]), "llvm.x86.avx512.vpdpbusd.512")
            return builder.call(fn, [args[0], args[1], xb])
        return _dot4_generic(builder, args[0], args[1], xb)
    return I32x16(acc, w, x, off), codegen


# ---------------------------------------------------------------------------------------------
# Lane-wise arithmetic.


@intrinsic
def zeros_i32x16(typingctx):
    return I32x16(), lambda context, builder, sig, args: _vconst(_V16I32, 0)


@intrinsic
def zeros_f32x16(typingctx):
    return F32x16(), lambda context, builder, sig, args: _vconst(_V16F32, 0.0)


def _binary(vt, op):
    @intrinsic
    def f(typingctx, a, b):
        if a != vt or b != vt:
            return None
        return vt(a, b), lambda context, builder, sig, args: getattr(builder, op)(args[0], args[1])
    return f


add_i32 = _binary(I32x16, "add")
sub_i32 = _binary(I32x16, "sub")
mul_i32 = _binary(I32x16, "mul")
add_f32 = _binary(F32x16, "fadd")
sub_f32 = _binary(F32x16, "fsub")
mul_f32 = _binary(F32x16, "fmul")


@intrinsic
def splat_i32(typingctx, x):
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.int32)
        return _splat(builder, v, _V16I32)
    return I32x16(x), codegen


@intrinsic
def splat_f32(typingctx, x):
    if not isinstance(x, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, context.cast(builder, args[0], sig.args[0], types.float32), _V16F32)
    return F32x16(x), codegen


@intrinsic
def to_f32(typingctx, v):
    """int32 lanes converted to float32 (exact below 2**24)."""
    if v != I32x16:
        return None
    return F32x16(v), lambda context, builder, sig, args: builder.sitofp(args[0], _V16F32)


@intrinsic
def fma_f32(typingctx, a, b, c):
    """a * b + c, lane by lane, rounded once (llvm.fma)."""
    if not (a == b == c == F32x16):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F32, [_V16F32] * 3), "llvm.fma.v16f32")
        return builder.call(fn, list(args))
    return F32x16(a, b, c), codegen


@intrinsic
def lane_f32(typingctx, v, i):
    """Element i of a float vector."""
    if v != F32x16 or not isinstance(i, types.Integer):
        return None
    return types.float32(v, i), lambda context, builder, sig, args: builder.extract_element(args[0], args[1])


# ---------------------------------------------------------------------------------------------
# Small stack buffers of vectors: one accumulator per token of a prefill tile.


class VecBuf(types.Type):
    """A stack buffer of `n` vectors of type `vec` (an LLVM alloca in the function's entry)."""

    def __init__(self, vec: Vec, n: int):
        self.vec, self.n = vec, n
        super().__init__(name=f"VecBuf({vec}x{n})")


@register_model(VecBuf)
class _VecBufModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        vty = dmm.lookup(fe_type.vec).get_value_type()
        super().__init__(dmm, fe_type, ir.ArrayType(vty, fe_type.n).as_pointer())


def _buffer(vec):
    @intrinsic
    def make(typingctx, n):
        if not isinstance(n, types.IntegerLiteral):
            return None
        bt = VecBuf(vec, n.literal_value)

        def codegen(context, builder, sig, args):
            aty = ir.ArrayType(context.get_value_type(vec), bt.n)
            return cgutils.alloca_once(builder, aty)
        return bt(n), codegen
    return make


i32x16_buffer = _buffer(I32x16)   # i32x16_buffer(8): 8 I32x16 accumulators
f32x16_buffer = _buffer(F32x16)


def _slot(context, builder, bt, buf, i):
    return builder.gep(buf, [ir.Constant(_I64, 0), i], inbounds=True)


@intrinsic
def get(typingctx, buf, i):
    """buf[i]"""
    if not (isinstance(buf, VecBuf) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_slot(context, builder, sig.args[0], args[0], args[1]), typ=context.get_value_type(buf.vec))
    return buf.vec(buf, i), codegen


@intrinsic
def put(typingctx, buf, i, v):
    """buf[i] = v"""
    if not (isinstance(buf, VecBuf) and isinstance(i, types.Integer) and v == buf.vec):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _slot(context, builder, sig.args[0], args[0], args[1]))
        return context.get_dummy_value()
    return types.none(buf, i, v), codegen
