"""Sampler kernels against the plain NumPy reference (sample_ref), plus the properties that matter
to generation: greedy = argmax, seeded reproducibility, penalties on the right tokens, draws that
follow the distribution."""
import math

import numpy as np
import pytest

from numba_apr.errors import NumbaAprError
from numba_apr.sampling import HEAP_MAX, Sampler, SamplingParams, sample_ref


def kernel_distribution(sampler, logits, recent):
    """Run one sample and scatter the sampler's final candidates to a full float64 distribution."""
    sampler.sample(logits, recent)
    ids, p = sampler.candidates()
    full = np.zeros(sampler.n_vocab, dtype=np.float64)
    full[ids] = p
    assert len(np.unique(ids)) == len(ids), "a candidate appears twice"
    return full


def random_logits(rng, n, scale=3.0):
    return (rng.standard_normal(n) * scale).astype(np.float32)


CONFIGS = {
    "defaults": SamplingParams(),
    "top_k_off": SamplingParams(top_k=0),
    "top_k_off_min_p_off": SamplingParams(top_k=0, min_p=0.0),
    "top_k_off_top_p_off": SamplingParams(top_k=0, top_p=1.0),
    "only_temperature": SamplingParams(top_k=0, top_p=1.0, min_p=0.0, temperature=1.3),
    "top_k_large": SamplingParams(top_k=HEAP_MAX + 500, top_p=0.6, min_p=0.0),
    "top_k_large_min_p": SamplingParams(top_k=HEAP_MAX + 500, top_p=0.9, min_p=0.01),
    "top_k_small_top_p": SamplingParams(top_k=200, top_p=0.5, min_p=0.0),
    "min_p_only": SamplingParams(top_k=0, top_p=1.0, min_p=0.2),
    "cold": SamplingParams(temperature=0.3, top_k=100, top_p=0.99, min_p=0.0),
    "penalty": SamplingParams(repeat_penalty=1.3, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0),
    "penalty_defaults": SamplingParams(repeat_penalty=1.1),
    "penalty_all_recent": SamplingParams(repeat_penalty=1.5, repeat_last_n=-1),
    "penalty_window_off": SamplingParams(repeat_penalty=1.5, repeat_last_n=0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n_vocab,scale", [(7000, 3.0), (7000, 0.7), (50, 2.0)])
def test_distribution_matches_reference(name, n_vocab, scale):
    params = CONFIGS[name]
    rng = np.random.default_rng(abs(hash((name, n_vocab, scale))) % 2**32)
    sampler = Sampler(n_vocab, params)
    for _ in range(3):
        logits = random_logits(rng, n_vocab, scale)
        # Recent tokens: some repeated, and the best ones among them so the penalty changes the cut.
        recent = np.concatenate([rng.integers(0, n_vocab, 100), np.argsort(logits)[-5:]]).astype(np.int32)
        ref = sample_ref(logits, recent, params)
        got = kernel_distribution(sampler, logits, recent)
        assert np.array_equal(got > 0, ref > 0), f"candidate sets differ: {np.count_nonzero(got)} vs {np.count_nonzero(ref)}"
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", ["defaults", "top_k_off", "top_k_off_min_p_off", "penalty_defaults"])
def test_full_vocabulary_matches_reference(name):
    params = CONFIGS[name]
    n = 262144
    rng = np.random.default_rng(5)
    sampler = Sampler(n, params)
    logits = random_logits(rng, n, 2.5)
    recent = rng.integers(0, n, 300).astype(np.int32)
    ref = sample_ref(logits, recent, params)
    got = kernel_distribution(sampler, logits, recent)
    assert np.array_equal(got > 0, ref > 0)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-13)


def test_peaked_logits_use_small_nucleus():
    """A real model's logits: a few tokens far above the rest. With top_k off the nucleus is found
    among the best few (the adaptive path) and must still equal the reference."""
    n = 50000
    rng = np.random.default_rng(11)
    logits = random_logits(rng, n, 1.0)
    logits[rng.choice(n, 20, replace=False)] += np.linspace(8, 14, 20).astype(np.float32)
    for params in (SamplingParams(top_k=0, min_p=0.0), SamplingParams(top_k=0, top_p=0.999, min_p=0.0)):
        got = kernel_distribution(Sampler(n, params), logits, None)
        np.testing.assert_allclose(got, sample_ref(logits, None, params), rtol=1e-9, atol=1e-13)


def test_ties_keep_the_right_mass():
    """With equal logits the kept set is ambiguous; its size and its probabilities are not."""
    n = 3000
    rng = np.random.default_rng(3)
    logits = (np.round(rng.standard_normal(n) * 4) / 2).astype(np.float32)  # many exact ties
    for params in (SamplingParams(top_k=0, top_p=0.7, min_p=0.0), SamplingParams(top_k=500, top_p=0.8),
                   SamplingParams(top_k=0, top_p=1.0, min_p=0.1)):
        got = kernel_distribution(Sampler(n, params), logits, None)
        ref = sample_ref(logits, None, params)
        assert np.count_nonzero(got) == np.count_nonzero(ref)
        np.testing.assert_allclose(np.sort(got[got > 0]), np.sort(ref[ref > 0]), rtol=1e-9)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_is_argmax(temperature):
    rng = np.random.default_rng(1)
    n = 5000
    sampler = Sampler(n, SamplingParams(temperature=temperature, seed=1))
    for _ in range(20):
        logits = random_logits(rng, n)
        assert sampler.sample(logits, None) == int(np.argmax(logits))
    # The penalty still applies before the argmax: penalise the best token hard.
    logits = random_logits(rng, n)
    best = int(np.argmax(logits))
    logits[best] = abs(logits[best]) + 1.0
    sampler = Sampler(n, SamplingParams(temperature=temperature, repeat_penalty=1e6))
    tok = sampler.sample(logits, np.array([best], dtype=np.int32))
    assert tok != best and tok == int(np.argsort(logits)[-2])


def test_greedy_first_of_ties():
    logits = np.zeros(1000, dtype=np.float32)
    logits[[17, 400, 999]] = 5.0
    assert Sampler(1000, SamplingParams(temperature=0)).sample(logits, None) == 17


def test_top_k_one_is_greedy():
    rng = np.random.default_rng(2)
    n = 30000
    sampler = Sampler(n, SamplingParams(top_k=1, temperature=1.5))
    for _ in range(20):
        logits = random_logits(rng, n, 0.5)  # flat: anything but the argmax would show
        assert sampler.sample(logits, None) == int(np.argmax(logits))


def test_draws_follow_the_distribution():
    """Chi-square of many seeded draws against the reference distribution (loose: 6 sigma)."""
    n = 60
    rng = np.random.default_rng(4)
    logits = random_logits(rng, n, 1.5)
    recent = np.array([int(np.argmax(logits)), 3, 3, 7], dtype=np.int32)
    params = SamplingParams(temperature=0.9, top_k=25, top_p=0.9, min_p=0.02, repeat_penalty=1.2, seed=1234)
    ref = sample_ref(logits, recent, params)
    sampler = Sampler(n, params)
    draws = 40000
    counts = np.bincount([sampler.sample(logits, recent) for _ in range(draws)], minlength=n)
    assert np.all(counts[ref == 0] == 0), "drew a token outside the candidate set"
    keep = ref > 0
    expected = ref[keep] * draws
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    assert df >= 5
    assert chi2 < df + 6 * math.sqrt(2 * df), f"chi2 {chi2:.1f} with {df} degrees of freedom"


def test_penalty_hits_the_right_tokens():
    """Recover the penalised logits from a temperature-1, unfiltered distribution."""
    n = 100
    logits = np.linspace(-4, 4, n).astype(np.float32)
    # Window of 5: only the last five ids count; 90 appears twice there (penalised once), 10 only
    # before the window (not penalised), 50 is negative, 80 positive.
    recent = np.array([10, 10, 20, 90, 50, 90, 80, 3], dtype=np.int32)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=2.0, repeat_last_n=5)
    sampler = Sampler(n, params)
    before = logits.copy()
    got = kernel_distribution(sampler, logits, recent)
    assert np.array_equal(logits, before), "sample() must leave the caller's logits as they were"
    recovered = np.log(got) - np.log(got[0]) + float(logits[0])
    expect = logits.astype(np.float64).copy()
    for t in (90, 50, 80, 3):
        expect[t] = logits[t] / 2.0 if logits[t] > 0 else logits[t] * 2.0
    np.testing.assert_allclose(recovered, expect, atol=1e-5)
    np.testing.assert_allclose(got, sample_ref(logits, recent, params), rtol=1e-9, atol=1e-15)
    # And the penalty is undone for the next call: without recent tokens, no penalty.
    plain = kernel_distribution(sampler, logits, np.zeros(0, dtype=np.int32))
    np.testing.assert_allclose(np.log(plain) - np.log(plain[0]) + float(logits[0]), logits, atol=1e-5)


def test_seed_reproducibility():
    n = 1000
    rng = np.random.default_rng(6)
    logits = random_logits(rng, n, 0.3)
    params = SamplingParams(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0, seed=42)

    def run(s, count=60):
        return [s.sample(logits, None) for _ in range(count)]

    a, b = Sampler(n, params), Sampler(n, params)
    first = run(a)
    assert first == run(b)
    a.reset()  # back to params.seed
    assert run(a) == first
    a.reset(seed=7)
    other = run(a)
    assert other != first
    a.reset(seed=7)
    assert run(a) == other
    # No seed: each sampler draws its own from OS entropy.
    unseeded = SamplingParams(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0)
    assert run(Sampler(n, unseeded)) != run(Sampler(n, unseeded))


def test_accepts_other_integer_recent():
    n = 100
    logits = np.linspace(0, 1, n).astype(np.float32)
    params = SamplingParams(temperature=0, repeat_penalty=100.0)
    assert Sampler(n, params).sample(logits, [99, 98]) == 97
    assert Sampler(n, params).sample(logits, np.array([99], dtype=np.int64)) == 98


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0"),
    (dict(min_p=-0.1), "min_p must be in [0, 1], got -0.1"),
    (dict(min_p=2.0), "min_p must be in [0, 1], got 2"),
    (dict(repeat_penalty=0.0), "repeat_penalty must be > 0, got 0"),
    (dict(repeat_last_n=-2), "repeat_last_n must be >= -1"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
    (dict(top_k=True), "top_k must be an integer"),
    (dict(seed="x"), "seed must be an integer"),
])
def test_validate_errors(kwargs, message):
    params = SamplingParams(**kwargs)
    with pytest.raises(NumbaAprError) as e:
        params.validate()
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(NumbaAprError):
        Sampler(10, params)


def test_validate_accepts_edges():
    for kw in (dict(top_p=1.0), dict(min_p=0.0), dict(min_p=1.0), dict(top_k=-1), dict(temperature=-1.0),
               dict(repeat_last_n=-1), dict(seed=0), dict(seed=-1)):
        SamplingParams(**kw).validate()


def test_bad_inputs():
    s = Sampler(10, SamplingParams())
    with pytest.raises(NumbaAprError, match="float32"):
        s.sample(np.zeros(10, dtype=np.float64), None)
    with pytest.raises(NumbaAprError, match="10 values"):
        s.sample(np.zeros(11, dtype=np.float32), None)
    with pytest.raises(NumbaAprError, match="outside the vocabulary"):
        Sampler(10, SamplingParams(repeat_penalty=1.1)).sample(np.zeros(10, dtype=np.float32),
                                                              np.array([3, 10], dtype=np.int32))
    with pytest.raises(NumbaAprError, match="n_vocab"):
        Sampler(0, SamplingParams())
