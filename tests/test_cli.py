"""The command line and bad input: every user error is one line `error: ...` and a non-zero exit,
never a traceback; a good run streams text and ends with the stats line."""
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFWriter

from conftest import ROOT, SHARED
from gguf_writer import tiny_structure, write_gguf

TINY = SHARED / "models" / "tiny-qwen2-q4km.gguf"


def run(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *map(str, args)],
                          capture_output=True, text=True, input=stdin, timeout=600)


def assert_one_line_error(r, *words):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("\rloading")]
    lines = [x.split("\r")[-1] for x in lines]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_generates_and_reports_stats():
    r = run("-m", TINY, "-p", "Hello", "-n", 6, "--temp", 0)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello\n")
    stats = r.stderr.strip().splitlines()[-1]
    assert "prompt 1 tokens" in stats and "generated 6 tokens" in stats and "tok/s" in stats


def test_greedy_is_deterministic_and_seeded_sampling_reproducible():
    a = run("-m", TINY, "Hello", "-n", 5, "--temp", 0)
    b = run("-m", TINY, "Hello", "-n", 5, "--temp", 0)
    assert a.returncode == 0 and a.stdout == b.stdout
    c = run("-m", TINY, "Hello", "-n", 5, "--seed", 7)
    d = run("-m", TINY, "Hello", "-n", 5, "--seed", 7)
    assert c.returncode == 0 and c.stdout == d.stdout


def test_chat_mode_answers_each_line():
    r = run("-m", TINY, "--chat", "-n", 4, "--temp", 0, stdin="hi\nand again\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 2
    assert r.stderr.count("generated") == 2


def test_missing_file():
    assert_one_line_error(run("-m", "/nonexistent/model.gguf"), "not found", "/nonexistent/model.gguf")


def test_directory(tmp_path):
    assert_one_line_error(run("-m", tmp_path), "directory")


def test_not_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is not a model\n" * 10)
    assert_one_line_error(run("-m", p), "not a GGUF file")


@pytest.mark.parametrize("keep", [30, 4096, 1_000_000, 39_000_000])
def test_truncated(tmp_path, keep):
    p = tmp_path / "cut.gguf"
    p.write_bytes(TINY.read_bytes()[:keep])
    assert_one_line_error(run("-m", p), "truncated")


def _write_gguf(path, arch):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "mamba.gguf"
    _write_gguf(p, "mamba")
    assert_one_line_error(run("-m", p), "architecture", "mamba", "not supported")


def test_unsupported_tensor_type(tmp_path):
    """One Q4_K tensor of the tiny model as IQ4_XS (same block of 256, 136 bytes), laid out validly."""
    kvs, tensors = tiny_structure()
    t = next(t for t in tensors if t[0] == "blk.0.attn_q.weight")
    assert t[2] == 12  # Q4_K
    t[2], t[4] = 23, bytes(len(t[4]) // 144 * 136)  # IQ4_XS
    p = write_gguf(tmp_path / "iq4.gguf", kvs, tensors)
    assert_one_line_error(run("-m", p), "blk.0.attn_q.weight", "IQ4_XS", "not support")


def test_prompt_longer_than_context():
    assert_one_line_error(run("-m", TINY, "-c", 8, "-p", "word " * 50), "longer than the context")


@pytest.mark.parametrize("flags,words", [
    (["--temp", "-1"], ["--temp"]),
    (["-n", "abc"], ["-n"]),
    (["-c", "0"], ["ctx-size"]),
    (["-t", "0"], ["threads"]),
    (["-t", "1000"], ["threads"]),
    (["--top-p", "2"], ["top_p"]),
    (["--min-p", "-0.5"], ["min_p"]),
    (["--repeat-penalty", "0"], ["repeat_penalty"]),
    (["--device", "tpu"], ["tpu"]),
    (["--no-such-flag"], ["--no-such-flag"]),
])
def test_bad_flags(flags, words):
    assert_one_line_error(run("-m", TINY, "-p", "Hi", "-n", 2, *flags), *words)


def test_unknown_packaged_model():
    assert_one_line_error(run("-m", "no-such-model"), "not found", "packaged models")
