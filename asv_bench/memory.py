"""Peak memory: the most resident memory of a process that loads a model and generates
(lower is better). asv reports the process's peak RSS (ru_maxrss): the Python interpreter,
NumPy and Numba, the kernels' machine code, the memory-mapped GGUF and repacked weights that
were touched, and the run state (KV cache, buffers). The caches are warm, so no compilation
or repacking runs in the measured process.
"""
from __future__ import annotations

from ._common import MODELS, prepare_models

setup_cache = prepare_models  # asv: run once per `asv run` for every module that names it

N_CTX = 4096  # the command line's default context
N_TOKENS = 16


class Generate:
    """numba_apr.load(MODEL) with the command line's default context, then 16 greedy tokens."""

    params = (list(MODELS),)
    param_names = ["model"]
    timeout = 180

    def peakmem_load_and_generate(self, paths, model):
        """Peak RSS of `load(MODEL, n_ctx=4096)` + `generate("Once upon a time", 16 tokens)`."""
        import numba_apr

        m = numba_apr.load(paths[model], n_ctx=N_CTX)
        for _ in m.generate("Once upon a time", max_tokens=N_TOKENS, temperature=0.0):
            pass
