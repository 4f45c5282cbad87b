"""Hand-made bad GGUF files, one per check (as llama.cpp's tests/test-gguf.cpp makes them): each
must be refused with one line naming the file and the problem, and a valid file must still load.

Files are written by gguf_writer.py, either from scratch (container defects) or from the tiny
Qwen2 model with one thing changed (model-level defects)."""
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

import numba_apr
from numba_apr.errors import NumbaAprError
from numba_apr.model.gguf_file import GGUFFile

from conftest import ROOT
from gguf_writer import TINY, set_key, tiny_structure, write_gguf
@pytest.fixture(scope="module")
def tiny():
    return tiny_structure()


def _refused(path, *needles):
    with pytest.raises(NumbaAprError) as e:
        m = numba_apr.load(path, n_ctx=32)
        list(m.generate("Hi", max_tokens=2, temperature=0))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


F32_ROW = np.ones(32, np.float32).tobytes()


# -- the container --------------------------------------------------------------------------
@pytest.mark.parametrize("case, needle", [
    (dict(version=1), "version 1"),
    (dict(n_kv=1 << 62), "impossible counts"),
    (dict(n_tensors=(1 << 64) - 1), "impossible counts"),
    (dict(kvs=[["a", V.UINT32, 1, None], ["a", V.UINT32, 2, None]]), "duplicate metadata key a"),
    (dict(kvs=[["", V.UINT32, 1, None]]), "empty metadata key"),
    (dict(kvs=[[b"\xff\xfe", V.UINT32, 1, None]]), "not UTF-8"),
    (dict(kvs=[["a", 13, 1, None]]), "unknown value type 13"),
    (dict(kvs=[["a", V.ARRAY, [[1]], V.ARRAY]]), "nested arrays"),
    (dict(kvs=[["general.alignment", V.UINT32, 3, None]]), "general.alignment 3"),
    (dict(kvs=[["general.alignment", V.UINT32, 0, None]]), "general.alignment 0"),
    (dict(kvs=[["general.alignment", V.STRING, "32", None]]), "general.alignment"),
    (dict(tensors=[["t", [32], Q.F32, None, F32_ROW], ["t", [32], Q.F32, None, F32_ROW]]), "duplicate tensor t"),
    (dict(tensors=[["x" * 64, [32], Q.F32, None, F32_ROW]]), "longer than 63 bytes"),
    (dict(tensors=[["t", [], Q.F32, None, b""]]), "0 dimensions"),
    (dict(tensors=[["t", [32, 1, 1, 1, 1], Q.F32, None, F32_ROW]]), "5 dimensions"),
    (dict(tensors=[["t", [1 << 62, 1 << 62], Q.F32, None, F32_ROW]]), "impossible dimensions"),
    (dict(tensors=[["t", [32], 99, None, F32_ROW]]), "unknown type id 99"),
    (dict(tensors=[["t", [33], Q.Q8_0, None, F32_ROW]]), "not a multiple of 32"),
    (dict(tensors=[["t", [32], Q.F32, 16, F32_ROW]]), "offset 16, expected 0"),
    (dict(tensors=[["a", [32], Q.F32, None, F32_ROW], ["b", [32], Q.F32, 0, F32_ROW]]), "offset 0, expected 128"),
    (dict(tensors=[["t", [1 << 20], Q.F32, None, F32_ROW]]), "ends at byte"),
])
def test_container_defects(tmp_path, case, needle):
    case = dict(case)
    kvs = case.pop("kvs", [["general.architecture", V.STRING, "qwen2", None]])
    tensors = case.pop("tensors", [])
    path = write_gguf(tmp_path / "bad.gguf", kvs, tensors, **case)
    with pytest.raises(NumbaAprError) as e:
        GGUFFile(path)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value), str(e.value)


def test_truncated_anywhere(tmp_path, tiny):
    """A prefix of a valid file is refused at every cut in the header, and in the data."""
    data = TINY.read_bytes()
    header_end = 24 + 8 * 1024  # well into the metadata
    rng = np.random.default_rng()
    for cut in list(rng.integers(4, header_end, 20)) + [len(data) - 1, len(data) // 2]:
        p = tmp_path / "cut.gguf"
        p.write_bytes(data[:cut])
        _refused(p)


# -- the model --------------------------------------------------------------------------------
@pytest.mark.parametrize("key, vtype, value, needle", [
    ("qwen2.block_count", V.INT32, -1, "qwen2.block_count is -1, expected an integer from 1"),
    ("qwen2.block_count", V.UINT32, (1 << 31) - 1, "qwen2.block_count"),
    ("qwen2.block_count", V.STRING, "2", "expected an integer"),
    ("qwen2.attention.head_count", V.UINT32, 0, "attention.head_count is 0"),
    ("qwen2.attention.head_count_kv", V.UINT32, 3, "cannot be shared by 3 KV heads"),
    ("qwen2.rope.dimension_count", V.UINT32, 1 << 20, "rope.dimension_count is 1048576"),
    ("qwen2.rope.dimension_count", V.UINT32, 7, "expected an even number"),
    ("qwen2.attention.layer_norm_rms_epsilon", V.FLOAT32, float("nan"), "expected a finite FLOAT32 > 0"),
    ("qwen2.attention.layer_norm_rms_epsilon", V.FLOAT32, -1e-6, "expected a finite FLOAT32 > 0"),
    ("qwen2.rope.freq_base", V.FLOAT32, float("inf"), "rope.freq_base"),
    ("qwen2.rope.freq_base", V.UINT32, 10000, "rope.freq_base is 10000, expected a finite FLOAT32"),
    ("qwen2.rope.freq_base", V.FLOAT64, 1e6, "rope.freq_base is 1000000.0, expected a finite FLOAT32"),
    ("general.file_type", V.FLOAT32, 15.0, "general.file_type is 15.0, expected an integer"),
    ("qwen2.context_length", V.UINT32, 0, "context_length is 0"),
    ("qwen2.embedding_length", V.UINT64, (1 << 32) + 1, "embedding_length"),
    ("general.architecture", V.UINT32, 7, "general.architecture is 7, expected a string"),
    ("general.name", V.BOOL, True, "general.name is True, expected a string"),
    ("tokenizer.ggml.bos_token_id", V.UINT32, 1 << 31, "bos_token_id"),
    ("tokenizer.ggml.eos_token_id", V.STRING, "0", "eos_token_id"),
    ("tokenizer.ggml.model", V.UINT8, 1, "tokenizer.ggml.model"),
    ("tokenizer.ggml.add_bos_token", V.UINT8, 1, "expected a bool"),
])
def test_metadata_defects(tmp_path, tiny, key, vtype, value, needle):
    kvs, tensors = tiny
    _refused(write_gguf(tmp_path / "bad.gguf", set_key(kvs, key, vtype, value), tensors), needle)


def test_tokenizer_arrays_must_match(tmp_path, tiny):
    kvs, tensors = tiny
    toks = next(kv for kv in kvs if kv[0] == "tokenizer.ggml.tokens")
    short = set_key(kvs, "tokenizer.ggml.tokens", V.ARRAY, toks[2][:-10], V.STRING)
    _refused(write_gguf(tmp_path / "a.gguf", short, tensors), "token_type has")
    retyped = set_key(kvs, "tokenizer.ggml.token_type", V.ARRAY, ["x"] * len(toks[2]), V.STRING)
    _refused(write_gguf(tmp_path / "b.gguf", retyped, tensors), "token_type is an array", "expected an array of i32")



def test_tensor_roles(tmp_path, tiny):
    kvs, tensors = tiny
    t = [list(x) for x in tensors]
    bias = next(x for x in t if x[0] == "blk.0.attn_k.bias")
    n = bias[1][0]
    bias[2], bias[4] = Q.Q4_1, bytes(n // 32 * 20)  # an F32 bias retyped: the bytes fit Q4_1
    _refused(write_gguf(tmp_path / "a.gguf", kvs, t), "tensor blk.0.attn_k.bias: type Q4_1, expected F32")
    t = [list(x) for x in tensors]
    norm = next(x for x in t if x[0] == "blk.0.attn_norm.weight")
    norm[1] = [norm[1][0] // 2, 2]
    _refused(write_gguf(tmp_path / "b.gguf", kvs, t), "blk.0.attn_norm.weight has shape")
    t = [x for x in tensors if x[0] != "blk.0.ffn_up.weight"]
    _refused(write_gguf(tmp_path / "c.gguf", kvs, t), "tensor blk.0.ffn_up.weight is missing")


def test_writer_reproduces_the_model(tmp_path, tiny):
    """The writer's valid layout is llama.cpp's: the untouched structure loads and generates."""
    kvs, tensors = tiny
    p = write_gguf(tmp_path / "same.gguf", kvs, tensors)
    assert p.read_bytes() == TINY.read_bytes()
    assert len(list(numba_apr.load(p, n_ctx=32).generate("Hi", max_tokens=2, temperature=0))) >= 1


def test_cli_one_line(tmp_path, tiny):
    kvs, tensors = tiny
    p = write_gguf(tmp_path / "bad.gguf", set_key(kvs, "qwen2.rope.dimension_count", V.UINT32, 1 << 20), tensors)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "-m", str(p), "-n", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
