"""Helpers shared by the benchmark modules: the model files, warm caches, timed subprocesses.

Nothing here is a benchmark (asv only collects names without a leading underscore from the
other modules).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY = SHARED / "models" / "tiny-qwen2-q4km.gguf"  # a real 2-layer Qwen2 (Q4_K_M), beside the clone

#: The Qwen2.5 shapes that the generation, start-up and memory benchmarks run.
MODELS = ("0.5B", "1.5B")
#: A prompt long enough (> 8 tokens) to take the prefill tiles as well as the decode path.
WARM_PROMPT = "Once upon a time, in a land far away, there lived a curious little fox"


def model_file(size: str) -> Path:
    """The Qwen2.5-`size`-shaped Q4_K_M file (random weights, real vocabulary), written by
    `scripts/make_model.py` into `<numba_apr cache>/bench/` the first time it is asked for
    (about a minute for 0.5B, a few for 1.5B on 2 cores) and reused after that.

    The generator runs with this working tree's `numba_apr` (PYTHONPATH), so script and
    package agree whatever commit asv has installed; the file depends only on the seed."""
    from numba_apr.packaged import cache_dir

    path = cache_dir() / "bench" / f"qwen2.5-{size}-shaped-q4_k_m.gguf"
    if not path.exists():
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        r = subprocess.run([sys.executable, str(REPO / "scripts" / "make_model.py"), size,
                            "-o", str(path), "-q"], env=env, capture_output=True, text=True)
        if r.returncode or not path.exists():
            raise RuntimeError(f"make_model.py {size} failed: {r.stderr.strip()[-2000:]}")
    return path


def run_generate(model: str | os.PathLike, prompt: str = "hi", n_predict: int = 1,
                 env: dict | None = None) -> float:
    """Wall-clock seconds of `python scripts/generate.py -m MODEL -n N -p PROMPT --temp 0`,
    from process start to exit (interpreter start, imports, load, prompt, N tokens)."""
    cmd = [sys.executable, str(REPO / "scripts" / "generate.py"), "-m", str(model),
           "-n", str(n_predict), "-p", prompt, "--temp", "0"]
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env=dict(os.environ, **(env or {})))
    seconds = time.perf_counter() - t
    if r.returncode:
        raise RuntimeError(f"generate.py failed on {model}: {r.stderr.strip()[-2000:]}")
    return seconds


def prepare_models() -> dict[str, str]:
    """asv `setup_cache` of the modules that run models (one run per `asv run`, shared: they all
    import this same function). Makes the model files if missing and runs each once, so that
    the commit's Numba cache and the repacked-weights cache are warm before anything is timed.
    Returns {name: path} for "0.5B", "1.5B" and "tiny" (the 0.5B file where ../shared is absent)."""
    paths = {size: str(model_file(size)) for size in MODELS}
    paths["tiny"] = str(TINY) if TINY.exists() else paths["0.5B"]
    for path in dict.fromkeys(paths.values()):
        run_generate(path, WARM_PROMPT, 2)
    return paths


# The first `asv run` on a machine writes both files and compiles every kernel in here.
prepare_models.timeout = 1800


def bench_script():
    """scripts/bench.py as a module (scripts/ is not a package): its `ours_once` is the
    measurement that docs/performance.md's pp/tg figures come from."""
    spec = importlib.util.spec_from_file_location("numba_apr_bench_script", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
