"""Threads of one parallel region working in stages: atomics and a spinning barrier.

Numba's `prange` gives a fork and a join per parallel loop. A whole decode step run as one
`prange(n_threads)` region (kernels/cpu/step.py) needs the threads to meet between stages
instead, as llama.cpp's graph compute does: each thread adds one to a shared counter when it
reaches a barrier and spins (with the CPU's pause hint) until the counter reaches the barrier's
number times the thread count. The counter only grows during a step, so one counter serves
every barrier of the step; the caller zeroes it before the region.

This is only safe when every iteration of the region runs on its own thread at the same time:
`concurrent_iterations` checks that for the running threading layer (OpenMP and Numba's
workqueue hand out one static chunk per thread; TBB may run two on one thread, which would wait
forever).
"""
from __future__ import annotations

import platform

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..._numba import jit, pjit, prange

_I64 = ir.IntType(64)


def _ptr(context, builder, aryty, ary, i):
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [i], source_etype=context.get_data_type(aryty.dtype))


def _counter(ary):
    return isinstance(ary, types.Array) and ary.ndim == 1 and ary.dtype == types.int64


@intrinsic
def atomic_add(typingctx, ary, i, v):
    """ary[i] += v atomically (sequentially consistent: a release of every earlier store);
    returns the old value. ary is a 1-D int64 array."""
    if not (_counter(ary) and isinstance(i, types.Integer) and isinstance(v, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, context.cast(builder, args[2], sig.args[2], types.int64), "seq_cst")
    return types.int64(ary, i, v), codegen


@intrinsic
def atomic_load(typingctx, ary, i):
    """ary[i], read atomically with acquire order (no later load moves before it)."""
    if not (_counter(ary) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_ptr(context, builder, sig.args[0], args[0], args[1]), "acquire", 8, typ=_I64)
    return types.int64(ary, i), codegen


_PAUSE = {"x86_64": ("llvm.x86.sse2.pause", []), "AMD64": ("llvm.x86.sse2.pause", []),
          "aarch64": ("llvm.aarch64.hint", [1]), "arm64": ("llvm.aarch64.hint", [1])}.get(platform.machine())


@intrinsic
def spin_pause(typingctx):
    """The CPU's spin-wait hint (x86 `pause`, ARM `yield`; nothing elsewhere)."""
    def codegen(context, builder, sig, args):
        if _PAUSE is not None:
            name, consts = _PAUSE
            i32 = ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i32] * len(consts)), name)
            builder.call(fn, [ir.Constant(i32, c) for c in consts])
        return context.get_dummy_value()
    return types.none(), codegen


@jit
def barrier(counter, n_threads, k):
    """The k-th barrier of the stage (k from 1): wait until all n_threads threads have arrived.
    Returns k + 1, the number of the next one."""
    atomic_add(counter, 0, 1)
    target = k * n_threads
    while atomic_load(counter, 0) < target:
        spin_pause()
    return k + 1


@pjit
def _thread_ids(out):
    for c in prange(out.shape[0]):
        out[c] = numba.get_thread_id()


def concurrent_iterations(n_threads: int) -> bool:
    """Whether a `prange(n_threads)` region runs each iteration on a thread of its own."""
    if n_threads == 1:
        return True
    ids = np.full(n_threads, -1, np.int64)
    _thread_ids(ids)
    return numba.threading_layer() in ("omp", "workqueue") and len(set(ids.tolist())) == n_threads
