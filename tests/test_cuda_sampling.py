"""DeviceSampler (numba_apr/kernels/cuda/sampling.py) against the CPU chain's specification,
`sample_ref`: greedy with ties, top-k / top-p / min-p / temperature at forced uniforms, the repeat
penalty over a device history, ties at the k-th value, the radix-select and top-k-off paths, and
the device-side history append and generator advance.

In CI the kernels run under numba's CUDA simulator (conftest.py sets NUMBA_ENABLE_CUDASIM=1 before
numba is imported), where every GPU thread is a Python thread: blocks of one warp and small
vocabularies. With NUMBA_ENABLE_CUDASIM=0 on a GPU machine they run on the GPU, with the default
launch shape and a small one.
"""
import sys

import numpy as np
import pytest
from numba import config, cuda

from numba_apr.sampling import SamplingParams, sample_ref

if not (config.ENABLE_CUDASIM or cuda.is_available()):
    pytest.skip("no CUDA GPU and the simulator is off (NUMBA_ENABLE_CUDASIM=0)", allow_module_level=True)

SIM = bool(config.ENABLE_CUDASIM)

# Launch shapes: the simulator gets blocks of one warp (one to a few blocks); a GPU the defaults
# and a small shape (many blocks on small vocabularies). Tests alternate between the two, so the
# last-block hand-off and the candidate merging across blocks are exercised everywhere.
SHAPES = ([dict(threads=32, per_thread=16), dict(threads=32, per_thread=8)] if SIM
          else [dict(), dict(threads=32, per_thread=2)])


@pytest.fixture(autouse=True, scope="module")
def _quick_simulator_barriers():
    """The simulator's threads meet at every barrier through a polling loop that waits on the GIL:
    a short switch interval makes these tests about 3x faster. Restored afterwards."""
    old = sys.getswitchinterval()
    if SIM:
        sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def _mod():
    from numba_apr.kernels.cuda import sampling
    return sampling


def penalised(logits, recent, p):
    """sample_ref's penalty step: the values the chain ranks."""
    lg = np.array(logits, dtype=np.float32)
    recent = np.asarray(recent, dtype=np.int64).reshape(-1)
    if p.repeat_penalty != 1.0 and p.repeat_last_n != 0:
        window = recent if p.repeat_last_n < 0 else recent[max(len(recent) - p.repeat_last_n, 0):]
        pen = np.float32(p.repeat_penalty)
        for t in np.unique(window):
            lg[t] = lg[t] * pen if lg[t] <= 0 else lg[t] / pen
    return lg


def by_index(p, n):
    """top-k and top-p off: the device draws in index order (see _k_select), else in rank order."""
    return not 0 < p.top_k < n and p.top_p >= 1.0


def reference(logits, recent, p):
    """From sample_ref: (kept ids in rank order, kept ids in the device's draw order, their
    cumulative probabilities in that order). Rank order is descending value, lower id first on
    ties: the kept set must be a prefix of it."""
    prob = sample_ref(logits, recent, p)
    lg = penalised(logits, recent, p).astype(np.float64)
    order = np.lexsort((np.arange(len(lg)), -lg))
    kept = order[prob[order] > 0]
    assert np.array_equal(kept, order[:len(kept)]), "test setup: the kept set is not a prefix"
    walk = np.sort(kept) if by_index(p, len(lg)) else kept
    return kept, walk, np.cumsum(prob[walk])


def expected_token(walk, cum, u):
    """The draw at u: the first token (in draw order) whose cumulative probability exceeds u."""
    return int(walk[min(int(np.searchsorted(cum, u, side="right")), len(walk) - 1)])


def u_values(cum):
    """Forced uniforms at the start, the middle (the centre of a middle token's interval, far from
    any boundary) and the very end of the distribution."""
    j = len(cum) // 2
    mid = (cum[j - 1] + cum[j]) / 2 if j > 0 else cum[0] / 2
    return [0.0, float(mid), float(np.nextafter(1.0, 0.0))]


class Dev:
    """A DeviceSampler with its logits and output buffers."""

    def __init__(self, n, params, n_ctx=64, **kw):
        self.s = _mod().DeviceSampler(n, params, n_ctx, **kw)
        self.out = cuda.to_device(np.full(1, -1, np.int32))
        self.n = n

    def sample(self, logits, u=None, history=None):
        if history is not None:
            self.s.set_history(np.asarray(history, np.int32))
        d = logits if not isinstance(logits, np.ndarray) else cuda.to_device(logits)
        self.s.sample(d, self.out, u=u)
        return int(self.out.copy_to_host()[0])


def random_logits(rng, n, scale=3.0):
    return (rng.standard_normal(n) * scale).astype(np.float32)


def state(dev):
    """The sampler's small device arrays, for failure messages."""
    s = dev.s
    return {name: getattr(s, name).copy_to_host().tolist()
            for name in ("_prm", "_ctl", "_st", "_rng", "_fctl")}


def check_chain(dev, logits, recent, p, us=None):
    """Every u in `us` (default: start, middle, end) draws sample_ref's token, and the device's
    final candidate set is sample_ref's (same size, same last token in rank order)."""
    kept, walk, cum = reference(logits, recent, p)
    for u in (us if us is not None else u_values(cum)):
        got = dev.sample(logits, u=u, history=recent)
        assert got == expected_token(walk, cum, u), \
            f"u={u}: got {got}, kept {kept[:12]}... {state(dev)}"
        assert dev.s.last_selection() == (len(kept), int(kept[-1])), \
            f"final set: device {dev.s.last_selection()}, reference {(len(kept), int(kept[-1]))}, " \
            f"{state(dev)}"


# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_greedy_first_index_on_ties_and_penalty(shape):
    rng = np.random.default_rng(1)
    n = 700
    p = SamplingParams(temperature=0.0, repeat_penalty=1.5, repeat_last_n=3)
    dev = Dev(n, p, **SHAPES[shape])
    lg = random_logits(rng, n)
    lg[[40, 333, 650]] = lg.max() + 1.0          # three equal maxima: the first wins
    assert dev.sample(lg, history=[]) == 40
    # Window of the last 3 of [650, 1, 40, 333]: 40 and 333 are penalised, 650 is not.
    assert dev.sample(lg, history=[650, 1, 40, 333]) == 650
    # All three in the window: the runner-up of the penalised vector (sample_ref's argmax).
    hist = [40, 333, 650]
    want = int(np.argmax(sample_ref(lg, hist, p)))
    assert dev.sample(lg, history=hist) == want
    # Every value equal, -0.0 and +0.0 included: index 0.
    flat = np.zeros(n, np.float32)
    flat[::2] = -0.0
    assert dev.sample(flat, history=[]) == 0
    # Negative logits penalised (multiplied): the least negative unpenalised one wins.
    neg = -np.abs(random_logits(rng, n)) - 1.0
    top2 = np.argsort(-neg, kind="stable")[:2]
    assert dev.sample(neg, history=[top2[0]]) == int(np.argmax(sample_ref(neg, [top2[0]], p)))


@pytest.mark.parametrize("top_k", [1, 5, 40])
def test_top_k_chain_matches_reference(top_k):
    rng = np.random.default_rng(top_k)
    n = 800
    for i, p in enumerate([SamplingParams(top_k=top_k, top_p=0.9, min_p=0.05, temperature=0.8),
                           SamplingParams(top_k=top_k, top_p=0.7, min_p=0.0, temperature=1.3)]):
        dev = Dev(n, p, **SHAPES[i % len(SHAPES)])
        lg = random_logits(rng, n, scale=2.0)
        check_chain(dev, lg, [], p)


def test_repeat_penalty_over_device_history():
    rng = np.random.default_rng(7)
    n = 900
    p = SamplingParams(top_k=30, top_p=0.95, min_p=0.02, temperature=1.0, repeat_penalty=1.7,
                       repeat_last_n=12)
    dev = Dev(n, p, n_ctx=40, **SHAPES[-1])
    lg = random_logits(rng, n)
    best = np.argsort(-lg, kind="stable")
    # The best token is in the window (twice), the second best only before it, the third best has
    # a negative twin in the window too.
    lg[best[50]] = -4.0
    recent = [best[1]] + list(rng.integers(0, n, 6)) + [best[0], best[0], best[50]] + \
        list(rng.integers(0, n, 8)) + [best[2]]
    check_chain(dev, lg, recent, p)
    # repeat_last_n = -1: the whole history.
    p_all = SamplingParams(top_k=30, top_p=0.95, min_p=0.02, temperature=1.0, repeat_penalty=1.7,
                           repeat_last_n=-1)
    check_chain(Dev(n, p_all, n_ctx=40, **SHAPES[0]), lg, recent, p_all, us=[0.3])


def test_ties_at_the_kth_value_keep_lower_ids():
    n = 600
    lg = np.linspace(-3, 1, n).astype(np.float32)[np.random.default_rng(3).permutation(n)]
    tied = np.array([17, 90, 91, 300, 512, 599])
    lg[tied] = 2.0                                   # six equal values around the 4th place
    lg[[5, 250, 420]] = [5.0, 4.0, 3.0]
    p = SamplingParams(top_k=5, top_p=1.0, min_p=0.0, temperature=1.0)
    dev = Dev(n, p, **SHAPES[0])
    check_chain(dev, lg, [], p)
    assert dev.s.last_selection() == (5, 90)         # 5, 250, 420, then 17 and 90 of the tie


def test_radix_select_paths():
    """Candidate sets larger than the sort buffer (sort_cap lowered so small vocabularies reach
    them): the k-th key by radix select, then the sorted chain or, for large k and top-k off, the
    generic chain (top-p by a mass radix select, the draw by another)."""
    rng = np.random.default_rng(11)
    n = 600
    flat = random_logits(rng, n, scale=0.4)          # many keys share the k-th key's bin
    steps = rng.integers(0, 4, n).astype(np.float32)  # 4 values: ties everywhere, ids decide
    cases = [
        (steps, SamplingParams(top_k=40, top_p=0.9, min_p=0.01, temperature=0.9)),  # radix k, sort
        (steps, SamplingParams(top_k=300, top_p=0.6, min_p=0.0, temperature=1.1)),  # k > sort_cap
        (flat, SamplingParams(top_k=0, top_p=0.1, min_p=0.0, temperature=0.7)),     # top-p: sort
        (flat, SamplingParams(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0)),     # whole vocab
        (flat, SamplingParams(top_k=0, top_p=0.8, min_p=0.3, temperature=1.0)),     # min-p's end
        (flat, SamplingParams(top_k=5000, top_p=1.0, min_p=0.5, temperature=1.0)),  # k >= n: off
    ]
    for i, (lg, p) in enumerate(cases):
        dev = Dev(n, p, sort_cap=64, **SHAPES[i % len(SHAPES)])
        kept, walk, cum = reference(lg, [], p)
        check_chain(dev, lg, [], p, us=u_values(cum)[1:2] if i % 2 else u_values(cum)[0:2])


def test_top_k_off_paths():
    """top-k off: top-p found among the ADAPT_K best (exact), a nucleus wider than them (the
    others are brought in), and with top-p off too the draw in index order over min-p's survivors
    or the whole vocabulary, across blocks."""
    rng = np.random.default_rng(5)
    n = 800
    lg = random_logits(rng, n)
    flat = random_logits(rng, n, scale=0.3)
    cases = [(lg, SamplingParams(top_k=0, top_p=0.9, min_p=0.05, temperature=0.8), [0.4999]),
             (lg, SamplingParams(top_k=-1, top_p=0.95, min_p=0.0, temperature=1.0), [0.0, 0.4999]),
             (flat, SamplingParams(top_k=0, top_p=0.99, min_p=0.0, temperature=1.0), [0.4999]),
             (lg, SamplingParams(top_k=0, top_p=1.0, min_p=0.02, temperature=0.9), [0.0, 0.6]),
             (flat, SamplingParams(top_k=n, top_p=1.0, min_p=0.0, temperature=1.2), [0.4999, 0.9999])]
    for i, (x, p, us) in enumerate(cases):
        check_chain(Dev(n, p, **SHAPES[i % len(SHAPES)]), x, [], p, us=us)


def test_history_append_and_generator_on_device():
    m = _mod()
    rng = np.random.default_rng(2)
    n = 400
    p = SamplingParams(top_k=20, top_p=1.0, min_p=0.0, temperature=1.5, repeat_penalty=1.3,
                       repeat_last_n=4, seed=1234)
    dev = Dev(n, p, n_ctx=6, **SHAPES[0])
    lg = random_logits(rng, n, scale=1.0)
    d = cuda.to_device(lg)
    dev.s.set_history(np.array([3, 1], np.int32))
    hist = [3, 1]
    for step in range(4):
        # What sample_ref draws at the device generator's uniform for this step, with the history
        # the device has accumulated so far.
        u = m.splitmix_uniform(1234, step)
        kept, walk, cum = reference(lg, hist, p)
        dev.s.sample(d, dev.out)
        tok = int(dev.out.copy_to_host()[0])
        assert tok == expected_token(walk, cum, u)
        hist.append(tok)
        assert dev.s.history().tolist() == hist[:6]
        assert dev.s.step == step + 1
    # The history is full (n_ctx = 6): the token is still drawn, the append is dropped.
    dev.s.sample(d, dev.out)
    assert dev.s.history().tolist() == hist[:6] and dev.s.step == 5
    # Same seed, same history: the same tokens. A forced u serves one call and still advances.
    dev.s.reset()
    dev.s.set_history(np.array([3, 1], np.int32))
    again = []
    for _ in range(4):
        dev.s.sample(d, dev.out)
        again.append(int(dev.out.copy_to_host()[0]))
    assert again == hist[2:6]
    dev.s.reset(seed=99)
    dev.s.set_history(np.array([], np.int32))
    kept, walk, cum = reference(lg, [], p)
    assert dev.sample(d, u=0.0) == int(kept[0]) and dev.s.step == 1
    tok = dev.sample(d)
    kept, walk, cum = reference(lg, [int(kept[0])], p)
    assert tok == expected_token(walk, cum, m.splitmix_uniform(99, 1))
    assert np.array_equal(d.copy_to_host(), lg), "the caller's logits were modified"


def test_splitmix_reference_values():
    # Known outputs of splitmix64 seeded with 0 (Vigna's reference: 0xE220A8397B1DCDAF, ...).
    m = _mod()
    assert m.splitmix_uniform(0, 0) == (0xE220A8397B1DCDAF >> 11) / 2.0 ** 53
    assert m.splitmix_uniform(0, 1) == (0x6E789E6AA1B965F4 >> 11) / 2.0 ** 53
    assert m.key_host(1.5, 7) > m.key_host(1.5, 8) > m.key_host(-2.0, 0) > m.key_host(-np.inf, 0)
    assert m.key_host(-0.0, 3) == m.key_host(0.0, 3)


def test_argument_errors():
    from numba_apr.errors import NumbaAprError
    m = _mod()
    p = SamplingParams()
    for kw in (dict(threads=48), dict(threads=1024), dict(per_thread=0), dict(sort_cap=4096)):
        with pytest.raises(NumbaAprError):
            m.DeviceSampler(100, p, 8, **kw)
    with pytest.raises(NumbaAprError):
        m.DeviceSampler(0, p, 8)
    s = m.DeviceSampler(100, p, 4, threads=32)
    assert s.graph_capturable
    with pytest.raises(NumbaAprError):
        s.set_history(np.array([1, 2, 3, 4, 5], np.int32))      # longer than n_ctx
    with pytest.raises(NumbaAprError):
        s.set_history(np.array([100], np.int32))                # outside the vocabulary
    out = cuda.to_device(np.zeros(1, np.int32))
    with pytest.raises(NumbaAprError):
        s.sample(cuda.to_device(np.zeros(99, np.float32)), out)
    with pytest.raises(NumbaAprError):
        s.sample(cuda.to_device(np.zeros(100, np.float32)), out, u=1.0)
