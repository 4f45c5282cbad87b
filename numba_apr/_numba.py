"""Numba options in one place: every compiled kernel in the package is declared through these.

`jit` is a serial kernel, `pjit` a `parallel=True` one (`prange` splits its outer loop over the
threads that `numba.set_num_threads` allows). Both cache their machine code on disk so a second
start does not compile again. `fastmath` lets LLVM reassociate float sums (needed for it to
vectorise reductions) but keeps inf/nan semantics: attention masks use -inf.
"""
from numba import njit, prange  # noqa: F401  (prange re-exported for kernel modules)

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
