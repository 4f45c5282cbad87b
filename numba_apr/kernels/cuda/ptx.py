"""Device intrinsics numba.cuda does not expose, each with a plain-Python twin for the simulator.

On a GPU these are inline PTX (llvmlite `InlineAsm`, through `numba.cuda.extending.intrinsic`):

* `dp4a(a, b, c)`: c + the dot of the four signed bytes of a with those of b (`dp4a.s32.s32`):
  the integer dot that every quantized product is built on (llama.cpp's mmvq does the same);
* `ldg4(a, i)`: a[i], a[i+1], a[i+2], a[i+3] of a uint32 array in one 16-byte load through the
  read-only cache (`ld.global.nc.v4.u32`): how weights are streamed (i must be a multiple of 4);
  `ldg4_2d(a, i, j)` the same for a[i, j..j+3] of an int32 matrix whose rows are contiguous and
  16-byte aligned (j a multiple of 4): how decode products read the q8 activations;
  `ld4_2d(a, i, j)` the same through a generic load (`ld.v4.s32`), for an array that may be
  in shared memory (16-byte aligned too: numba aligns a shared int32 array to 4 bytes only, so
  `aligned16` gives the view of a [1, n + 3] one that starts on a 16-byte boundary);
* `at(a, i)`: a[i] of a 1-d array as a plain load, without numba's negative-index wraparound
  (i >= 0 is the caller's promise): where a loop's index is not provably non-negative, the
  wraparound's select and 64-bit arithmetic stop LLVM from turning the addresses into a base
  plus constants (the few-token kernel's loop: 141 instructions an mma with it);
* `ldcg(a, i, j, k, l)`: a[i, j, k, l] of a 4-d float32 array, read through L2 only
  (`ld.global.cg`): values other blocks of the same launch wrote (and fenced), which this
  multiprocessor's L1 might hold stale;
* `f16_bits(h)` / `f32_bits(u)`: the float32 value of f16 / f32 bit patterns (`cvt` / `mov`);
* `warp_sum(v)` / `warp_max(v)`: a butterfly over the 32 lanes of a warp (`shfl.sync.bfly`);
  every lane gets the result; `lanes_sum(v, n)` / `lanes_max(v, n)` the same over each n
  (2, 4, .., 32) neighbouring lanes;
* `mma_s8(a0, a1, b0)`: one int8 tensor-core product of the warp, D[16x8] = A[16x16] B[16x8]
  (`mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32`). With g = lane // 4, q = lane % 4, each
  lane holds A's row g bytes 4q..4q+3 (a0) and row g+8's (a1), B's column g, rows 4q..4q+3 (b0),
  and gets D[g, 2q], D[g, 2q+1], D[g+8, 2q], D[g+8, 2q+1]: how prompts are multiplied;
  `mma_s8_k32(a0, a1, a2, a3, b0, b1)` the same over k = 32 (`m16n8k32`), a2 / a3 / b1 holding
  k = 16 + 4q.. (the sum of two k16 products, in one instruction);
* `grid_dep()`: wait until the kernel launched before this one has finished and its writes are
  visible, then let the kernel after this one launch (`griddepcontrol.wait` and
  `.launch_dependents`: programmatic dependent launch, compute capability 9.0 and up; nothing on
  older GPUs). See launch.py's `overlapped`: a kernel so marked calls it before it touches memory;
* `prefetch_l2(a, i, n)`: ask for a[i : i + n] of a uint32 array to be brought into L2 (one
  `cp.async.bulk.prefetch.L2`, whole 16-byte chunks inside the array; compute capability 9.0 and
  up, nothing on older GPUs): what an overlapped kernel does with its weights before it waits;
* `syncwarp()`: the warp's barrier (`bar.warp.sync`); the simulator's is the block's.

Under `NUMBA_ENABLE_CUDASIM=1` (CI has no GPU) the twins compute the same values in Python. The
simulator has no warp shuffles, so its `warp_sum` goes through shared memory with block-wide
barriers: kernels call the warp reductions in block-uniform control flow (every thread of the
block, no early return), which is also what keeps them correct on the GPU. `mma_s8` is a warp
collective on the GPU too, so the same rule holds there.
"""
import numpy as np
from numba import config, cuda

SIM = bool(config.ENABLE_CUDASIM)

if SIM:
    def _thread_safe_sim_shared():
        """numba's simulator keys a block's shared arrays by source line and creates one the
        first time a thread reaches the line, unlocked: two threads arriving together can each
        create one and then work on different "shared" arrays (seen as ~10% of sampling calls
        failing). The same lookup, under a lock. Simulator only; idempotent."""
        import sys
        import threading
        from numba.core import types
        from numba.cuda.simulator import kernelapi
        from numba.np import numpy_support

        cls = kernelapi.FakeCUDAShared
        if getattr(cls, "_numba_apr_locked", False):
            return
        lock = threading.Lock()
        dynamic = cls.array

        def array(self, shape, dtype):
            if shape == 0:
                return dynamic(self, shape, dtype)
            if isinstance(dtype, types.Type):
                dtype = numpy_support.as_dtype(dtype)
            f = sys._getframe(1)
            caller = (f.f_code.co_filename, f.f_lineno)
            with lock:
                res = self._allocations.get(caller)
                if res is None:
                    res = self._allocations[caller] = np.empty(shape, dtype)
            return res

        cls.array = array
        cls._numba_apr_locked = True

    _thread_safe_sim_shared()

    def _s8(v):
        v &= 0xFF
        return v - 256 if v >= 128 else v

    def dp4a(a, b, c):
        a, b = int(a) & 0xFFFFFFFF, int(b) & 0xFFFFFFFF
        return int(c) + sum(_s8(a >> s) * _s8(b >> s) for s in (0, 8, 16, 24))

    def ldg4(a, i):
        return int(a[i]), int(a[i + 1]), int(a[i + 2]), int(a[i + 3])

    def ldg4_2d(a, i, j):
        return int(a[i, j]), int(a[i, j + 1]), int(a[i, j + 2]), int(a[i, j + 3])

    def ldcg(a, i, j, k, l):
        return a[i, j, k, l]

    ld4_2d = ldg4_2d

    def at(a, i):
        assert i >= 0
        return a[i]

    def aligned16(a):
        return a[:, :a.shape[1] - 3]

    def f16_bits(h):
        return np.float32(np.array([int(h) & 0xFFFF], np.uint16).view(np.float16)[0])

    def f32_bits(u):
        return np.array([int(u) & 0xFFFFFFFF], np.uint32).view(np.float32)[0]

    def _warp_reduce(v, op, shared, tid, nthreads, sync, n):
        buf = shared.array(1024, np.float64)  # one per block (the simulator keys it by line)
        sync()
        buf[tid] = v
        sync()
        base = tid - tid % n
        r = op(buf[base:base + min(n, nthreads - base)])
        sync()
        return float(r) if isinstance(v, float) else type(v)(r)

    def _bytes(v):
        return np.array([int(v) & 0xFFFFFFFF], np.uint32).view(np.int8).astype(np.int64)

    def _mma_s8(tid, a0, a1, b0, shared, sync):
        buf = shared.array((1024, 3), np.int64)   # the warp's fragments, exchanged
        sync()
        buf[tid, 0], buf[tid, 1], buf[tid, 2] = int(a0), int(a1), int(b0)
        sync()
        base = tid - tid % 32
        A, B = np.zeros((16, 16), np.int64), np.zeros((16, 8), np.int64)
        for ln in range(32):
            g, q = ln >> 2, ln & 3
            A[g, 4 * q:4 * q + 4] = _bytes(buf[base + ln, 0])
            A[g + 8, 4 * q:4 * q + 4] = _bytes(buf[base + ln, 1])
            B[4 * q:4 * q + 4, g] = _bytes(buf[base + ln, 2])
        sync()
        D = A @ B
        g, q = (tid % 32) >> 2, tid & 3
        return int(D[g, 2 * q]), int(D[g, 2 * q + 1]), int(D[g + 8, 2 * q]), int(D[g + 8, 2 * q + 1])

    # Decorated so the simulator gives them its per-thread `cuda` module (shared memory, ids).
    @cuda.jit(device=True)
    def mma_s8(a0, a1, b0):
        t, b = cuda.threadIdx, cuda.blockDim
        return _mma_s8(t.x + b.x * (t.y + b.y * t.z), a0, a1, b0, cuda.shared, cuda.syncthreads)

    @cuda.jit(device=True)
    def mma_s8_k32(a0, a1, a2, a3, b0, b1):
        lo, hi = mma_s8(a0, a1, b0), mma_s8(a2, a3, b1)
        return lo[0] + hi[0], lo[1] + hi[1], lo[2] + hi[2], lo[3] + hi[3]

    @cuda.jit(device=True)
    def grid_dep():
        pass

    @cuda.jit(device=True)
    def prefetch_l2(a, i, n):
        pass

    @cuda.jit(device=True)
    def lanes_sum(v, n):
        t, b = cuda.threadIdx, cuda.blockDim
        return _warp_reduce(v, np.sum, cuda.shared, t.x + b.x * (t.y + b.y * t.z), b.x * b.y * b.z,
                            cuda.syncthreads, n)

    @cuda.jit(device=True)
    def lanes_max(v, n):
        t, b = cuda.threadIdx, cuda.blockDim
        return _warp_reduce(v, np.max, cuda.shared, t.x + b.x * (t.y + b.y * t.z), b.x * b.y * b.z,
                            cuda.syncthreads, n)

    @cuda.jit(device=True)
    def warp_sum(v):
        return lanes_sum(v, 32)

    @cuda.jit(device=True)
    def warp_max(v):
        return lanes_max(v, 32)

    @cuda.jit(device=True)
    def syncwarp():
        # The simulator has no warps (and no syncwarp): callers call it block-uniformly.
        cuda.syncthreads()

else:
    from llvmlite import ir
    from numba import types
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

    def _ldg4_codegen(kind, op="ld.global.nc"):
        """codegen of a 16-byte load (`op`: read-only global by default) of the 4 elements from
        a[indices] on."""
        def codegen(context, builder, sig, args):
            from numba.core import cgutils
            arr = context.make_array(sig.args[0])(context, builder, value=args[0])
            inds = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], sig.args[1:])]
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], arr, inds)
            st = ir.LiteralStructType([_i32] * 4)
            asm = ir.InlineAsm(ir.FunctionType(st, [ptr.type]),
                               f"{op}.v4.{kind} {{$0, $1, $2, $3}}, [$4];", "=r,=r,=r,=r,l")
            r = builder.call(asm, [ptr])
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(r, j) for j in range(4)])
        return codegen

    @intrinsic
    def ldg4(typingctx, a, i):
        if not (isinstance(a, types.Array) and a.dtype == types.uint32 and a.ndim == 1):
            return None
        return types.UniTuple(types.uint32, 4)(a, types.intp), _ldg4_codegen("u32")

    @intrinsic
    def ldg4_2d(typingctx, a, i, j):
        if not (isinstance(a, types.Array) and a.dtype == types.int32 and a.ndim == 2):
            return None
        return types.UniTuple(types.int32, 4)(a, types.intp, types.intp), _ldg4_codegen("s32")

    @intrinsic
    def _address(typingctx, a):
        if not isinstance(a, types.Array):
            return None

        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, value=args[0])
            return builder.ptrtoint(arr.data, ir.IntType(64))

        return types.int64(a), codegen

    @cuda.jit(device=True, inline=True)
    def aligned16(a):
        off = ((16 - (_address(a) & 15)) & 15) >> 2
        return a[:, off:off + a.shape[1] - 3]

    @intrinsic
    def ld4_2d(typingctx, a, i, j):
        if not (isinstance(a, types.Array) and a.dtype == types.int32 and a.ndim == 2):
            return None
        return types.UniTuple(types.int32, 4)(a, types.intp, types.intp), _ldg4_codegen("s32", "ld")

    @intrinsic
    def at(typingctx, a, i):
        if not (isinstance(a, types.Array) and a.ndim == 1 and isinstance(i, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            from numba.core import cgutils
            arr = context.make_array(sig.args[0])(context, builder, value=args[0])
            idx = context.cast(builder, args[1], sig.args[1], types.intp)
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], arr, [idx])   # (no wraparound)
            return context.unpack_value(builder, sig.args[0].dtype, ptr)

        return a.dtype(a, i), codegen

    @intrinsic
    def ldcg(typingctx, a, i, j, k, l):
        if not (isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 4):
            return None

        def codegen(context, builder, sig, args):
            from numba.core import cgutils
            arr = context.make_array(sig.args[0])(context, builder, value=args[0])
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], arr, list(args[1:]))
            asm = ir.InlineAsm(ir.FunctionType(ir.FloatType(), [ptr.type]), "ld.global.cg.f32 $0, [$1];", "=f,l",
                               side_effect=True)
            return builder.call(asm, [ptr])

        return types.float32(a, types.intp, types.intp, types.intp, types.intp), codegen

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

    def _mma_intrinsic(shape, n_a, n_b):
        """(signature, codegen) of an int8 `mma.sync` with n_a A and n_b B registers and a zero
        accumulator, giving the 4 int32 of D."""
        n_in = n_a + n_b

        def regs(lo, n):
            return "{" + ", ".join(f"${i}" for i in range(lo, lo + n)) + "}"

        text = (f"mma.sync.aligned.{shape}.row.col.s32.s8.s8.s32 {regs(0, 4)}, {regs(4, n_a)}, "
                f"{regs(4 + n_a, n_b)}, {regs(4 + n_in, 4)};")
        ret = types.UniTuple(types.int32, 4)

        def codegen(context, builder, sig, args):
            fn = ir.FunctionType(ir.LiteralStructType([_i32] * 4), [_i32] * (n_in + 4))
            asm = ir.InlineAsm(fn, text, ",".join(["=r"] * 4 + ["r"] * (n_in + 4)))
            r = builder.call(asm, list(args) + [ir.Constant(_i32, 0)] * 4)
            return context.make_tuple(builder, ret, [builder.extract_value(r, j) for j in range(4)])

        return ret(*[types.int32] * n_in), codegen

    @intrinsic
    def _mma_s8(typingctx, a0, a1, b0):
        return _mma_intrinsic("m16n8k16", 2, 1)

    @cuda.jit(device=True, inline=True)
    def mma_s8(a0, a1, b0):
        return _mma_s8(np.int32(a0), np.int32(a1), np.int32(b0))

    @intrinsic
    def _mma_s8_k32(typingctx, a0, a1, a2, a3, b0, b1):
        return _mma_intrinsic("m16n8k32", 4, 2)

    @cuda.jit(device=True, inline=True)
    def mma_s8_k32(a0, a1, a2, a3, b0, b1):
        return _mma_s8_k32(np.int32(a0), np.int32(a1), np.int32(a2), np.int32(a3), np.int32(b0), np.int32(b1))

    @intrinsic
    def _grid_dep(typingctx):
        def codegen(context, builder, sig, args):
            from numba.core import targetconfig   # the capability being compiled for
            if targetconfig.ConfigStack().top().compute_capability >= (9, 0):
                # a memory clobber: no load or store moves above the wait
                asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []),
                                   "griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;", "~{memory}",
                                   side_effect=True)
                builder.call(asm, [])
            return context.get_dummy_value()

        return types.void(), codegen

    @cuda.jit(device=True, inline=True)
    def grid_dep():
        _grid_dep()

    @intrinsic
    def _prefetch_l2(typingctx, a, i, nbytes):
        if not (isinstance(a, types.Array) and a.dtype == types.uint32 and a.ndim == 1):
            return None

        def codegen(context, builder, sig, args):
            from numba.core import cgutils, targetconfig
            if targetconfig.ConfigStack().top().compute_capability >= (9, 0):
                arr = context.make_array(sig.args[0])(context, builder, value=args[0])
                ptr = cgutils.get_item_pointer(context, builder, sig.args[0], arr, [args[1]])
                asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [ptr.type, _i32]),
                                   "cp.async.bulk.prefetch.L2.global [$0], $1;", "l,r", side_effect=True)
                builder.call(asm, [ptr, builder.trunc(args[2], _i32)])
            return context.get_dummy_value()

        return types.void(a, types.intp, types.intp), codegen

    @cuda.jit(device=True, inline=True)
    def prefetch_l2(a, i, n):
        # whole 16-byte chunks (the instruction's unit): the array starts 16-byte aligned
        lo = i & ~3
        hi = min(i + n + 3, a.shape[0]) & ~3
        if hi > lo:
            _prefetch_l2(a, lo, 4 * (hi - lo))

    @cuda.jit(device=True, inline=True)
    def lanes_sum(v, n):
        m = n >> 1
        while m > 0:
            v += cuda.shfl_xor_sync(0xFFFFFFFF, v, m)
            m >>= 1
        return v

    @cuda.jit(device=True, inline=True)
    def lanes_max(v, n):
        m = n >> 1
        while m > 0:
            v = max(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, m))
            m >>= 1
        return v

    @cuda.jit(device=True, inline=True)
    def warp_sum(v):
        return lanes_sum(v, 32)

    @cuda.jit(device=True, inline=True)
    def warp_max(v):
        return lanes_max(v, 32)

    @cuda.jit(device=True, inline=True)
    def syncwarp():
        cuda.syncwarp()
