"""Numba options in one place: every compiled kernel in the package is declared through these.

`jit` is a serial kernel, `pjit` a `parallel=True` one (`prange` splits its outer loop over the
threads that `numba.set_num_threads` allows). Both cache their machine code on disk so a second
start does not compile again. `fastmath` lets LLVM reassociate float sums (needed for it to
vectorise reductions) but keeps inf/nan semantics: attention masks use -inf.
"""
import os

# Numba's OpenMP workers spin between parallel regions instead of going to sleep. A decode step
# runs ~100-300 parallel regions back to back; on the 2-core VM we measure on, a worker that had
# gone to sleep took milliseconds to wake (one parallel call: ~12 us when spinning, up to 7 ms
# after sleeping), and SmolLM2's pp128 / tg64 went from 161 / 55 tok/s (libgomp's defaults) to
# 312 / 68 tok/s. llama.cpp's own threads poll too. The spin is bounded (1e8 pause loops, about
# 2.7 s measured here): an idle process gives its cores back soon after. Set before Numba
# starts its thread pool (the first parallel call); the user's own settings win.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "100000000")

# The instruction-set level, chosen before Numba compiles anything: a level forced below the
# host's lowers Numba's target CPU for the whole process (kernels/cpu/isa.py).
from .kernels.cpu import isa  # noqa: E402,F401
from numba import njit, prange  # noqa: E402,F401  (prange re-exported for kernel modules)

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
OPTIONS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False)


def jit(fn=None, **extra):
    """Serial Numba kernel with the package's options."""
    opts = {**OPTIONS, **extra}
    return njit(**opts)(fn) if fn is not None else njit(**opts)


def pjit(fn=None, **extra):
    """Parallel Numba kernel (outer `prange` loops run on all allowed threads)."""
    opts = {**OPTIONS, "parallel": True, **extra}
    return njit(**opts)(fn) if fn is not None else njit(**opts)


# numba.cuda kernels (kernels/cuda/): cached PTX, fast-math (approximate division, rsqrt and exp,
# flush-to-zero: what llama.cpp's CUDA build uses too). Imported lazily so a CPU-only process
# never loads numba.cuda.
CUDA_OPTIONS = dict(cache=True, fastmath=True)


def cuda_jit(fn=None, **extra):
    """numba.cuda kernel (or, with device=True, device function) with the package's options
    (`max_registers` a GPU-only one: the simulator's jit does not take it)."""
    from numba import config, cuda
    opts = {**CUDA_OPTIONS, **extra}
    if config.ENABLE_CUDASIM:
        opts.pop("max_registers", None)
    return cuda.jit(**opts)(fn) if fn is not None else cuda.jit(**opts)
