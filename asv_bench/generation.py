"""End to end: llama-bench's pp128 and tg64 in tokens per second (higher is faster).

The models are Qwen2.5-0.5B- and 1.5B-shaped Q4_K_M files (random weights, real vocabulary,
llama.cpp's tensor types) made by `scripts/make_model.py`. The measurement is
`scripts/bench.py`'s own (`ours_once`), so these figures are the ones that

    python scripts/bench.py <cache>/bench/qwen2.5-1.5B-shaped-q4_k_m.gguf -p 128 -n 64

prints: pp128 = a 128-token prompt of random ids evaluated as one batch on an empty context;
tg64 = 64 tokens decoded one at a time after a one-token context. Threads: Numba's default
(every core; NUMBA_NUM_THREADS changes it).
"""
from __future__ import annotations

import statistics

import numpy as np

from ._common import MODELS, bench_script, prepare_models

setup_cache = prepare_models  # asv: run once per `asv run` for every module that names it

N_PROMPT, N_GEN = 128, 64


class Throughput:
    """pp128 and tg64 of numba_apr on the Qwen2.5-shaped files."""

    params = (list(MODELS),)
    param_names = ["model"]
    unit = "tok/s"
    timeout = 300

    def setup(self, paths, model):
        import numba_apr

        self.ours_once = bench_script().ours_once
        self.model = numba_apr.load(paths[model], n_ctx=max(N_PROMPT, N_GEN + 1))
        self.rng = np.random.default_rng(0)
        self.ours_once(self.model, 8, 2, self.rng)  # warm-up, as bench.py does

    def track_pp128(self, paths, model):
        """Prompt tokens per second: median of 3 runs of a 128-token prompt."""
        return statistics.median(self.ours_once(self.model, N_PROMPT, 0, self.rng)["pp"] for _ in range(3))

    def track_tg64(self, paths, model):
        """Generated tokens per second: median of 2 runs of 64 decode steps."""
        return statistics.median(self.ours_once(self.model, 0, N_GEN, self.rng)["tg"] for _ in range(2))
