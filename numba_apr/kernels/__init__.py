"""Compute kernels, one sub-package per backend with matching module names (cpu/, later cuda/).

Each fast kernel has a plain float64 NumPy reference beside it, named `<kernel>_ref`: the
tests' oracle.
"""
