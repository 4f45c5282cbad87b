"""Kernel launches with less Python in the way: `launch(kernel, grid, block, stream, *args)` does
what `kernel[grid, block, stream](*args)` does.

Why: numba.cuda's launch path types every argument, picks the overload and marshals each array
through several layers, ~100 us of host time a launch (measured on an H100 host: 267 launches of
a 512-token prompt of the 0.5B model took 27 ms of Python, against ~25 ms of GPU work). Decode
steps replay a CUDA graph and do not care; prompts do.

How: the arguments a forward passes are long-lived device buffers (and views made once) plus a
few scalars. So per call site, keyed by the identity of the arrays and the types of the scalars,
the first launch goes through numba (compiling if needed) and records the overload it used and
numba's own marshalling of each array; later launches convert only the scalars and call
cuda.core's `launch` with that list. A site holds its arrays, so their identities stay unique
while cached. This leans on numba-cuda internals (`overloads`, `_prepare_args`, the cufunc's
cuda.core kernel; checked with numba-cuda 0.30): where any of that is missing, a site falls back
to numba's path for good. Under the simulator it is numba's path.

Kernels marked `overlapped` are launched with programmatic dependent launch (PDL, compute
capability 9.0 and up): such a kernel may be started while the one before it still runs, and
waits at its top (`ptx.grid_dep`) until that one has finished. A decode step is ~150 dependent
kernels of a few microseconds each, so the gap between one kernel's end and the next one's
start is a large share of it (see model_cuda.py); with PDL the next kernel's blocks are already
resident when the wait ends. Before its wait a kernel may still read what kernels two or more
launches back wrote (the decode products' epilogue loads do): the kernel ahead of it lets it
launch only after that one's own wait, when everything before it has finished.
NUMBA_APR_PDL=0 turns it off (to measure it).

`SKIP`, when set, is asked about every launch, `SKIP(kernel, args)`, and a launch it answers True
for is left out: scripts/profile_decode.py knocks parts of a decode step out to time them (the
results are then wrong). Launches made without `launch` (the sampler's) are not asked.
"""
from __future__ import annotations

import ctypes
import os

from . import ptx

_SITES: dict = {}
_CONFIGS: dict = {}
_STREAMS: dict = {}
_VIEWS: dict = {}
MAX_SITES = 4096      # a bound for test runs that make arrays by the thousand
_ARRAYS: tuple = ()   # numba's device array types (set at the first launch)
_core_launch = None
PDL = os.environ.get("NUMBA_APR_PDL", "1") != "0"
SKIP = None           # profiling only: a predicate (kernel, args) -> leave this launch out


def overlapped(kernel):
    """Mark a kernel that calls ptx.grid_dep() before it reads anything the kernel ahead of it
    writes: it may be launched before that kernel has finished (see the module docstring)."""
    kernel.numba_apr_overlapped = True
    return kernel


def launch(kernel, grid, block, stream, *args):
    """kernel[grid, block, stream](*args)."""
    if SKIP is not None and SKIP(kernel, args):
        return
    if ptx.SIM or not stream:
        kernel[grid, block, stream](*args)
        return
    if not _ARRAYS:
        _init()
    key = (kernel,) + tuple(id(a) if isinstance(a, _ARRAYS) else type(a) for a in args)
    site = _SITES.get(key)
    if site is None:
        kernel[grid, block, stream](*args)
        if len(_SITES) >= MAX_SITES:
            _SITES.clear()
        _SITES[key] = _make_site(kernel, args)
        return
    if site is False:
        kernel[grid, block, stream](*args)
        return
    fn, template, scalars, _ = site
    params = list(template)
    for i, j, conv in scalars:
        params[i] = conv(args[j])
    _core_launch(_core_stream(stream), _config(grid, block, getattr(kernel, "numba_apr_overlapped", False)),
                 fn, *params)


def _init():
    global _ARRAYS, _core_launch
    from cuda.core import launch as core_launch
    from numba.cuda.cudadrv.devicearray import DeviceNDArrayBase
    _ARRAYS, _core_launch = (DeviceNDArrayBase,), core_launch


def _make_site(kernel, args):
    """(cuda.core kernel, parameter list, [(slot, argument, converter)], arrays held) or False."""
    try:
        argtypes = tuple(kernel.typeof_pyval(a) for a in args)
        ov = kernel.overloads[argtypes]
        fn = ov._codelibrary.get_cufunc().kernel
        template, scalars = [], []
        for j, (ty, a) in enumerate(zip(argtypes, args)):
            if isinstance(a, _ARRAYS):
                ov._prepare_args(ty, a, 0, [], template)
            else:
                conv = _converter(ty)
                if conv is None:
                    return False
                scalars.append((len(template), j, conv))
                template.append(None)
        return fn, template, scalars, [a for a in args if isinstance(a, _ARRAYS)]
    except Exception:   # numba-cuda internals moved: numba's own path from now on
        return False


def view_once(arr, key, make):
    """A view of arr made by make(), once per (arr, key): a new view object per launch would be
    a new call site every time (and numba.cuda's strided views are slow to make)."""
    v = _VIEWS.get((id(arr), key))
    if v is None or v[0] is not arr:
        if len(_VIEWS) >= MAX_SITES:
            _VIEWS.clear()
        v = _VIEWS[(id(arr), key)] = (arr, make())
    return v[1]


def _converter(ty):
    name = str(ty)
    if name == "bool":
        return bool
    if name == "float32":
        return ctypes.c_float
    if name == "float64":
        return ctypes.c_double
    return getattr(ctypes, f"c_{name}", None) if name[:3] in ("int", "uin") else None


def _config(grid, block, overlap):
    key = (grid, block, overlap and PDL)
    c = _CONFIGS.get(key)
    if c is None:
        from cuda.core import LaunchConfig
        try:
            c = LaunchConfig(grid=grid, block=block, programmatic_stream_serialization=key[2])
        except TypeError:   # a cuda.core without PDL: plain launches (grid_dep's wait returns at once)
            c = LaunchConfig(grid=grid, block=block)
        _CONFIGS[key] = c
    return c


def _core_stream(stream):
    s = _STREAMS.get(id(stream))
    if s is None or s[0] is not stream:
        from numba.cuda.cudadrv.driver import _to_core_stream
        if len(_STREAMS) > 64:
            _STREAMS.clear()
        s = _STREAMS[id(stream)] = (stream, _to_core_stream(stream))
    return s[1]
