"""The GGML type table and the Numba decoder, against gguf-py's `dequantize` on fresh random
blocks every run (the seed is printed on failure).

Random blocks are random bytes with their f16 scale fields overwritten by finite values (random
bytes there would give inf/nan scales); where gguf-py can quantize a type, quantized random data
is checked too. Plain float types are checked on every one of their 65536 bit patterns.
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

from numba_apr.model import quants
from numba_apr.errors import NumbaAprError, UnsupportedError

SEED = np.random.SeedSequence().entropy

SUPPORTED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
QUANTIZABLE = ["BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf-py has quantize_blocks
# Byte offsets of the f16 scale fields (d, and m/dmin where there is one) within a block.
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
              "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.fixture
def rng():
    print("seed", SEED)
    return np.random.default_rng(SEED)


def random_rows(rng, name: str, rows: int, n_blocks: int, scale: float = 1.0) -> np.ndarray:
    """Raw uint8 rows [rows, n_blocks * type_size] of type `name`, every value finite."""
    block, size = GGML_QUANT_SIZES[Q[name]]
    if name in ("F32", "F16", "BF16"):
        x = (rng.standard_normal((rows, n_blocks)) * scale).astype(np.float32)
        if name == "F16":
            return x.astype(np.float16).view(np.uint8)
        if name == "BF16":
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return x.view(np.uint8)
    raw = rng.integers(0, 256, (rows, n_blocks * size), dtype=np.uint8)
    blocks = raw.reshape(rows * n_blocks, size)
    for off in F16_FIELDS[name]:
        # magnitudes over several binades, both signs, so scales of every size are exercised
        d = rng.uniform(0.5, 1.0, rows * n_blocks) * 2.0 ** rng.integers(-12, 1, rows * n_blocks)
        d *= rng.choice([-1.0, 1.0], rows * n_blocks) * scale
        blocks[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def assert_decoded(got, want):
    """Same values to float32 rounding (the decoder may fuse a multiply-add that gguf-py rounds twice)."""
    want = np.asarray(want, np.float32)
    assert got.dtype == np.float32 and got.shape == want.shape
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=2e-7 * scale)


def test_table_matches_gguf():
    assert sorted(t.name for t in quants.QUANT_TYPES.values()) == sorted(SUPPORTED)
    for name in SUPPORTED:
        t = quants.QUANT_TYPES[int(Q[name])]
        assert (t.id, t.name) == (int(Q[name]), name)
        assert (t.block_size, t.type_size) == GGML_QUANT_SIZES[Q[name]]
        assert t.row_bytes(t.block_size * 3) == 3 * t.type_size
        assert t.row_elements(3 * t.type_size) == t.block_size * 3
        assert quants.BLOCK_SIZE[t.id] == t.block_size and quants.TYPE_SIZE[t.id] == t.type_size
    with pytest.raises(ValueError):
        quants.QUANT_TYPES[int(Q.Q4_K)].row_bytes(100)


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("rows,n_blocks", [(1, 1), (3, 2), (5, 7)])
def test_dequantize_random_blocks(rng, name, rows, n_blocks):
    raw = random_rows(rng, name, rows, n_blocks)
    assert_decoded(quants.dequantize(raw, Q[name]), gguf_quants.dequantize(raw, Q[name]))


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_dequantize_quantized_data(rng, name):
    x = rng.standard_normal((4, 256)).astype(np.float32) * rng.uniform(0.01, 10)
    raw = gguf_quants.quantize(x, Q[name])
    got = quants.dequantize(raw, int(Q[name]))  # the type may be a plain int too
    assert_decoded(got, gguf_quants.dequantize(raw, Q[name]))


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_every_16_bit_pattern(name):
    """Exact, including subnormals, signed zeros, inf and nan (f16 is rebuilt from its bits)."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    got = quants.dequantize(bits.view(np.uint8).reshape(1, -1), Q[name])[0]
    if name == "F16":
        want = bits.view(np.float16).astype(np.float32)
    else:
        want = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got, want)  # nan == nan here
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_f32_bit_exact(rng):
    x = rng.standard_normal((3, 33)).astype(np.float32) * 1e30
    x[0, :4] = [np.inf, -np.inf, -0.0, 1e-45]
    np.testing.assert_array_equal(quants.dequantize(x.view(np.uint8), Q.F32), x)


@pytest.mark.parametrize("name", SUPPORTED)
def test_decode_block_range(rng, name):
    """decode_blocks on blocks b0 .. b0+nb-1 of a row equals that slice of the whole row."""
    n_blocks = 6
    block = GGML_QUANT_SIZES[Q[name]][0]
    raw = random_rows(rng, name, 1, n_blocks)[0]
    full = gguf_quants.dequantize(raw.reshape(1, -1), Q[name])[0]
    for b0, nb in [(0, 6), (2, 3), (5, 1)]:
        dst = np.full(nb * block + 5, 7.0, np.float32)
        assert quants.decode_blocks(raw, int(Q[name]), b0, nb, dst)
        assert_decoded(dst[:nb * block], full[b0 * block:(b0 + nb) * block])
        assert (dst[nb * block:] == 7.0).all()  # nothing written past the blocks asked for


def test_dequantize_one_row_and_views(rng):
    raw = random_rows(rng, "Q4_K", 4, 2)
    want = gguf_quants.dequantize(raw, Q.Q4_K)
    assert_decoded(quants.dequantize(raw[2], Q.Q4_K), want[2])
    assert_decoded(quants.dequantize(raw[::2], Q.Q4_K), want[::2])  # non-contiguous rows
    ro = raw.copy()
    ro.flags.writeable = False  # GGUF tensors are read-only memory maps
    assert_decoded(quants.dequantize(ro, Q.Q4_K), want)


def test_dequantize_rejects_bad_input():
    with pytest.raises(ValueError):
        quants.dequantize(np.zeros((2, 100), np.uint8), Q.Q4_K)  # not whole blocks
    with pytest.raises(ValueError):
        quants.dequantize(np.zeros((2, 144), np.int8), Q.Q4_K)
    with pytest.raises(UnsupportedError):
        quants.dequantize(np.zeros((2, 84), np.uint8), Q.Q2_K)


@pytest.mark.parametrize("name", SUPPORTED)
def test_check_supported_accepts(name):
    t = quants.check_supported(Q[name], "blk.0.attn_q.weight")
    assert t is quants.QUANT_TYPES[int(Q[name])]
    assert quants.check_supported(int(Q[name]), "x") is t


@pytest.mark.parametrize("qtype,shown", [(Q.Q2_K, "Q2_K"), (Q.IQ2_XXS, "IQ2_XXS"), (Q.Q8_K, "Q8_K"),
                                         (Q.I32, "I32"), (Q.MXFP4, "MXFP4"), (999, "999")])
def test_check_supported_rejects(qtype, shown):
    with pytest.raises(UnsupportedError) as e:
        quants.check_supported(qtype, "blk.3.ffn_down.weight")
    msg = str(e.value)
    assert msg == f"tensor blk.3.ffn_down.weight has type {shown}, which numba_apr does not support"
    assert "\n" not in msg and isinstance(e.value, NumbaAprError)
