"""Fixed-width SIMD vectors for Numba kernels: the few operations the integer dots need.

LLVM vectorises plain loops well when the vector runs along the loop, but the quantized dots
want the vector *across* 16 weight rows and an 8-bit multiply-add that sums 4 products per
32-bit lane (x86 `vpdpbusd`), which no loop vectoriser produces. So this module gives Numba
three vector value types, held in registers like any scalar:

    U8x64   64 unsigned bytes (16 rows x 4 consecutive weights of each)
    I32x16  16 int32 lanes (one per row)
    F32x16  16 float32 lanes (one per row)

and intrinsics that emit LLVM vector IR for them. `dot4` is the workhorse: for each of the 16
lanes, acc += sum over its 4 bytes of weight x s8 activation, with the same 4 activation bytes
broadcast to every lane. It is written once per instruction-set level (isa.py):

    avx512vnni  one `vpdpbusd` (zmm)
    avxvnni     two VEX `vpdpbusd` (ymm halves)
    avx2        per ymm half `vpmaddubsw` + `vpmaddwd` by ones + `vpaddd`
    neon        four `sdot` (128-bit quarters)
    generic     widening multiplies and adds in plain IR, which LLVM lowers to what the CPU has

`dot4` takes weights below 128 (every 4-, 5- and 6-bit type, stored unsigned): there `vpmaddubsw`
cannot saturate (2 x 127 x 128 < 2^15) and `sdot` reads them as they are. Q8_0's full bytes
go through `dot4_q8`, over bytes stored as the level wants them (Q8_BIAS): unsigned with +128 for
`vpdpbusd`, whose bias the kernel takes back out with the activations' block sums; signed
elsewhere, where AVX2 multiplies |w| by x with w's sign (`vpsignb`, llama.cpp's trick) and NEON's
`sdot` is signed anyway. The LLVM IR of each form is made by plain functions (`dot4_ir`), so a
test can compile it for a target this machine is not (aarch64) and read the assembly.

Numba has no bounds checks here either: callers pass offsets they have validated.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from .isa import LEVEL

#: How Q8_0 weight bytes are stored in the repacked layout for this level: + 128 (unsigned, for
#: `vpdpbusd`) or as they are (signed).
Q8_BIAS = 128 if LEVEL in ("avx512vnni", "avxvnni") else 0
#: Tokens of a prompt tile (kernels/cpu/qmatmul.py): their accumulators must fit the registers
#: (32 zmm with AVX-512; 16 ymm or 32 q registers of half or a quarter the width elsewhere).
TILE = 8 if LEVEL == "avx512vnni" else 4


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


def _f16_to_f32(builder, h):
    """16 IEEE half bit patterns -> float32, exactly. With F16C (every level but generic) one
    `vcvtph2ps`; the generic level builds the floats from the bits, since a CPU without F16C would
    call a runtime helper (__extendhfsf2) that Numba's JIT does not link."""
    if LEVEL != "generic":
        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 16)), _V16F32)
    v16i32 = _V16I32
    h32 = builder.zext(h, v16i32)
    sign = builder.shl(builder.and_(h32, _vconst(v16i32, 0x8000)), _vconst(v16i32, 16))
    em = builder.and_(h32, _vconst(v16i32, 0x7FFF))
    exp = builder.lshr(em, _vconst(v16i32, 10))
    # Normal numbers: rebias the exponent (15 -> 127); inf and nan: exponent 31 -> 255.
    bits = builder.add(builder.shl(em, _vconst(v16i32, 13)), _vconst(v16i32, 112 << 23))
    infnan = builder.add(builder.shl(em, _vconst(v16i32, 13)), _vconst(v16i32, 224 << 23))
    bits = builder.select(builder.icmp_unsigned("==", exp, _vconst(v16i32, 31)), infnan, bits)
    # Zeros and subnormals: mantissa x 2^-24, exact in float32.
    sub = builder.fmul(builder.sitofp(builder.and_(em, _vconst(v16i32, 0x3FF)), _V16F32), _vconst(_V16F32, 2.0 ** -24))
    mag = builder.select(builder.icmp_unsigned("==", exp, _vconst(v16i32, 0)), builder.bitcast(sub, v16i32), bits)
    return builder.bitcast(builder.or_(mag, sign), _V16F32)


def _widening_load(src_dtype, signed):
    @intrinsic
    def load(typingctx, ary, off):
        if not (_check_1d(ary, types.uint8) and isinstance(off, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            src = ir.VectorType(_I16 if src_dtype == types.float16 else context.get_data_type(src_dtype), 16)
            v = _load(builder, _addr(context, builder, sig.args[0], args[0], args[1]), src)
            if src_dtype == types.float16:
                return _f16_to_f32(builder, v)
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


def _parts(builder, v, n):
    """v split into n equal vectors (in order)."""
    w = v.type.count // n
    undef = ir.Constant(v.type, ir.Undefined)
    return [builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_I32, w), list(range(i * w, i * w + w))))
            for i in range(n)]


def _join(builder, parts):
    """The vectors `parts` (equal types) concatenated."""
    while len(parts) > 1:
        a, b = parts[0], parts[1]
        n = a.type.count
        parts = parts[2:] + [builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n))))]
    return parts[0]


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _per_part(builder, n, acc, w, xb, op):
    """op(acc part, w part, x part) over n equal parts, joined back into 16 lanes."""
    return _join(builder, [op(a, b, c) for a, b, c in zip(_parts(builder, acc, n), _parts(builder, w, n),
                                                            _parts(builder, xb, n))])


def _avx2_madd(builder, acc, w, x):
    """acc (8 x i32) + per lane the 4 products w (u8) x x (s8), summed: vpmaddubsw, vpmaddwd."""
    p16 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(_I16, 16), [w, x])
    ones = _vconst(ir.VectorType(_I16, 16), 1)
    return builder.add(acc, _call(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(_I32, 8), [p16, ones]))


def _generic_dot(builder, acc, w, xb, signed_w):
    """Products in 16 bits (|w x| <= 255 x 128 fits), summed pairwise into 32-bit lanes: shapes
    LLVM's vectoriser recognises (pmaddwd on x86)."""
    v64i16 = ir.VectorType(_I16, 64)
    p = builder.mul((builder.sext if signed_w else builder.zext)(w, v64i16), builder.sext(xb, v64i16))
    undef = ir.Constant(p.type, ir.Undefined)
    v32i32 = ir.VectorType(_I32, 32)
    pairs = builder.add(builder.sext(builder.shuffle_vector(p, undef, ir.Constant(v32i32, list(range(0, 64, 2)))), v32i32),
                        builder.sext(builder.shuffle_vector(p, undef, ir.Constant(v32i32, list(range(1, 64, 2)))), v32i32))
    undef = ir.Constant(v32i32, ir.Undefined)
    even = builder.shuffle_vector(pairs, undef, ir.Constant(_V16I32, list(range(0, 32, 2))))
    odd = builder.shuffle_vector(pairs, undef, ir.Constant(_V16I32, list(range(1, 32, 2))))
    return builder.add(acc, builder.add(even, odd))


def dot4_ir(builder, level, acc, w, xb, full_bytes=False):
    """LLVM IR of acc (16 x i32) + per lane the dot of its 4 bytes of w (64 x i8) with those of
    xb (64 x i8, signed). `full_bytes`: w holds Q8_0 bytes in the level's storage (Q8_BIAS);
    otherwise w < 128."""
    if level == "avx512vnni":
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [acc, w, xb])
    if level == "avxvnni":
        return _per_part(builder, 2, acc, w, xb, lambda a, b, c: _call(builder, "llvm.x86.avx512.vpdpbusd.256",
                                                                         a.type, [a, b, c]))
    if level == "avx2":
        def madd(a, b, c):
            if full_bytes:  # signed w: |w| x (x with w's sign), exact as |x| <= 127
                c = _call(builder, "llvm.x86.avx2.psign.b", c.type, [c, b])
                b = _call(builder, "llvm.abs.v32i8", b.type, [b, ir.Constant(ir.IntType(1), 0)])
            return _avx2_madd(builder, a, b, c)
        return _per_part(builder, 2, acc, w, xb, madd)
    if level == "neon":
        return _per_part(builder, 4, acc, w, xb, lambda a, b, c: _call(
            builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", a.type, [a, b, c]))
    return _generic_dot(builder, acc, w, xb, full_bytes)


def _dot4_intrinsic(full_bytes):
    @intrinsic
    def dot(typingctx, acc, w, x, off):
        if not (acc == I32x16 and w == U8x64 and _check_1d(x, types.int8) and isinstance(off, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            x4 = _load(builder, _addr(context, builder, sig.args[2], args[2], args[3]), _I32)
            xb = builder.bitcast(_splat(builder, x4, _V16I32), _V64I8)
            return dot4_ir(builder, LEVEL, args[0], args[1], xb, full_bytes)
        return I32x16(acc, w, x, off), codegen
    return dot


#: dot4(acc, w, x, off): acc + (16 lanes: the 4 weight bytes of each lane, all < 128, . the 4
#: int8 activations x[off:off+4]).
dot4 = _dot4_intrinsic(False)
#: dot4_q8(acc, w, x, off): the same over Q8_0's full bytes, stored as Q8_BIAS says.
dot4_q8 = _dot4_intrinsic(True)


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
