"""Which instruction-set level the CPU kernels are built for, chosen once per process.

The integer dots of kernels/cpu/simd.py are written once per level:

    avx512vnni  AVX-512 VNNI: 512-bit `vpdpbusd`            (Zen 4/5, Ice Lake and later Xeons)
    avxvnni     AVX-VNNI: 256-bit VEX `vpdpbusd`            (Intel 12th gen and later, Zen 5 client)
    avx2        AVX2 + FMA: `vpmaddubsw` + `vpmaddwd`       (Haswell and later, Zen 1-3)
    neon        ARMv8.2 dot product: `sdot`                 (Apple M, Graviton 2+, Ampere, Cortex-A76+)
    generic     plain LLVM vector IR, for any CPU

The best one the host has is taken, from LLVM's view of its features. `NUMBA_APR_SIMD=LEVEL`
forces any level the host has (anything else is a one-line error naming them). A level below
the host's best also lowers the target of every Numba function of the process (its
`NUMBA_CPU_NAME` / `NUMBA_CPU_FEATURES`), so the whole process runs as it would on a CPU of that
level, never emits an instruction such a CPU lacks, and keeps its own entries in Numba's cache.
That has to happen before Numba compiles its first function, so this module is imported by
_numba.py, ahead of every kernel.
"""
from __future__ import annotations

import os

import llvmlite.binding as llvm

from ...errors import NumbaAprError

#: level -> (the LLVM features it needs, the LLVM target CPU and features a process forced to it runs at)
LEVELS = {
    "avx512vnni": (("avx512f", "avx512bw", "avx512vnni", "fma"), None),
    "avxvnni": (("avxvnni", "avx2", "fma"), ("x86-64-v3", "+avxvnni")),
    "avx2": (("avx2", "fma"), ("x86-64-v3", "")),
    "neon": (("neon", "dotprod"), None),
    "generic": ((), None),
}
_GENERIC_CPU = {"x86_64": ("x86-64", ""), "aarch64": ("generic", "+neon")}


def _features() -> set[str]:
    """The features Numba compiles for: the host's, or those the user gave Numba."""
    from numba.core import config
    if os.environ.get("NUMBA_CPU_NAME") and os.environ.get("NUMBA_APR_SIMD_TARGET") is None:
        given = config.CPU_FEATURES or ""
        return {f[1:] for f in given.split(",") if f.startswith("+")}
    return {k for k, v in llvm.get_host_cpu_features().items() if v}


def _arch() -> str:
    return llvm.get_process_triple().split("-")[0]


def available(features: set[str] | None = None, arch: str | None = None) -> list[str]:
    """The levels a CPU with `features` can run, best first (always ends with generic)."""
    features = _features() if features is None else features
    arch = _arch() if arch is None else arch
    out = []
    for name, (needs, _) in LEVELS.items():
        is_arm = name == "neon"
        if name != "generic" and (arch == "aarch64") != is_arm:
            continue
        if all(f in features for f in needs):
            out.append(name)
    return out


def _choose() -> str:
    levels = available()
    forced = os.environ.get("NUMBA_APR_SIMD", "").strip().lower()
    if not forced:
        return levels[0]
    if forced not in levels:
        known = ", ".join(LEVELS)
        raise NumbaAprError(f"NUMBA_APR_SIMD={forced!r}: this CPU runs {', '.join(levels)} "
                            f"(the levels are {known})")
    if forced != levels[0]:
        _lower_target(forced)
    return forced


def _lower_target(level: str) -> None:
    """Point Numba's code generation at the level's baseline CPU (before its first compile)."""
    from numba.core import config
    from numba.core.registry import cpu_target
    cpu, feats = LEVELS[level][1] or _GENERIC_CPU.get(_arch(), ("generic", ""))
    if os.environ.get("NUMBA_CPU_NAME") == cpu and os.environ.get("NUMBA_CPU_FEATURES") == feats:
        return  # a child process of one forced already
    if "_toplevel_target_context" in vars(cpu_target):
        raise NumbaAprError(f"NUMBA_APR_SIMD={level}: set it before Numba compiles anything "
                            "(in the environment, before the process starts)")
    os.environ.update(NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=feats, NUMBA_APR_SIMD_TARGET=level)
    config.reload_config()
    config.CPU_NAME, config.CPU_FEATURES = cpu, feats


#: The level of this process.
LEVEL = _choose()
