"""End to end: llama-bench's pp128 and tg64 in tokens per second (higher is faster), and on a GPU
pp512 and tg128 (`CudaThroughput`).

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


class CudaThroughput:
    """pp512 and tg128 of numba_apr on the GPU (device="cuda"), measured as

        python scripts/bench.py <model file> --device cuda -p 512 -n 128

    measures them (`ours_once_cuda`: the prompt timed to the device's completion, tg as greedy
    steps replaying the decode graph). Skipped where numba.cuda finds no GPU."""

    params = (list(MODELS),)
    param_names = ["model"]
    unit = "tok/s"
    timeout = 600

    def setup(self, paths, model):
        from numba import config, cuda

        if config.ENABLE_CUDASIM or not cuda.is_available():
            raise NotImplementedError("no CUDA GPU")  # asv: skipped
        import numba_apr

        self.ours_once = bench_script().ours_once_cuda
        self.model = numba_apr.load(paths[model], n_ctx=512, device="cuda")
        self.rng = np.random.default_rng(0)
        self.ours_once(self.model, 512, 2, self.rng)  # warm-up, as bench.py does

    def track_pp512(self, paths, model):
        """Prompt tokens per second: median of 3 runs of a 512-token prompt."""
        return statistics.median(self.ours_once(self.model, 512, 0, self.rng)["pp"] for _ in range(3))

    def track_tg128(self, paths, model):
        """Generated tokens per second: median of 2 runs of 128 decode steps."""
        return statistics.median(self.ours_once(self.model, 0, 128, self.rng)["tg"] for _ in range(2))
