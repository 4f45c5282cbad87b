"""The GGUF fuzzer (scripts/fuzz_gguf.py): its writer reproduces the base file, every mutation
family makes mutants, its runner tells every outcome apart (on a stand-in engine), and short
fuzzing runs find no defect: every malformed file ends in one clear NumbaAprError, never a
traceback, a signal, a hang, a MemoryError or an acceptance."""
import importlib.util
import random
import sys

import pytest

from conftest import ROOT, SHARED

_spec = importlib.util.spec_from_file_location("fuzz_gguf", ROOT / "scripts" / "fuzz_gguf.py")
fz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_gguf"] = fz  # dataclasses look their module up while it is being executed
_spec.loader.exec_module(fz)

TINY = SHARED / "models" / "tiny-qwen2-q4km.gguf"


@pytest.fixture(scope="module")
def base_bytes():
    if not TINY.exists():
        pytest.fail(f"{TINY} is missing: tests need ../shared beside the clone")
    return TINY.read_bytes()


@pytest.fixture(scope="module")
def base(base_bytes):
    return fz.parse(base_bytes)


@pytest.mark.parametrize("reuse", [True, False])
def test_writer_reproduces_the_base_file(base_bytes, base, reuse):
    head, _ = fz.write(base, reuse=reuse)  # reuse=False: every value re-encoded
    assert len(head) == base.data_offset
    assert head + base_bytes[base.data_offset:] == base_bytes


@pytest.mark.parametrize("family", sorted(fz.FAMILIES))
def test_each_family_makes_mutants(base_bytes, base, family):
    untouched = (base_bytes[:base.data_offset], len(base_bytes))
    for index in range(8):
        case = fz.make_case(base, 7, index, families=[family])
        assert case.family == family and case.description
        assert case.must_refuse in (True, False, None)
        assert (case.head, case.length) != untouched, case.description
        again = fz.make_case(base, 7, index, families=[family])
        assert (again.head, again.length, again.description) == (case.head, case.length, case.description)


def test_cases_are_deterministic_and_varied(base):
    a = [fz.make_case(base, 3, i) for i in range(40)]
    b = [fz.make_case(base, 3, i) for i in range(40)]
    assert [(c.description, c.head, c.length) for c in a] == [(c.description, c.head, c.length) for c in b]
    assert len({c.family.split("+")[0] for c in a}) >= 6
    assert any("+" in c.family for c in a)  # some cases combine two families


@pytest.mark.parametrize("seed", [1, None])
def test_short_fuzzing_run_finds_no_defect(seed):
    # Seed 1 is a fixed baseline; a fresh seed each run widens the coverage over time. To
    # reproduce a failure: python scripts/fuzz_gguf.py --seed S --cases 100
    seed = random.randrange(1 << 31) if seed is None else seed
    results = fz.fuzz(TINY, cases=100, seed=seed, workers=2, timeout=60)
    assert len(results) == 100
    if any(map(fz.is_defect, results)):
        pytest.fail(f"seed {seed}:\n{fz.report(results, seed)}", pytrace=False)


FAKE_ENGINE = '''
import os, signal, time
import numpy as np
from .errors import NumbaAprError

class _Model:
    def tokenize(self, text):
        return [1]

    def generate(self, prompt, **kw):
        return iter(["a"])

def load(path, **kw):  # case k misbehaves the k-th way; the unmodified model loads
    name = os.path.basename(path)
    k = int(name[4:-5]) if name.startswith("case") else 5
    if k == 0: raise ValueError("not a NumbaAprError")
    if k == 1: os.kill(os.getpid(), signal.SIGSEGV)
    if k == 2: time.sleep(1000)
    if k == 3: np.ones(1 << 40)
    if k == 4: raise NumbaAprError("two\\nlines")
    if k == 5: return _Model()
    raise NumbaAprError("one clear line")
'''


def test_runner_tells_every_outcome_apart(tmp_path, monkeypatch):
    # A stand-in numba_apr (first on the workers' path) that misbehaves in every way measured.
    pkg = tmp_path / "numba_apr"
    pkg.mkdir()
    (pkg / "errors.py").write_text("class NumbaAprError(Exception):\n    pass\n")
    (pkg / "__init__.py").write_text(FAKE_ENGINE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    results = fz.fuzz(TINY, seed=1, workers=2, timeout=3, cli_fraction=0, only=range(7))
    got = {r["case"]: r["outcome"] for r in results}
    assert got == {0: "traceback", 1: "crash", 2: "hang", 3: "memory", 4: "multiline", 5: "accepted", 6: "error"}
    by_case = {r["case"]: r for r in results}
    assert by_case[0]["kind"].startswith("ValueError at") and "SIGSEGV" in by_case[1]["kind"]
    assert "in load" in by_case[2]["kind"]  # the faulthandler dump taken before the kill
    assert sum(map(fz.is_defect, results)) == 5 + (by_case[5]["must_refuse"] is True)
