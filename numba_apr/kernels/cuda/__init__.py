"""numba.cuda kernels: the GPU twins of kernels/cpu/ (same module names), plus ptx.py, the inline
PTX intrinsics they need (dp4a, 16-byte loads, warp shuffles) with simulator twins for CI."""
