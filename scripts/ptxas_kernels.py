"""Compile CUDA product kernels for a GPU architecture without a GPU, and report what ptxas gives
each: registers, stack frame, spills, shared memory. A kernel that compiles under the simulator
can still fail on a GPU (numba.cuda takes only plain constants for array shapes; the simulator
takes expressions), and registers and spills say whether a change will hold its occupancy.

Needs numba-cuda with its CUDA bindings and NVRTC (found from site-packages or a folder given
with --site), and ptxas on PATH (a CUDA toolkit); see docs/development.md. Usage:

    python scripts/ptxas_kernels.py [--cc 9.0] [--site DIR] [--sass]

--sass also disassembles each cubin (nvdisasm: a CUDA toolkit's, or the `nvidia-cuda-nvdisasm`
wheel's in --site) and lists its loops: warp instructions between a loop's head and its back
branch, and the mma among them. A loop with a branch inside counts both sides (read the
listing written beside it, `--sass-dir`, for one path's count).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
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
    ap.add_argument("--sass", action="store_true", help="list each kernel's loops from its SASS (nvdisasm)")
    ap.add_argument("--sass-dir", help="write each kernel's SASS listing into this folder")
    a = ap.parse_args()
    try:
        cc = tuple(int(x) for x in a.cc.split("."))
        assert len(cc) == 2
    except (ValueError, AssertionError):
        sys.exit(f"--cc: a compute capability like 9.0, got {a.cc!r}")
    if shutil.which("ptxas") is None:
        sys.exit("ptxas is not on PATH (a CUDA toolkit's bin folder)")
    nvdisasm = None
    if a.sass or a.sass_dir:
        wheel = os.path.join(a.site or "", "nvidia", "cu13", "bin", "nvdisasm")   # (the wheel's place)
        nvdisasm = shutil.which("nvdisasm") or (wheel if os.access(wheel, os.X_OK) else None)
        if nvdisasm is None:
            sys.exit("--sass: no nvdisasm on PATH or in --site (pip install --target DIR nvidia-cuda-nvdisasm)")
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
            if nvdisasm:
                sass = subprocess.run([nvdisasm, "-c", os.path.join(tmp, "k.cubin")], capture_output=True,
                                      text=True, check=True).stdout
                if a.sass_dir:
                    os.makedirs(a.sass_dir, exist_ok=True)
                    with open(os.path.join(a.sass_dir, f"few_{name}_{'_'.join(map(str, plan))}.sass"), "w") as f:
                        f.write(sass)
                for head, n, ops in loops(sass):
                    print(f"    loop {head}: {n} instructions, {ops['IMMA']} mma, {ops['LDS']} LDS, "
                          f"{ops['LDG'] + ops['LD']} global loads")


def loops(sass: str):
    """(label, instructions, opcode counts) of each backward branch's span in an nvdisasm listing."""
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(.*)", line)
        if m:
            ins.append((m.group(1), m.group(2)))
    for i, (op, rest) in enumerate(ins):
        m = re.search(r"`\((\.L_x_\d+)\)", rest)
        if op == "BRA" and m and labels.get(m.group(1), i) < i:    # (not the final branch to itself)
            span = ins[labels[m.group(1)]:i + 1]
            yield m.group(1), len(span), collections.Counter(o for o, _ in span)


if __name__ == "__main__":
    main()
