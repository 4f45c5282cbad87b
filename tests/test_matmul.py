"""CPU matmul and row lookup over raw GGUF weights, every type, against the float64 references
(gguf-py decode + NumPy), on fresh random data every run (the seed is printed on failure)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from test_quants import SUPPORTED, random_rows

from numba_apr.errors import UnsupportedError
from numba_apr.kernels.cpu import matmul as mm

SEED = np.random.SeedSequence().entropy
U = 2.0**-24  # float32 unit roundoff


@pytest.fixture
def rng():
    print("seed", SEED)
    return np.random.default_rng(SEED)


def n_blocks_for(name: str) -> int:
    """Row lengths of several blocks, not a multiple of the vector width for plain floats."""
    block = GGML_QUANT_SIZES[Q[name]][0]
    return {1: 203, 32: 9, 256: 3}[block]


def assert_matmul_close(out, x, w, name):
    """Within the float32 error bound of a K-term dot: decoding rounds each weight once, and the
    kernel sums K products in (at most 8-lane) vector partial sums, so the error is at most
    about (K/8 + a few) roundings of sum |x||w|. Relative to that scale, and tight."""
    ref = mm.matmul_ref(x, w, Q[name])
    absdot = np.abs(x.astype(np.float64)) @ np.abs(mm._ref_weights(w, Q[name])).T
    K = x.shape[1]
    bound = (K / 8 + 16) * U * absdot + 1e-30
    err = np.abs(out - ref)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert (err <= bound).all(), f"worst error {(err / bound).max():.2f} x the bound"


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("N", [1, 6, 13])
def test_matmul_every_type(rng, name, T, N):
    w = random_rows(rng, name, N, n_blocks_for(name), scale=0.1)
    K = mm.quant_type(Q[name]).row_elements(w.shape[1])
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = np.full((T, N), np.nan, np.float32)
    assert mm.matmul(out, x, w, Q[name]) is out
    assert_matmul_close(out, x, w, name)


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "F16"])
@pytest.mark.parametrize("T", [1, 2, 4, 9, 33])
def test_matmul_tiles_and_threads(rng, name, T):
    """Enough rows for several tiles per thread, with a partial last tile, at every token-count
    path (T = 1, 2 use small tiles; more tokens use big ones with 4-token micro-kernels)."""
    N = 203
    w = random_rows(rng, name, N, 2 * n_blocks_for(name) if name != "F16" else 300)
    K = mm.quant_type(Q[name]).row_elements(w.shape[1])
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = np.full((T, N), np.nan, np.float32)
    mm.matmul(out, x, w, int(Q[name]))
    assert_matmul_close(out, x, w, name)


def test_matmul_tile_rows():
    assert mm.tile_rows(1, 1536) == mm.TILE
    for T in (3, 64, 512):
        for K in (64, 1536, 8960, 100000):
            rows = mm.tile_rows(T, K)
            assert rows % mm.TILE == 0 and mm.TILE <= rows <= 64


def test_matmul_readonly_weights(rng):
    w = random_rows(rng, "Q6_K", 9, 2)
    w.flags.writeable = False  # GGUF tensors are read-only memory maps
    x = rng.standard_normal((3, 512)).astype(np.float32)
    out = np.empty((3, 9), np.float32)
    mm.matmul(out, x, w, Q.Q6_K)
    assert_matmul_close(out, x, w, "Q6_K")


def test_matmul_rejects_bad_arguments(rng):
    w = random_rows(rng, "Q8_0", 5, 2)  # K = 64
    x = np.zeros((2, 64), np.float32)
    out = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError):
        mm.matmul(out, np.zeros((2, 96), np.float32), w, Q.Q8_0)  # K does not match the rows
    with pytest.raises(ValueError):
        mm.matmul(out, x.astype(np.float64), w, Q.Q8_0)
    with pytest.raises(ValueError):
        mm.matmul(out, np.zeros((64, 2), np.float32).T, w, Q.Q8_0)  # not C-contiguous
    with pytest.raises(ValueError):
        mm.matmul(np.zeros((2, 4), np.float32), x, w, Q.Q8_0)
    with pytest.raises(ValueError):
        mm.matmul(out, x, w.view(np.int8), Q.Q8_0)
    with pytest.raises(ValueError):
        mm.matmul(out, x, np.ascontiguousarray(w[:, :60]), Q.Q8_0)
    with pytest.raises(ValueError):
        mm.matmul(out, x[0], w, Q.Q8_0)
    with pytest.raises(UnsupportedError):
        mm.matmul(out, x, w, Q.Q2_K)


@pytest.mark.parametrize("name", SUPPORTED)
def test_get_rows_every_type(rng, name):
    N = 11
    w = random_rows(rng, name, N, n_blocks_for(name))
    ids = rng.integers(0, N, 9)
    ids[:3] = [N - 1, 0, N - 1]  # both ends, and a repeat
    K = mm.quant_type(Q[name]).row_elements(w.shape[1])
    out = np.full((ids.size, K), np.nan, np.float32)
    assert mm.get_rows(out, w, Q[name], ids) is out
    want = mm.get_rows_ref(w, Q[name], ids)
    np.testing.assert_allclose(out, want, rtol=2e-7, atol=2e-7 * np.abs(want).max())


def test_get_rows_rejects_bad_arguments(rng):
    w = random_rows(rng, "Q4_0", 4, 1)  # K = 32
    out = np.zeros((2, 32), np.float32)
    with pytest.raises(ValueError):
        mm.get_rows(out, w, Q.Q4_0, [0, 4])  # row 4 does not exist
    with pytest.raises(ValueError):
        mm.get_rows(out, w, Q.Q4_0, [-1, 0])
    with pytest.raises(ValueError):
        mm.get_rows(np.zeros((2, 16), np.float32), w, Q.Q4_0, [0, 1])
    with pytest.raises(ValueError):
        mm.get_rows(np.zeros((3, 32), np.float32), w, Q.Q4_0, [0, 1])


@pytest.mark.parametrize("scheme", [mm.ACT_Q8_0, mm.ACT_Q8_1, mm.ACT_Q8_K])
def test_quantize_act_matches_llama_cpp_rule(scheme):
    """Activation quantization (llama.cpp's Q8_0 / Q8_1 / Q8_K) against its plain reference,
    including all-zero blocks and values that sit exactly on a rounding tie."""
    rng = np.random.default_rng()
    T, K = 5, 512
    x = (rng.standard_normal((T, K)) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32)
    x[1, :256] = 0.0
    x[2, :32] = np.float32(127.0) * np.arange(32) / 2  # amax 1968.5: ties at x*127/amax
    xq = np.empty_like(x)
    corr = np.empty((T, K // 32), np.float32)
    mm.quantize_act(xq, corr, x, scheme)
    want, want_corr = mm.quantize_act_ref(x, scheme)
    np.testing.assert_allclose(xq, want, rtol=1e-6, atol=0)
    if scheme == mm.ACT_Q8_1:
        np.testing.assert_allclose(corr, want_corr, rtol=1e-5, atol=1e-6 * np.abs(want_corr).max())
