"""Start-up: how long a user waits before the first token (lower is better).

Both run the command line in a fresh process, as a user does:

    python scripts/generate.py -m MODEL -n 1 -p hi --temp 0

timed from process start to exit (interpreter start, imports, GGUF parse, weights mapped,
kernels loaded from Numba's cache or compiled, one prompt token, one generated token).
"""
from __future__ import annotations

import tempfile

from ._common import MODELS, run_generate, prepare_models

setup_cache = prepare_models  # asv: run once per `asv run` for every module that names it


class FirstToken:
    """Warm start: Numba's cache and the repacked-weights cache are both present (the state
    of every start after the first)."""

    params = (list(MODELS),)
    param_names = ["model"]
    number = 1  # one start per sample
    repeat = 3
    rounds = 1
    warmup_time = 0
    timeout = 180

    def time_first_token_warm(self, paths, model):
        """Seconds for `generate.py -m MODEL -n 1 -p hi` with warm caches."""
        run_generate(paths[model])


class ColdStart:
    """Cold start: the seconds that Numba spends compiling every kernel, on the tiny 2-layer
    Qwen2 model (../shared/models/tiny-qwen2-q4km.gguf; the model's size hardly matters,
    compilation does). The same command runs once with NUMBA_CACHE_DIR pointing to an empty
    folder (every kernel compiled) and once warm; the figure is the difference."""

    unit = "s"
    rounds = 1
    timeout = 600

    def track_numba_compile_seconds(self, paths):
        """Seconds of (cold start - warm start) of `generate.py -m tiny -n 1 -p hi`."""
        warm = run_generate(paths["tiny"])
        with tempfile.TemporaryDirectory(prefix="numba-cold-") as empty:
            cold = run_generate(paths["tiny"], env={"NUMBA_CACHE_DIR": empty})
        return cold - warm
