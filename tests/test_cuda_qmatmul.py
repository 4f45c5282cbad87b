"""The CUDA quantized products (kernels/cuda/qmatmul.py) and activation kernels (ops.py) against
their float64 references, on fresh random data every run. In CI they run under numba's CUDA
simulator (tiny shapes); with NUMBA_ENABLE_CUDASIM=0 on a GPU machine, on the GPU."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from numba import cuda
from test_matmul import SEED, rng  # noqa: F401  (fixture)
from test_quants import random_rows

from numba_apr.kernels.cuda import ops
from numba_apr.kernels.cuda import qmatmul as qm

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F32", "F16", "BF16"]


def case(rng, name, N, K):
    bs = 256 if name.endswith("_K") else 32
    raw = random_rows(rng, name, N, K // bs if bs > 1 and name[0] == "Q" else K, scale=0.05)
    return raw


def run_product(raw, name, K, x, accumulate_into=None, bias=None):
    T = x.shape[0]
    m = qm.upload(raw, Q[name], K)
    act = ops.ActBuffers.allocate(T, K)
    src = cuda.to_device(x)
    ops.quantize_act(act, src, T, 0)
    init = np.zeros((T, raw.shape[0]), np.float32) if accumulate_into is None else accumulate_into
    out = cuda.to_device(init)
    qm.qmatmul(out, m, act, T, 0, bias=None if bias is None else cuda.to_device(bias),
               accumulate=accumulate_into is not None)
    return out.copy_to_host()


def check(got, want, K):
    # float32 sums of exact integer dots: error ~ sqrt(K) ulps of the terms
    scale = np.abs(want).max() + 1e-30
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale * np.sqrt(K / 32),
                               err_msg=f"seed {SEED}")


@pytest.mark.parametrize("name", TYPES)
def test_decode_product_every_type(rng, name):
    K = 512 if name.endswith("_K") else 96
    raw = case(rng, name, 6, K)
    x = rng.standard_normal((1, K)).astype(np.float32)
    check(run_product(raw, name, K, x), qm.qmatmul_ref(raw, Q[name], K, x), K)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q5_0"])
def test_prompt_tile_bias_and_accumulate(rng, name):
    """T > 1 goes through the NT-token tiles (a partial one too); bias and residual add."""
    K = 256 if name.endswith("_K") else 64
    raw = case(rng, name, 5, K)
    T = qm.PREFILL_NT + 2
    x = rng.standard_normal((T, K)).astype(np.float32)
    res = rng.standard_normal((T, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    want = qm.qmatmul_ref(raw, Q[name], K, x) + bias + res
    check(run_product(raw, name, K, x, accumulate_into=res.copy(), bias=bias), want, K)


def test_quantize_act_matches_reference(rng):
    T, K = 2, 64
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[1, :32] = 0.0  # an all-zero block: scale 0, quants 0
    act = ops.ActBuffers.allocate(T, K)
    ops.quantize_act(act, cuda.to_device(x), T, 0)
    q, d = qm.quantize_act_ref(x)
    assert np.array_equal(act.xq.copy_to_host().view(np.int8).reshape(T, K), q)
    np.testing.assert_allclose(act.xd.copy_to_host(), d, rtol=1e-6)
    assert np.array_equal(act.xs.copy_to_host(), q.reshape(T, K // 16, 16).astype(np.int32).sum(2))
    np.testing.assert_array_equal(act.xf.copy_to_host(), x)


@pytest.mark.parametrize("mode", [ops.MODE_NORM, ops.MODE_SILU, ops.MODE_GELU])
def test_fused_norm_and_gated_activation(rng, mode):
    from numba_apr.kernels.cpu.ops import gated_act_ref
    T, K = 2, 64
    x = rng.standard_normal((T, K)).astype(np.float32)
    y = rng.standard_normal((T, K)).astype(np.float32)
    w = rng.standard_normal(K).astype(np.float32)
    act = ops.ActBuffers.allocate(T, K)
    ops.quantize_act(act, cuda.to_device(x), T, 0, mode, w=cuda.to_device(w), eps=1e-6,
                     src2=cuda.to_device(y))
    if mode == ops.MODE_NORM:
        x64 = x.astype(np.float64)
        want = x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-6) * w
    else:
        want = gated_act_ref(x, y, mode == ops.MODE_GELU)
    np.testing.assert_allclose(act.xf.copy_to_host(), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0", "Q5_1", "F16"])
def test_embedding_rows(rng, name):
    from gguf.quants import dequantize
    K = 256 if name.endswith("_K") else 64
    raw = case(rng, name, 7, K)
    m = qm.upload(raw, Q[name], K)
    ids = np.array([3, 0, 6], np.int32)
    x = cuda.to_device(np.zeros((3, K), np.float32))
    ops.embed(x, cuda.to_device(ids), m, 3, 2.0, 0)
    want = dequantize(raw, Q[name]).reshape(7, K)[ids] * 2.0
    np.testing.assert_allclose(x.copy_to_host(), want, rtol=1e-6, atol=1e-7 * np.abs(want).max())
