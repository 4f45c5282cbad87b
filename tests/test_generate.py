"""The generation loop and the Python API on the tiny model: stop strings, limits, prefix reuse,
chat, and errors raised before any output."""
import numpy as np
import pytest

import numba_apr
from conftest import SHARED
from numba_apr.generate import GenerationStats, _StopFilter

TINY = SHARED / "models" / "tiny-qwen2-q4km.gguf"


@pytest.fixture(scope="module")
def model():
    return numba_apr.load(TINY, n_ctx=64)


def test_stop_filter_holds_back_possible_starts():
    f = _StopFilter(["STOP", "\n\n"])
    assert f.push("abc ST") == ("abc ", False)  # "ST" may start "STOP"
    assert f.push("A") == ("STA", False)        # it did not
    assert f.push("x\n") == ("x", False)
    assert f.push("\nrest") == ("", True)       # "\n\n" hit: nothing after it is emitted
    g = _StopFilter([])
    assert g.push("anything") == ("anything", False)


def test_greedy_generation_is_reproducible_and_counts_tokens(model):
    s1, s2 = GenerationStats(), GenerationStats()
    a = "".join(model.generate("Hello", max_tokens=8, temperature=0, stats=s1))
    b = "".join(model.generate("Hello", max_tokens=8, temperature=0, stats=s2))
    assert a == b and s1.token_ids == s2.token_ids
    assert s1.generated_tokens == 8 and s1.stop_reason == "length"
    assert a == model.detokenize(s1.token_ids)


def test_generation_from_token_ids_equals_text_prompt(model):
    ids = model.tokenize("Hello")
    s1, s2 = GenerationStats(), GenerationStats()
    list(model.generate(ids, max_tokens=5, temperature=0, stats=s1))
    list(model.generate("Hello", max_tokens=5, temperature=0, stats=s2))
    assert s1.token_ids == s2.token_ids


def test_stop_string_ends_generation_without_emitting_it(model):
    stats = GenerationStats()
    full = "".join(model.generate("Hello", max_tokens=12, temperature=0, stats=stats))
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = GenerationStats()
    text = "".join(model.generate("Hello", max_tokens=12, temperature=0, stop=[stop], stats=cut))
    assert text == full[:full.index(stop)]
    assert cut.stop_reason == "stop string"


def test_seeded_sampling_reproducible_and_seed_matters(model):
    out = []
    for seed in (1, 1, 2):
        s = GenerationStats()
        list(model.generate("Hello", max_tokens=16, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0,
                            seed=seed, stats=s))
        out.append(s.token_ids)
    assert out[0] == out[1] and out[0] != out[2]


def test_context_full_stops(model):
    stats = GenerationStats()
    list(model.generate("Hello", max_tokens=500, temperature=0, stats=stats))
    assert stats.stop_reason in ("context full", "eog")
    assert model.n_past <= model.n_ctx


def test_prefix_reuse_gives_the_same_logits(model):
    ids = model.tokenize("one two three four five")
    fresh = model.logits(ids)[-1].copy()
    model._prefill(ids[:3])
    again = model._prefill(ids)[0]  # reuses the 3 cached tokens, evaluates the rest
    np.testing.assert_array_equal(fresh, again)


def test_chat_uses_template(model):
    prompt = model.chat_prompt([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    stats = GenerationStats()
    list(model.chat([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, stats=stats))
    assert stats.prompt_tokens == len(model.tokenize(prompt, add_bos=False))


@pytest.mark.parametrize("call,words", [
    (lambda m: m.generate("word " * 100, max_tokens=1), "longer than the context"),
    (lambda m: m.generate("Hello", top_p=0.0), "top_p"),
    (lambda m: m.generate("Hello", max_tokens=-2), "max_tokens"),
    (lambda m: m.generate([10**9], max_tokens=1), "out of range"),
    (lambda m: m.logits([]), "non-empty"),
])
def test_errors_are_raised_eagerly(model, call, words):
    with pytest.raises(numba_apr.NumbaAprError, match=words):
        call(model)


def test_load_errors():
    with pytest.raises(numba_apr.NumbaAprError, match="device 'tpu'"):
        numba_apr.load(TINY, device="tpu")
    with pytest.raises(numba_apr.NumbaAprError, match="n_ctx"):
        numba_apr.load(TINY, n_ctx=0)


def test_load_tokenizer_on_vocab_only_file():
    tok = numba_apr.load_tokenizer(SHARED / "vocab" / "ggml-vocab-qwen2.gguf")
    assert tok.detokenize(tok.tokenize("Hello world")) == "Hello world"
