"""The integer products over repacked weights (kernels/cpu/qmatmul.py) against the float64
reference (gguf-py decode + NumPy, activations quantized as llama.cpp does), on fresh random
data every run; the repacked-weights cache (packing.py). tests/test_simd_levels.py runs them
at every other instruction-set level."""
import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from test_matmul import assert_matmul_close, n_blocks_for, rng  # noqa: F401  (fixture)
from test_quants import random_rows

from numba_apr.kernels.cpu import matmul as mm
from numba_apr.kernels.cpu import ops
from numba_apr.kernels.cpu import qmatmul as qm

PACKED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"]


def packed_case(rng, name, N, T, blocks=None):
    w = random_rows(rng, name, N, blocks or n_blocks_for(name), scale=0.1)
    K = mm.quant_type(Q[name]).row_elements(w.shape[1])
    x = rng.standard_normal((T, K)).astype(np.float32)
    return w, x, qm.repack("w", w, Q[name], K)


@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("T", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("N", [1, 13, 40])
def test_qmatmul_every_type(rng, name, T, N):
    """Every token count path (8-token tiles, single tokens, both) and partial row groups."""
    w, x, p = packed_case(rng, name, N, T)
    out = np.full((T, N), np.nan, np.float32)
    assert qm.qmatmul(out, x, p) is out
    assert_matmul_close(out, x, w, name)


@pytest.mark.parametrize("name", PACKED)
def test_decode_equals_batch(rng, name):
    """A token's result does not depend on the batch it came in (tile of 8 or alone), bit for
    bit: decoding then reproduces the prompt pass exactly, as in llama.cpp."""
    w, x, p = packed_case(rng, name, 37, 19)
    batch = qm.qmatmul(np.zeros((19, 37), np.float32), x, p)
    for t in (0, 7, 8, 18):
        one = qm.qmatmul(np.zeros((1, 37), np.float32), x[t:t + 1], p)
        assert np.array_equal(one[0], batch[t])


def test_many_groups_and_threads(rng):
    """More row groups than threads, with uneven splits."""
    w, x, p = packed_case(rng, "Q4_K", 16 * 23 + 5, 11, blocks=4)
    assert_matmul_close(qm.qmatmul(np.zeros((11, w.shape[0]), np.float32), x, p), x, w, "Q4_K")


def test_zero_activations_and_extremes(rng):
    """All-zero token rows (scale 0) and a row at the int8 extremes."""
    w, x, p = packed_case(rng, "Q6_K", 16, 3)
    x[0] = 0
    x[1] = np.where(np.arange(x.shape[1]) % 2, 1e3, -1e3)
    out = qm.qmatmul(np.zeros((3, 16), np.float32), x, p)
    assert np.all(out[0] == 0)
    assert_matmul_close(out, x, w, "Q6_K")


def test_qmatmul_rejects_bad_shapes(rng):
    w, x, p = packed_case(rng, "Q8_0", 16, 2)
    with pytest.raises(ValueError, match="rows of"):
        qm.qmatmul(np.zeros((2, 16), np.float32), np.ascontiguousarray(x[:, :-32]), p)
    with pytest.raises(ValueError, match="out must be"):
        qm.qmatmul(np.zeros((2, 15), np.float32), x, p)
    with pytest.raises(ValueError, match="too small"):
        qm.qmatmul(np.zeros((2, 16), np.float32), x, p, qm.QScratch(1, x.shape[1]))


def test_round_f16(rng):
    x = (rng.standard_normal((5, 300)) * np.exp(rng.uniform(-20, 12, (5, 300)))).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 65519.0, 1e-8]
    want = ops.round_f16_ref(x)
    ops.round_f16(x)
    assert np.array_equal(x.astype(np.float64), want)


def test_pack_weights_cache(tmp_path, monkeypatch):
    """The first load writes the repacked file, the second maps it read-only; both give the
    same logits, and a cache whose manifest does not match is rebuilt."""
    import numba_apr
    from conftest import SHARED

    monkeypatch.setenv("NUMBA_APR_CACHE", str(tmp_path))
    path = SHARED / "models" / "tiny-qwen2-q4km.gguf"
    ids = [1, 2, 3, 4]
    a = numba_apr.load(path, n_ctx=64)
    first = a.logits(ids).copy()
    files = sorted((tmp_path / "repacked").glob("*.bin"))
    assert len(files) == 1
    written = files[0].stat().st_mtime_ns
    b = numba_apr.load(path, n_ctx=64)
    w = b.weights.layers[0].wq
    assert isinstance(w, qm.PackedMatrix) and not w.data.flags.writeable  # a read-only map
    assert files[0].stat().st_mtime_ns == written  # of the file as it was: not rebuilt
    assert np.array_equal(b.logits(ids), first)
    files[0].with_suffix(".json").write_text("[]")
    c = numba_apr.load(path, n_ctx=64)
    assert files[0].stat().st_mtime_ns != written
    assert np.array_equal(c.logits(ids), first)


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch, capfd):
    """A cache file changed after it was written (same size and manifest, one byte other
    anywhere) is found by its checksums, never used, and written again."""
    import numba_apr
    from conftest import SHARED

    monkeypatch.setenv("NUMBA_APR_CACHE", str(tmp_path))
    path = SHARED / "models" / "tiny-qwen2-q4km.gguf"
    ids = [1, 2, 3, 4]
    first = numba_apr.load(path, n_ctx=64).logits(ids).copy()
    (cache,) = (tmp_path / "repacked").glob("*.bin")
    manifest = json.loads(cache.with_suffix(".json").read_text())
    rng = np.random.default_rng()
    for _ in range(3):
        name, qtype, rows, k, off = manifest["matrices"][rng.integers(len(manifest["matrices"]))]
        at = off + int(rng.integers(qm.PackedMatrix.nbytes_for(qtype, rows, k)))
        data = bytearray(cache.read_bytes())
        data[at] ^= 1 << int(rng.integers(8))
        cache.write_bytes(bytes(data))
        model = numba_apr.load(path, n_ctx=64)
        assert "was damaged" in capfd.readouterr().err
        assert cache.read_bytes() != bytes(data)  # written again
        assert np.array_equal(model.logits(ids), first)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 4096, 100003])
def test_checksum_against_reference(n):
    from numba_apr.kernels.cpu.checksum import checksum, checksum_ref
    data = np.random.default_rng().integers(0, 256, n, dtype=np.uint8)
    assert checksum(data) == checksum_ref(data)
    assert checksum(data, chunks=1) == checksum(data, chunks=7)  # whatever the split
    if n:
        other = data.copy()
        other[np.random.default_rng().integers(n)] ^= 0x10
        assert checksum(other) != checksum(data)
