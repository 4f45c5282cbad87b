"""Device intrinsics numba.cuda does not expose, each with a plain-Python twin for the simulator.

On a GPU these are inline PTX (llvmlite `InlineAsm`, through `numba.cuda.extending.intrinsic`):

* `dp4a(a, b, c)`: c + the dot of the four signed bytes of a with those of b (`dp4a.s32.s32`):
  the integer dot that every quantized product is built on (llama.cpp's mmvq does the same);
* `ldg4(a, i)`: a[i], a[i+1], a[i+2], a[i+3] of a uint32 array in one 16-byte load through the
  read-only cache (`ld.global.nc.v4.u32`): how weights are streamed (i must be a multiple of 4);
* `f16_bits(h)` / `f32_bits(u)`: the float32 value of f16 / f32 bit patterns (`cvt` / `mov`);
* `warp_sum(v)` / `warp_max(v)`: a butterfly over the 32 lanes of a warp (`shfl.sync.bfly`);
  every lane gets the result.

Under `NUMBA_ENABLE_CUDASIM=1` (CI has no GPU) the twins compute the same values in Python. The
simulator has no warp shuffles, so its `warp_sum` goes through shared memory with block-wide
barriers: kernels call the warp reductions in block-uniform control flow (every thread of the
block, no early return), which is also what keeps them correct on the GPU.
"""
import numpy as np
from numba import config, cuda

SIM = bool(config.ENABLE_CUDASIM)

if SIM:
    def _s8(v):
        v &= 0xFF
        return v - 256 if v >= 128 else v

    def dp4a(a, b, c):
        a, b = int(a) & 0xFFFFFFFF, int(b) & 0xFFFFFFFF
        return int(c) + sum(_s8(a >> s) * _s8(b >> s) for s in (0, 8, 16, 24))

    def ldg4(a, i):
        return int(a[i]), int(a[i + 1]), int(a[i + 2]), int(a[i + 3])

    def f16_bits(h):
        return np.float32(np.array([int(h) & 0xFFFF], np.uint16).view(np.float16)[0])

    def f32_bits(u):
        return np.array([int(u) & 0xFFFFFFFF], np.uint32).view(np.float32)[0]

    def _warp_reduce(v, op, shared, tid, nthreads, sync):
        buf = shared.array(1024, np.float64)  # one per block (the simulator keys it by line)
        sync()
        buf[tid] = v
        sync()
        base = tid - tid % 32
        r = op(buf[base:base + min(32, nthreads - base)])
        sync()
        return float(r) if isinstance(v, float) else type(v)(r)

    # Decorated so the simulator gives them its per-thread `cuda` module (shared memory, ids).
    @cuda.jit(device=True)
    def warp_sum(v):
        t, b = cuda.threadIdx, cuda.blockDim
        return _warp_reduce(v, np.sum, cuda.shared, t.x + b.x * (t.y + b.y * t.z), b.x * b.y * b.z,
                            cuda.syncthreads)

    @cuda.jit(device=True)
    def warp_max(v):
        t, b = cuda.threadIdx, cuda.blockDim
        return _warp_reduce(v, np.max, cuda.shared, t.x + b.x * (t.y + b.y * t.z), b.x * b.y * b.z,
                            cuda.syncthreads)

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    _i32 = ir.IntType(32)

    @intrinsic
    def _dp4a(typingctx, a, b, c):
        sig = types.int32(types.int32, types.int32, types.int32)

        def codegen(context, builder, sig, args):
            fn = ir.FunctionType(_i32, [_i32, _i32, _i32])
            asm = ir.InlineAsm(fn, "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r")
            return builder.call(asm, args)

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def dp4a(a, b, c):
        return _dp4a(np.int32(a), np.int32(b), np.int32(c))

    @intrinsic
    def ldg4(typingctx, a, i):
        if not (isinstance(a, types.Array) and a.dtype == types.uint32 and a.ndim == 1):
            return None
        ret = types.UniTuple(types.uint32, 4)
        sig = ret(a, types.intp)

        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, value=args[0])
            idx = context.cast(builder, args[1], sig.args[1], types.intp)
            ptr = builder.gep(arr.data, [idx])
            st = ir.LiteralStructType([_i32] * 4)
            asm = ir.InlineAsm(ir.FunctionType(st, [ptr.type]),
                               "ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l")
            r = builder.call(asm, [ptr])
            return context.make_tuple(builder, ret, [builder.extract_value(r, j) for j in range(4)])

        return sig, codegen

    @intrinsic
    def _f16_bits(typingctx, h):
        sig = types.float32(types.uint16)

        def codegen(context, builder, sig, args):
            fn = ir.FunctionType(ir.FloatType(), [ir.IntType(16)])
            return builder.call(ir.InlineAsm(fn, "cvt.f32.f16 $0, $1;", "=f,h"), args)

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def f16_bits(h):
        return _f16_bits(np.uint16(h))

    @intrinsic
    def _f32_bits(typingctx, u):
        sig = types.float32(types.uint32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def f32_bits(u):
        return _f32_bits(np.uint32(u))

    @cuda.jit(device=True, inline=True)
    def warp_sum(v):
        for m in (16, 8, 4, 2, 1):
            v += cuda.shfl_xor_sync(0xFFFFFFFF, v, m)
        return v

    @cuda.jit(device=True, inline=True)
    def warp_max(v):
        for m in (16, 8, 4, 2, 1):
            v = max(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, m))
        return v
