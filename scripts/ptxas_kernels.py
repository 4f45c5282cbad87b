"""Compile CUDA product kernels for a GPU architecture without a GPU, and report what ptxas gives
each: registers, stack frame, spills, shared memory. A kernel that compiles under the simulator
can still fail on a GPU (numba.cuda takes only plain constants for array shapes; the simulator
takes expressions), and registers and spills say whether a change will hold its occupancy.

Needs numba-cuda with its CUDA bindings and NVRTC (found from site-packages or a folder given
with --site), and ptxas on PATH (a CUDA toolkit); see docs/development.md. Usage:

    python scripts/ptxas_kernels.py [--cc 9.0] [--site DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import site
import subprocess
import sys
import tempfile
from types import SimpleNamespace

# (type, kernel, plan): the few-token tensor-core products (qmatmul_mma._make_few_kernel) with
# the plans _few_plan gives a 1.5B / 7B step, and their gated variant.
FEW = [("Q4_K", (1, 4, False)), ("Q6_K", (1, 4, False)), ("Q4_K", (4, 1, False)), ("Q6_K", (8, 1, False)),
       ("Q4_K", (1, 2, True)), ("Q6_K", (1, 2, True)), ("Q8_0", (1, 4, False)), ("Q5_K", (1, 4, False)),
       ("Q4_0", (2, 2, False))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", default="9.0", help="compute capability to compile for")
    ap.add_argument("--site", help="a folder numba-cuda and its bindings were installed into (pip --target)")
    a = ap.parse_args()
    try:
        cc = tuple(int(x) for x in a.cc.split("."))
        assert len(cc) == 2
    except (ValueError, AssertionError):
        sys.exit(f"--cc: a compute capability like 9.0, got {a.cc!r}")
    if shutil.which("ptxas") is None:
        sys.exit("ptxas is not on PATH (a CUDA toolkit's bin folder)")
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    if a.site:
        site.addsitedir(a.site)
    from gguf import GGMLQuantizationType as Q
    try:
        from numba import cuda, types
        import numba.cuda.dispatcher as dispatcher
    except ImportError as e:
        sys.exit(f"numba-cuda with its CUDA bindings is needed (see docs/development.md): {e}")
    # device functions ask the current device for its capability: there is none
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    from numba_apr._numba import CUDA_OPTIONS
    from numba_apr.kernels.cuda import qmatmul as qm

    def arr(dt, nd, layout="A"):
        return types.Array(dt, nd, layout)
    i64 = types.int64
    sig = (arr(types.float32, 2), i64, arr(types.uint32, 1, "C"), i64, i64, i64, i64, i64, i64, i64,
           arr(types.int32, 2), arr(types.float32, 2), arr(types.int32, 2), i64, arr(types.float32, 1, "C"),
           types.boolean, i64, i64, arr(types.int8, 2), arr(types.float32, 2), arr(types.int32, 2))
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        for name, plan in FEW:
            k = qm._make_few_kernel(qm.UNITS[Q[name]], Q[name] != Q.Q6_K, *plan)
            ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=cc, fastmath=CUDA_OPTIONS.get("fastmath", False))
            open(ptx_path, "w").write(ptx)
            r = subprocess.run(["ptxas", "-v", f"-arch=sm_{cc[0]}{cc[1]}", ptx_path, "-o", os.path.join(tmp, "k.cubin")],
                               capture_output=True, text=True)
            info = [line.split("info    : ")[-1] for line in r.stderr.splitlines()
                    if "registers" in line or "spill" in line or "error" in line.lower()]
            print(f"few {name:5s} (KS, TR, gated) = {plan}: " + " | ".join(info), flush=True)
            if r.returncode:
                sys.exit(f"ptxas failed on few {name} {plan}")


if __name__ == "__main__":
    main()
