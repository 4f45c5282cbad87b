"""CPU kernels of the transformer (norms, RoPE, activations, attention) against their float64
NumPy references, on fresh random inputs every run (the seed is printed on failure)."""
import numpy as np
import pytest

from numba_apr.kernels.cpu import ops
from numba_apr.kernels.cpu.attention import attention, attention_ref

SEED = np.random.SeedSequence().entropy


@pytest.fixture
def rng():
    print("seed", SEED)
    return np.random.default_rng(SEED)


def close(got, want, rtol=2e-5):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale * 10)


@pytest.mark.parametrize("rows,n", [(1, 7), (5, 896), (3, 640)])
def test_rmsnorm(rng, rows, n):
    x = rng.standard_normal((rows, n)).astype(np.float32) * 3
    w = rng.standard_normal(n).astype(np.float32)
    out = np.empty_like(x)
    ops.rmsnorm(out, x, w, 1e-6)
    close(out, ops.rmsnorm_ref(x, w, 1e-6))
    ops.rmsnorm(x, x, w, 1e-6)  # in place gives the same
    close(x, out, 1e-7)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("n_heads,head_dim,rope_dim", [(4, 64, 64), (2, 256, 256), (3, 32, 16)])
def test_rope(rng, neox, n_heads, head_dim, rope_dim):
    T = 6
    x = rng.standard_normal((T, n_heads * head_dim)).astype(np.float32)
    pos = rng.integers(0, 5000, T).astype(np.int64)
    base = float(rng.choice([10000.0, 1e6]))
    want = ops.rope_ref(x, pos, n_heads, head_dim, rope_dim, base, neox)
    ops.rope(x, pos, n_heads, head_dim, rope_dim, base, neox)
    close(x, want, 1e-5)


@pytest.mark.parametrize("gelu", [True, False])
def test_gated_act(rng, gelu):
    g = rng.standard_normal((4, 300)).astype(np.float32) * 4
    u = rng.standard_normal((4, 300)).astype(np.float32)
    want = ops.gated_act_ref(g, u, gelu)
    ops.gated_act(g, u, gelu)
    close(g, want)


def test_add_bias_scale_add(rng):
    x = rng.standard_normal((3, 50)).astype(np.float32)
    b = rng.standard_normal(50).astype(np.float32)
    y = rng.standard_normal((3, 50)).astype(np.float32)
    want = (x.astype(np.float64) + b) * 2.5 + y
    ops.add_bias(x, b)
    ops.scale(x, 2.5)
    ops.add(x, y)
    close(x, want)


@pytest.mark.parametrize("n_head,n_head_kv,head_dim,window", [
    (4, 2, 64, 0), (4, 1, 256, 0), (9, 3, 64, 0), (4, 1, 32, 5), (2, 2, 16, 1)])
@pytest.mark.parametrize("T,pos0", [(1, 0), (1, 17), (7, 0), (5, 9)])
def test_attention(rng, n_head, n_head_kv, head_dim, window, T, pos0):
    n_ctx = 32
    q = rng.standard_normal((T, n_head * head_dim)).astype(np.float32)
    k = rng.standard_normal((n_ctx, n_head_kv * head_dim)).astype(np.float32)
    v = rng.standard_normal((n_ctx, n_head_kv * head_dim)).astype(np.float32)
    out = np.full((T, n_head * head_dim), np.nan, np.float32)
    scale = 1.0 / np.sqrt(head_dim)
    attention(out, q, k, v, pos0, n_head, n_head_kv, head_dim, head_dim, scale, window)
    close(out, attention_ref(q, k, v, pos0, n_head, n_head_kv, head_dim, head_dim, scale, window))


def test_attention_ignores_future_and_out_of_window(rng):
    """Garbage past the query position, or before the window, must not leak in."""
    T, pos0, H, D, W = 3, 10, 2, 16, 4
    q = rng.standard_normal((T, H * D)).astype(np.float32)
    k = rng.standard_normal((40, H * D)).astype(np.float32)
    v = rng.standard_normal((40, H * D)).astype(np.float32)
    a, b = np.empty((T, H * D), np.float32), np.empty((T, H * D), np.float32)
    attention(a, q, k, v, pos0, H, H, D, D, 0.25, W)
    k2, v2 = k.copy(), v.copy()
    k2[pos0 + T:] = 1e4
    v2[pos0 + T:] = np.nan
    k2[:pos0 - W + 1] = 1e4
    v2[:pos0 - W + 1] = np.nan
    attention(b, q, k2, v2, pos0, H, H, D, D, 0.25, W)
    np.testing.assert_array_equal(a, b)
