"""Numba CPU kernels (`njit`, `parallel=True` where it pays)."""
