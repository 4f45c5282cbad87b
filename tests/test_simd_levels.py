"""The CPU kernels at every instruction-set level (kernels/cpu/isa.py, simd.py).

Each level this machine can run is forced with NUMBA_APR_SIMD in a fresh process (the level is
chosen once, at import) with an empty Numba cache, and there: every repacked type's product
against the float64 reference on fresh random data (decode and prompt tiles, partial row
groups), the f16 loads against NumPy on all 65,536 bit patterns, the level's own instructions in
the compiled kernels (and none above it), and the golden models against llama.cpp. Levels this
machine lacks (AVX-VNNI, NEON) are compiled for their targets with llvmlite and their assembly
read; the device's Xeon runs the AVX-512 VNNI and AVX-VNNI levels for real (docs/development.md).
"""
import os
import subprocess
import sys

import llvmlite.binding as llvm
import pytest
from llvmlite import ir

from conftest import ROOT
from test_matmul import SEED
from numba_apr.kernels.cpu import isa, simd

HERE = isa.available()

# The instructions a level's Q4_K and Q8_0 kernels must contain, and those they must not.
EXPECT = {
    "avx512vnni": (["vpdpbusd", "zmm"], ["vpmaddubsw"]),
    "avxvnni": (["{vex}", "vpdpbusd"], ["zmm"]),
    "avx2": (["vpmaddubsw", "vpmaddwd", "vpsignb", "ymm"], ["vpdpbusd", "zmm"]),
    "neon": (["sdot"], []),
    "generic": ([], ["vpdpbusd", "vpmaddubsw", "zmm", "ymm", "sdot"]),
}

LEVEL_SCRIPT = r"""
import re, sys
import numpy as np
sys.path.insert(0, "tests")
from numba_apr.kernels.cpu import isa, simd, qmatmul as qm
from numba_apr._numba import jit
from test_qmatmul import PACKED, packed_case
from test_matmul import assert_matmul_close
from test_simd_levels import EXPECT

level = sys.argv[1]
assert isa.LEVEL == level, (isa.LEVEL, level)
rng = np.random.default_rng(int(sys.argv[2]))
for name in PACKED:
    for T in (1, simd.TILE + 3):
        w, x, p = packed_case(rng, name, 37, T)
        assert_matmul_close(qm.qmatmul(np.zeros((T, 37), np.float32), x, p), x, w, name)

@jit(cache=False)
def f16_all(src, out):
    for i in range(0, src.size, 32):
        simd.store_f32x16(out, i // 2, simd.load_f16x16(src, i), 16)

bits = np.arange(65536, dtype=np.uint16)
got = np.zeros(65536, np.float32)
f16_all(bits.view(np.uint8), got)
want = bits.view(np.float16).astype(np.float32)
assert np.array_equal(got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
assert np.isnan(got[np.isnan(want)]).all()

asm = "\n".join(f.inspect_asm(s) for f in (qm._group_q4k, qm._group_b32) for s in f.signatures)
if isa._arch() == "x86_64":
    need, never = EXPECT[level]
    assert all(i in asm for i in need), [i for i in need if i not in asm]
    assert not any(re.search(r"\b" + re.escape(i), asm) for i in never), [i for i in never if i in asm]
print("ok")
"""


def _run_level(level, args, tmp_path, timeout):
    env = dict(os.environ, NUMBA_APR_SIMD=level, NUMBA_CACHE_DIR=str(tmp_path / "numba"),
               NUMBA_APR_CACHE=str(tmp_path / "cache"))
    for k in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_APR_SIMD_TARGET"):
        env.pop(k, None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_level_choice():
    """The best level a CPU has comes first; generic is always there."""
    assert isa.available({"avx2", "fma", "f16c"}, "x86_64") == ["avx2", "generic"]   # Zen 2
    assert isa.available({"avx2", "fma", "avxvnni"}, "x86_64") == ["avxvnni", "avx2", "generic"]  # Alder Lake
    xeon = {"avx512f", "avx512bw", "avx512vnni", "avxvnni", "avx2", "fma"}   # Sapphire Rapids
    assert isa.available(xeon, "x86_64") == ["avx512vnni", "avxvnni", "avx2", "generic"]
    assert isa.available({"avx", "sse4.2"}, "x86_64") == ["generic"]
    assert isa.available({"neon", "dotprod", "i8mm"}, "aarch64") == ["neon", "generic"]
    assert isa.available({"neon"}, "aarch64") == ["generic"]   # ARMv8.0: no dot product
    assert isa.LEVEL == (os.environ.get("NUMBA_APR_SIMD") or HERE[0])


@pytest.mark.parametrize("level", HERE)
def test_level_kernels(level, tmp_path):
    r = _run_level(level, ["-c", LEVEL_SCRIPT, level, str(SEED % 2**32)], tmp_path, 900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("level", [lv for lv in HERE if lv != HERE[0]])
def test_level_golden(level, tmp_path):
    """The golden models against llama.cpp at each level below this CPU's best (the best one
    is the default run's tests/test_golden.py)."""
    r = _run_level(level, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_golden.py", "-k", "cpu"],
                   tmp_path, 1800)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_unavailable_level_is_one_line(tmp_path):
    """Forcing a level the CPU lacks ends with one line naming the levels it has."""
    missing = next(lv for lv in isa.LEVELS if lv not in HERE)
    r = _run_level(missing, ["scripts/generate.py", "-n", "1"], tmp_path, 300)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"error: NUMBA_APR_SIMD={missing!r}: this CPU runs {', '.join(HERE)} "
                                f"(the levels are {', '.join(isa.LEVELS)})"), r.stderr[-2000:]


TARGETS = {  # level: (triple, cpu, features) of a CPU that has it
    "avx512vnni": ("x86_64-unknown-linux-gnu", "x86-64-v4", "+avx512vnni"),
    "avxvnni": ("x86_64-unknown-linux-gnu", "x86-64-v3", "+avxvnni"),
    "avx2": ("x86_64-unknown-linux-gnu", "x86-64-v3", ""),
    "neon": ("aarch64-unknown-linux-gnu", "generic", "+neon,+dotprod"),
    "generic": ("aarch64-unknown-linux-gnu", "generic", "+neon"),
}


@pytest.mark.parametrize("level", list(TARGETS))
@pytest.mark.parametrize("full_bytes", [False, True])
def test_dot4_assembly(level, full_bytes):
    """Each level's dot compiled by LLVM for a CPU of that level (AArch64 too): the level's
    instruction is there and LLVM selects it (an instruction the target lacks would abort)."""
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    triple, cpu, feats = TARGETS[level]
    mod = ir.Module(name="dot4")
    mod.triple = triple
    v16i32, v64i8 = ir.VectorType(ir.IntType(32), 16), ir.VectorType(ir.IntType(8), 64)
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [v16i32.as_pointer(), v64i8.as_pointer(),
                                                          v64i8.as_pointer()]), name="f")
    b = ir.IRBuilder(fn.append_basic_block())
    acc, w, x = (b.load(a) for a in fn.args)
    b.store(simd.dot4_ir(b, level, acc, w, x, full_bytes), fn.args[0])
    b.ret_void()
    m = llvm.parse_assembly(str(mod))
    m.verify()
    asm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=feats, opt=2).emit_assembly(m)
    want = {"avx512vnni": ["vpdpbusd", "zmm"], "avxvnni": ["{vex}", "vpdpbusd"],
            "avx2": ["vpmaddubsw", "vpmaddwd"] + (["vpsignb"] if full_bytes else []),
            "neon": ["sdot"], "generic": []}[level]
    assert all(i in asm for i in want), asm
    if level == "generic":
        assert "sdot" not in asm
