"""The quantizers (numba_apr.model.quantize), llama.cpp's Q4_K_M recipe, and scripts/make_model.py.

Quantizers run on fresh random inputs every run (the seed is printed on failure); each output
must decode the same through our decoder and gguf-py's, lie within the format's error of the
input, and, for the types gguf-py can quantize itself (Q8_0, Q5_0), equal its bytes exactly.
The recipe is checked against tables taken from `llama-quantize ... Q4_K_M` run on F16 files of
the 0.5B and 1.5B shapes. A tiny model written by make_model must load and generate.
"""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from conftest import ROOT, SHARED
from numba_apr.model import quantize as qz
from numba_apr.model import quants

SEED = np.random.SeedSequence().entropy
VOCAB = SHARED / "vocab" / "ggml-vocab-qwen2.gguf"

# Relative RMS error of each type on N(0, 1) data, as measured for llama-quantize's own output
# on the 0.5B-shaped model (F16 source): Q8_0 0.00535, Q5_0 0.0427, Q4_K 0.0713, Q6_K 0.01775.
# Ours must be within a few percent of those.
MAX_REL_RMS = {"Q8_0": 0.0056, "Q5_0": 0.0445, "Q4_K": 0.0740, "Q6_K": 0.0185, "F16": 3e-4}
QUANT_NAMES = ["F16", "Q8_0", "Q5_0", "Q4_K", "Q6_K"]


@pytest.fixture
def rng():
    print("seed", SEED)
    return np.random.default_rng(SEED)


@pytest.fixture(scope="module")
def make_model():
    spec = importlib.util.spec_from_file_location("make_model", ROOT / "scripts" / "make_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_model"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def decode_both(raw, name):
    """Our decoder's and gguf-py's output, checked equal to float32 rounding (our decoder may
    fuse a multiply-add that gguf-py rounds twice)."""
    ours = quants.dequantize(raw, Q[name])
    ref = gguf_quants.dequantize(raw, Q[name]).astype(np.float32)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    np.testing.assert_allclose(ours, ref, rtol=2e-7, atol=2e-7 * scale)
    return ours


def rel_rms(a, x):
    return float(np.sqrt(np.mean((a.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))


# ---------------------------------------------------------------------------------------------
# Quantizers


@pytest.mark.parametrize("name", QUANT_NAMES)
def test_round_trip_gaussian(rng, name):
    x = (rng.standard_normal((96, 1024)) * rng.uniform(0.001, 10)).astype(np.float32)
    raw = qz.quantize(x, Q[name])
    assert raw.dtype == np.uint8 and raw.shape == (96, qz.row_bytes(Q[name], 1024))
    got = decode_both(raw, name)
    assert rel_rms(got, x) < MAX_REL_RMS[name]


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0"])
def test_bytes_equal_gguf_py(rng, name):
    """Same reference algorithm as ggml (and gguf-py): the bytes must match exactly."""
    x = (rng.standard_normal((64, 512)) * rng.uniform(0.001, 10)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (d = 0)
    x[1, :32] = np.linspace(-1, 1, 32)  # the extremes tie in magnitude
    np.testing.assert_array_equal(qz.quantize(x, Q[name]), gguf_quants.quantize(x, Q[name]))


def test_block_error_bounds(rng):
    """Per value: Q8_0 within half a step (plus the f16 rounding of d), Q5_0 within one step
    (the value opposite the largest one may clip at q = 31)."""
    x = (rng.standard_normal((32, 256)) * np.exp(rng.uniform(-5, 2, (32, 1)))).astype(np.float32)
    blocks = np.abs(x).reshape(-1, 32).max(axis=1).repeat(32).reshape(x.shape)
    err8 = np.abs(decode_both(qz.quantize(x, Q.Q8_0), "Q8_0") - x)
    assert (err8 <= blocks / 127 * 0.57 + 1e-30).all()
    err5 = np.abs(decode_both(qz.quantize(x, Q.Q5_0), "Q5_0") - x)
    assert (err5 <= blocks / 16 * 1.01 + 1e-30).all()


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_k_quants_awkward_rows(rng, name):
    """Zeros stay exact; constant, one-signed and outlier rows decode close to the input."""
    n = 512
    rows = [np.zeros(n), np.full(n, 0.37), np.full(n, -2.5), np.abs(rng.standard_normal(n)),
            -np.abs(rng.standard_normal(n)) - 3.0, rng.standard_normal(n) * 0.02]
    spike = rng.standard_normal(n) * 0.01
    spike[100] = 50.0
    rows.append(spike)
    x = np.array(rows, np.float32)
    got = decode_both(qz.quantize(x, Q[name]), name)
    assert np.isfinite(got).all()
    assert (got[0] == 0).all()
    for r in range(1, len(rows)):
        scale = np.abs(x[r]).max()
        tol = 0.11 if name == "Q4_K" else 0.04  # of the row's largest magnitude
        assert np.abs(got[r] - x[r]).max() <= tol * scale, r
    # the spike's own super-block is coarse, but the rest of the row keeps its precision: within
    # each 32-value sub-block, under one 4-bit step of that sub-block's own range (a spike-sized
    # step would be ~50/15)
    rest, back = x[-1, 256:].reshape(-1, 32), got[-1, 256:].reshape(-1, 32)
    step = (rest.max(1) - rest.min(1)) / 15
    assert (np.abs(back - rest).max(1) <= step).all()


def test_k_quant_search_length(rng):
    """A longer scale search (llama.cpp's nstep) never does worse on average than the default."""
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    for name, full in (("Q4_K", 20), ("Q6_K", 18)):
        e_default = rel_rms(decode_both(qz.quantize(x, Q[name]), name), x)
        e_full = rel_rms(decode_both(qz.quantize(x, Q[name], nstep=full), name), x)
        e_none = rel_rms(decode_both(qz.quantize(x, Q[name], nstep=0), name), x)
        assert e_full <= e_default * 1.001 and e_default <= e_none


def test_f16_matches_numpy(rng):
    """F16 is round-to-nearest-even like numpy's cast, across the whole range: subnormals,
    halfway cases, overflow to inf, signed zeros, inf and nan (nan payloads are not kept: any
    nan becomes the quiet nan 0x7E00, with its sign)."""
    halves = np.arange(1 << 16, dtype=np.uint16)
    halves = halves[(halves & 0x7FFF) <= 0x7C00]  # every half but the nans
    em = np.arange(0x7C00, dtype=np.uint32) << 13  # a half's bits, placed as in float32 / 2**112
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.concatenate([
            rng.standard_normal(4000) * np.exp(rng.uniform(-25, 12, 4000)),
            halves.view(np.float16).astype(np.float32),
            # exactly halfway between neighbouring halves, and just either side of halfway
            (em | 0x1000).view(np.float32) * np.float32(2.0**112),
            (em | 0x0FFF).view(np.float32) * np.float32(2.0**112),
            (em | 0x1001).view(np.float32) * np.float32(2.0**112),
            [65504.0, 65519.99, 65520.0, 1e9, -1e9, np.inf, -np.inf, np.nan, -np.nan, -0.0, 0.0, 1e-45, 2.0**-25],
        ]).astype(np.float32)
    x = x[: len(x) // 2 * 2].reshape(2, -1)
    got = qz.quantize(x, Q.F16).view(np.uint16)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(got, want)


def test_f32_passthrough_and_api(rng):
    x = rng.standard_normal(100).astype(np.float32)
    raw = qz.quantize(x, Q.F32)
    assert raw.shape == (400,) and np.array_equal(raw.view(np.float32), x)
    assert qz.quantize(x[:64], Q.Q8_0).shape == (68,)  # 1D in, 1D out
    with pytest.raises(ValueError):
        qz.quantize(np.zeros((2, 100), np.float32), Q.Q4_K)  # not whole blocks
    with pytest.raises(ValueError):
        qz.quantize(np.zeros((2, 256), np.float32), Q.Q2_K)
    with pytest.raises(ValueError):
        qz.quantize_into(np.zeros((2, 256), np.float32), Q.Q4_K, np.zeros((2, 100), np.uint8))


# ---------------------------------------------------------------------------------------------
# The Q4_K_M recipe, against llama-quantize's choices (llama.cpp 0.25.3, `llama-quantize
# F16.gguf OUT.gguf Q4_K_M` on make_model's --type f16 files of these shapes).

def llama_table(n_layer, hidden, more_bits_layers, tied=True):
    """{name: type} as llama-quantize wrote it: the layers where attn_v / ffn_down got more bits
    are given literally (read off its output), not computed."""
    wide = hidden % 256 == 0
    t = {"output_norm.weight": "F32", "token_embd.weight": ("Q6_K" if wide else "Q8_0") if tied else "Q4_K"}
    if not tied:
        t["output.weight"] = "Q6_K" if wide else "Q8_0"
    base = "Q4_K" if wide else "Q5_0"
    for i in range(n_layer):
        p = f"blk.{i}."
        for n in ("attn_norm.weight", "ffn_norm.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias"):
            t[p + n] = "F32"
        for n in ("attn_q.weight", "attn_k.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight"):
            t[p + n] = base
        more = i in more_bits_layers
        t[p + "attn_v.weight"] = ("Q6_K" if wide else "Q8_0") if more else base
        t[p + "ffn_down.weight"] = "Q6_K" if more else "Q4_K"  # ffn rows (4864, 8960) are whole 256s
    return t


LLAMA_QUANTIZE = {
    "0.5B": llama_table(24, 896, {0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23}),
    "1.5B": llama_table(28, 1536, {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27}),
}


@pytest.mark.parametrize("size", ["0.5B", "1.5B"])
def test_recipe_matches_llama_quantize(make_model, size):
    shape = make_model.SHAPES[size]
    specs = make_model.model_tensors(shape, shape.vocab)
    got = {s.name: Q(make_model.tensor_types(shape, specs, "q4_k_m")[s.name]).name for s in specs}
    assert got == LLAMA_QUANTIZE[size]
    # and in llama.cpp's order: non-block tensors, then block by block (names sorted within)
    names = [s.name for s in specs]
    assert names[:2] == ["output_norm.weight", "token_embd.weight"] and names[2] == "blk.0.attn_k.bias"
    assert names[-1] == f"blk.{shape.layers - 1}.ffn_up.weight"


def test_recipe_rules():
    t = qz.q4_k_m_type
    assert t("output.weight", (3584, 152064), 28, False) == Q.Q6_K
    assert t("token_embd.weight", (3584, 152064), 28, False) == Q.Q4_K  # untied: an ordinary matrix
    assert t("token_embd.weight", (896, 151936), 24, True) == Q.Q8_0  # tied, 896 % 256 != 0
    assert t("blk.27.ffn_down.weight", (18944, 3584), 28, False) == Q.Q6_K
    assert t("blk.3.ffn_down.weight", (18944, 3584), 28, False) == Q.Q4_K
    assert t("blk.0.attn_q.bias", (3584,), 28, False) == Q.F32
    assert t("blk.0.attn_norm.weight", (3584,), 28, False) == Q.F32
    assert t("blk.0.attn_q.weight", (80, 64), 4, True) == Q.F16  # not even whole 32s
    assert [qz.use_more_bits(i, 8) for i in range(8)] == [True, False, False, True, False, False, True, True]


# ---------------------------------------------------------------------------------------------
# make_model


def test_fill_normal_is_chunking_independent(make_model):
    table = make_model.normal_table()
    whole = np.empty((6, 1000), np.float32)
    make_model.fill_normal(whole, np.uint64(12345), 0, np.float32(0), np.float32(1), table)
    parts = np.empty((6, 1000), np.float32)
    make_model.fill_normal(parts[:2], np.uint64(12345), 0, np.float32(0), np.float32(1), table)
    make_model.fill_normal(parts[2:], np.uint64(12345), 2000, np.float32(0), np.float32(1), table)
    np.testing.assert_array_equal(whole, parts)
    assert abs(whole.mean()) < 0.03 and abs(whole.std() - 1) < 0.03
    assert make_model.tensor_key(0, "a") != make_model.tensor_key(1, "a") != make_model.tensor_key(0, "b")


@pytest.fixture(scope="module")
def tiny_model(make_model, tmp_path_factory):
    if not VOCAB.exists():
        pytest.fail(f"{VOCAB} is missing: tests need ../shared beside the clone")
    path = tmp_path_factory.mktemp("make_model") / "tiny.gguf"
    make_model.write_model("tiny", path, seed=3, vocab=VOCAB)
    return path


def test_tiny_model_file(make_model, tiny_model):
    from numba_apr.model.gguf_file import GGUFFile
    g = GGUFFile(tiny_model)
    md = g.metadata
    assert md["general.architecture"] == "qwen2" and md["general.file_type"] == 15
    assert md["general.quantization_version"] == 2 and md["general.alignment"] == 32
    assert (md["qwen2.embedding_length"], md["qwen2.block_count"], md["qwen2.attention.head_count"]) == (256, 2, 4)
    assert md["qwen2.rope.freq_base"] == 1e6 and abs(md["qwen2.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12
    vocab = GGUFFile(VOCAB).metadata
    for k, v in vocab.items():
        if k.startswith("tokenizer."):
            assert np.array_equal(md[k], v) if isinstance(v, np.ndarray) else md[k] == v, k
    shape = make_model.HIDDEN_SHAPES["tiny"]
    types = make_model.tensor_types(shape, make_model.model_tensors(shape, 151936), "q4_k_m")
    assert {n: t.qtype for n, t in g.tensors.items()} == types
    norm = quants.dequantize(g.tensors["blk.0.attn_norm.weight"].raw, Q.F32)
    assert abs(norm.mean() - 1) < 0.01 and 0.01 < norm.std() < 0.03
    w = quants.dequantize(g.tensors["blk.1.ffn_up.weight"].raw, Q.Q4_K)
    assert abs(w.std() - 0.02) < 0.001


def test_tiny_model_loads_and_generates(tiny_model):
    import numba_apr
    model = numba_apr.load(tiny_model, n_ctx=64)
    assert model.config.n_vocab == 151936
    text = "".join(model.generate("Hello", max_tokens=4, temperature=0))
    assert len(model.tokenize(text, add_bos=False, special=False)) >= 1


def test_pads_vocab_like_the_big_models(make_model):
    tok = make_model.read_vocab(VOCAB, 152064)
    tokens, types = tok["tokenizer.ggml.tokens"], tok["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 152064
    assert tokens[151936] == "[PAD151936]" and tokens[-1] == "[PAD152063]"
    assert types[-1] == types[151935]  # the file's own padding type


def test_cli_errors(tmp_path):
    def run(*args):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_model.py"), *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        return lines[0]

    assert "unknown size" in run("2B", "-o", str(tmp_path / "x.gguf"))
    assert "the following arguments are required: size" in run()
    assert "invalid choice" in run("0.5B", "--type", "q4_0", "-o", str(tmp_path / "x.gguf"))
    (tmp_path / "file").write_text("")
    assert "cannot write" in run("0.5B", "-o", str(tmp_path / "file" / "x.gguf"))
    assert "directory" in run("0.5B", "-o", str(tmp_path))
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


def test_failed_write_leaves_nothing(make_model, monkeypatch, tmp_path):
    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(make_model, "quantize_into", boom)
    with pytest.raises(RuntimeError):
        make_model.write_model("tiny", tmp_path / "x.gguf", vocab=VOCAB)
    assert list(tmp_path.iterdir()) == []
