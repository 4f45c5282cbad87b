"""The fused decode step (kernels/cpu/step.py) against `forward`, and the barrier it runs on.

The step must give the logits `forward` gives for one token (the same row kernels in the same
order, so equal to float32 rounding), on every architecture it serves, at every thread count,
and fall back to `forward` where it cannot run."""
import numba
import numpy as np
import pytest

import numba_apr
from numba_apr._numba import pjit, prange
from numba_apr.kernels.cpu.sync import barrier, concurrent_iterations

from conftest import SHARED, model_path

MODELS = [SHARED / "models" / "tiny-qwen2-q4km.gguf", "gemma-3-270m-q4_k_m.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"]


@pjit
def _stages(seen, counter, n, n_stages):
    """Each stage, thread c writes its cell, meets the others, then reads its neighbour's."""
    counter[0] = 0
    for c in prange(n):
        k = 1
        for s in range(n_stages):
            seen[s, c, 0] = s * 1000 + c
            k = barrier(counter, n, k)
            seen[s, c, 1] = seen[s, (c + 1) % n, 0]
            k = barrier(counter, n, k)  # nobody writes stage s+1 before every read of stage s


def test_barrier_orders_the_stages():
    n = numba.get_num_threads()
    assert concurrent_iterations(n)
    seen = np.full((200, n, 2), -1, np.int64)
    counter = np.zeros(1, np.int64)
    _stages(seen, counter, n, 200)
    s, c = np.meshgrid(np.arange(200), np.arange(n), indexing="ij")
    np.testing.assert_array_equal(seen[:, :, 1], s * 1000 + (c + 1) % n)
    assert counter[0] == 2 * 200 * n


def _decode_all(model, ids):
    model.n_past = 0
    return np.stack([model._decode(int(t), pos=i)[0].copy() for i, t in enumerate(ids)])


@pytest.mark.parametrize("name", MODELS, ids=lambda m: str(m).split("/")[-1])
def test_step_matches_forward(name):
    path = name if not isinstance(name, str) else model_path(name)
    model = numba_apr.load(path, n_ctx=64)
    assert model.runner.step is not None, "every matrix of these models is repacked: the step must serve"
    rng = np.random.default_rng()
    ids = rng.integers(0, model.config.n_vocab, 24)
    step = model.runner.step
    fused = _decode_all(model, ids)
    model.runner.step = None
    plain = _decode_all(model, ids)
    model.runner.step = step
    np.testing.assert_allclose(fused, plain, rtol=0, atol=1e-5 * np.abs(plain).max())
    # The prompt path (tiles of tokens) agrees with token-by-token decoding as well.
    batch = model.logits(ids)
    np.testing.assert_allclose(fused, batch, rtol=0, atol=1e-4 * np.abs(batch).max())


def test_step_at_each_thread_count():
    model = numba_apr.load(SHARED / "models" / "tiny-qwen2-q4km.gguf", n_ctx=32)
    ids = np.random.default_rng().integers(0, model.config.n_vocab, 12)
    step = model.runner.step
    model.runner.step = None
    plain = _decode_all(model, ids)
    before = numba.get_num_threads()
    try:
        for n in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(n)
            model.runner.step = step.build(model.config, model.weights, model.runner.state, model.weights.blob, n)
            assert model.runner.step is not None and model.runner.step.n == n
            np.testing.assert_allclose(_decode_all(model, ids), plain, rtol=0, atol=1e-5 * np.abs(plain).max())
        # Built for one count, called under another: it declines and `forward` serves.
        numba.set_num_threads(1)
        model.runner.step = step.build(model.config, model.weights, model.runner.state, model.weights.blob, 2) \
            if numba.config.NUMBA_NUM_THREADS > 1 else None
        if model.runner.step is not None:
            assert model.runner.step(int(ids[0]), 0) is None
            np.testing.assert_allclose(_decode_all(model, ids), plain, rtol=0, atol=1e-5 * np.abs(plain).max())
    finally:
        numba.set_num_threads(before)


def test_no_step_without_repacked_weights(monkeypatch):
    monkeypatch.setenv("NUMBA_APR_NOPACK", "1")
    model = numba_apr.load(SHARED / "models" / "tiny-qwen2-q4km.gguf", n_ctx=32)
    assert model.runner.step is None
    assert np.isfinite(model._decode(1, pos=0)).all()
