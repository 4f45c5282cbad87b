"""numba_apr's performance history, measured by airspeed velocity (asv).

Run from the repository root (`asv.conf.json` is there; docs/development.md "Performance history (asv)").
Each module is one kind of figure:

- `kernels`: the quantized matrix-vector product (decode's inner loop) at Qwen2.5-1.5B's
  shapes, in GB/s of repacked weights streamed (higher is faster).
- `generation`: llama-bench's pp128 and tg64 on the Qwen2.5-0.5B- and 1.5B-shaped files that
  `scripts/make_model.py` writes, in tok/s (higher is faster).
- `startup`: seconds to the first token of `scripts/generate.py` with warm caches, and the
  seconds that Numba spends compiling on a cold start (lower is better).
- `memory`: peak resident memory of a process that loads a model and generates (lower is better).

asv runs every benchmark in a fresh process of an environment where the commit under test is
installed (from a wheel, not this working tree); the benchmark code itself is always this
working tree's. The model files are generated once into `numba_apr.packaged.cache_dir()/bench`
(outside the repository) by `_common.prepare_models`, asv's `setup_cache` for the modules that
need them.
"""
