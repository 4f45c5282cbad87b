"""Token sampling: llama.cpp's default sampler chain, as Numba kernels over preallocated buffers.

The chain, in llama.cpp's order (common/sampling.cpp builds it the same way):

1. repetition penalty over the last `repeat_last_n` tokens of `recent` (prompt + generated): every
   distinct token found there has its logit divided by the penalty when positive and multiplied by it
   when negative (once, however often it appears);
2. top-k: keep the k highest logits (k <= 0: the whole vocabulary);
3. top-p (nucleus): softmax over what is left, keep the shortest prefix in descending order whose
   probability sums to at least p (never fewer than 1 token);
4. min-p: keep the tokens whose probability is at least min_p times the largest one;
5. temperature: divide the logits by it (<= 0: greedy, the argmax of the penalised logits);
6. a draw from the softmax of what is left, with a seeded random generator.

How the kernels stay fast on a 262,144-token vocabulary:

* The usual case (top_k small) selects the top k with a min-heap over one scan of the logits. The scan
  goes by blocks of 64: "is any value of the block above the heap's minimum?" is an OR of compares
  that LLVM vectorises, and the minimum soon exceeds almost every block, so most of the vocabulary
  costs one SIMD compare per 16 values. Only the k survivors are sorted; top-p, min-p and
  temperature then run over them exactly as llama.cpp does. Greedy is the same scan for k = 1.
* With top_k off or large, nothing is fully sorted. min-p and top-p both keep a prefix of the
  descending order, so the final set is the shorter of the two prefixes, whichever runs first: min-p
  is a linear filter, and top-p first looks for its prefix among the best 256 (llama.cpp's adaptive
  trick: a real model's nucleus is small), else runs a "weighted quickselect" that partitions the
  survivors around pivots until the smallest prefix with enough probability mass is known (expected
  linear time). The mass top-p compares against is normalised over the whole top-k set, as
  llama.cpp's softmax is. The softmax over the whole vocabulary this needs costs ~2 ms (a scalar
  exp per token: this Numba build has no SVML), against ~0.06 ms for the default chain.

`Sampler.sample` does not modify the caller's logits: the penalty is applied in place and the few
penalised logits are put back before the kernel returns (cheaper than copying the whole vector).

`sample_ref` is the plain NumPy statement of the same chain (full sort, float64), for tests.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ._numba import jit
from .errors import NumbaAprError

# top_k up to this many candidates go through the heap; larger k (or k off) through quickselect.
HEAP_MAX = 4096
# With top_k off and top-p on, the nucleus is first looked for among this many best tokens.
ADAPTIVE_K = 256
# Block width of the skip test in the scans: 64 floats (four AVX-512 vectors) is where the test
# vectorises and its branch is amortised; smaller blocks measured 2-4x slower.
_BLOCK = 64
_SUB = 16


@dataclass(frozen=True)
class SamplingParams:
    """Sampler settings, with llama.cpp's CLI defaults.

    top_k <= 0, top_p >= 1, min_p <= 0 and repeat_penalty == 1 switch the stage off; temperature <= 0
    samples greedily; repeat_last_n == -1 penalises over all of `recent`, 0 switches the penalty off.
    seed None (or negative, like llama.cpp's -1) draws a seed from OS entropy.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self) -> None:
        """Raise NumbaAprError naming the first bad value."""

        def real(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(float(v)):
                raise NumbaAprError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        def integer(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise NumbaAprError(f"{name} must be an integer, got {v!r}")
            return int(v)

        real("temperature")
        integer("top_k")
        top_p = real("top_p")
        if not 0.0 < top_p <= 1.0:
            raise NumbaAprError(f"top_p must be in (0, 1], got {top_p:g}")
        min_p = real("min_p")
        if not 0.0 <= min_p <= 1.0:
            raise NumbaAprError(f"min_p must be in [0, 1], got {min_p:g}")
        rp = real("repeat_penalty")
        if rp <= 0.0:
            raise NumbaAprError(f"repeat_penalty must be > 0, got {rp:g}")
        if integer("repeat_last_n") < -1:
            raise NumbaAprError(f"repeat_last_n must be >= -1 (-1: all tokens), got {self.repeat_last_n}")
        if self.seed is not None:
            integer("seed")


# ---------------------------------------------------------------------------------------------------
# Kernels

@jit
def _penalize(logits, recent, start, penalty, seen, pen_idx, pen_val):
    """llama.cpp's repetition penalty over recent[start:], in place on `logits`.

    Each distinct token is penalised once (`seen` marks them; it is cleared again by _restore). The
    original values go to pen_idx/pen_val so _restore can put them back. Returns (count, bad): the
    number of tokens penalised and the number of ids outside the vocabulary (skipped).
    """
    n = logits.shape[0]
    count = 0
    bad = 0
    for j in range(start, recent.shape[0]):
        t = recent[j]
        if t < 0 or t >= n:
            bad += 1
            continue
        if seen[t]:
            continue
        seen[t] = 1
        v = logits[t]
        pen_idx[count] = t
        pen_val[count] = v
        count += 1
        # In float64, then rounded: the package's fastmath ("arcp") may turn a float32 division into
        # a multiply by the reciprocal, one ulp off llama.cpp's (and sample_ref's) float32 quotient.
        if v <= 0.0:
            logits[t] = np.float32(np.float64(v) * penalty)
        else:
            logits[t] = np.float32(np.float64(v) / penalty)
    return count, bad


@jit
def _restore(logits, count, seen, pen_idx, pen_val):
    for j in range(count):
        t = pen_idx[j]
        logits[t] = pen_val[j]
        seen[t] = 0


@jit
def _argmax(x):
    """Index of the largest value (the first one on ties). Blocks with nothing above the running
    best are skipped after a vectorised test (see _heap_topk_sorted)."""
    n = x.shape[0]
    best = 0
    bv = x[0]
    nb = n // _BLOCK
    for b in range(nb):
        i = b * _BLOCK
        blk = x[i:i + _BLOCK]
        hit = 0
        for j in range(_BLOCK):
            hit |= blk[j] > bv
        if hit:
            for j in range(i, i + _BLOCK):
                if x[j] > bv:
                    bv = x[j]
                    best = j
    for j in range(nb * _BLOCK, n):
        if x[j] > bv:
            bv = x[j]
            best = j
    return best


@jit
def _sift_down(hv, hi, pos, size):
    """Restore the min-heap property below `pos` (hv values, hi their token ids)."""
    v = hv[pos]
    t = hi[pos]
    while True:
        c = 2 * pos + 1
        if c >= size:
            break
        if c + 1 < size and hv[c + 1] < hv[c]:
            c += 1
        if hv[c] >= v:
            break
        hv[pos] = hv[c]
        hi[pos] = hi[c]
        pos = c
    hv[pos] = v
    hi[pos] = t


@jit
def _heap_push(hv, hi, k, v, j):
    if v > hv[0]:
        hv[0] = v
        hi[0] = j
        _sift_down(hv, hi, 0, k)


@jit
def _heap_topk_sorted(x, ids, size, k, hv, hi):
    """The k largest of x[:size], sorted descending, into hv[:k] (values) and hi[:k] (their ids:
    ids[j] when `ids` is not empty, else the position j itself)."""
    with_ids = ids.shape[0] > 0
    for j in range(k):
        hv[j] = x[j]
        hi[j] = ids[j] if with_ids else j
    for j in range(k // 2 - 1, -1, -1):
        _sift_down(hv, hi, j, k)
    # Blocks of _BLOCK values: "is any of them above the heap's minimum?" is an OR of compares that
    # LLVM vectorises (a float max reduction would not be: Numba's selects carry no fast-math flags;
    # and the flag must be an int, a bool accumulator measured 3x slower).
    # The heap minimum soon exceeds almost every block, so that test is all most values cost.
    i = k
    while i < size and i % _BLOCK != 0:
        _heap_push(hv, hi, k, x[i], ids[i] if with_ids else i)
        i += 1
    nb = size // _BLOCK
    for b in range(i // _BLOCK, nb):
        i0 = b * _BLOCK
        thr = hv[0]
        blk = x[i0:i0 + _BLOCK]
        hit = 0
        for j in range(_BLOCK):
            hit |= blk[j] > thr
        if hit:
            # Same test on quarters first: a hit block usually holds one new candidate.
            for s0 in range(i0, i0 + _BLOCK, _SUB):
                sub = x[s0:s0 + _SUB]
                thr = hv[0]
                h = 0
                for j in range(_SUB):
                    h |= sub[j] > thr
                if h:
                    for j in range(s0, s0 + _SUB):
                        _heap_push(hv, hi, k, x[j], ids[j] if with_ids else j)
    for j in range(max(nb * _BLOCK, i), size):
        _heap_push(hv, hi, k, x[j], ids[j] if with_ids else j)
    # Heapsort in place: popping the minimum to the back leaves the array in descending order.
    for last in range(k - 1, 0, -1):
        v = hv[0]
        t = hi[0]
        hv[0] = hv[last]
        hi[0] = hi[last]
        hv[last] = v
        hi[last] = t
        _sift_down(hv, hi, 0, last)


@jit
def _compact_above(x, ids, size, thr, out_val, out_idx):
    """Copy the values of x[:size] that are >= thr, with their ids (ids[j], or j when `ids` is
    empty), to the front of out_val/out_idx; returns their count. May run in place (out is x).
    Blocks with no survivor are skipped after a vectorised test."""
    with_ids = ids.shape[0] > 0
    c = 0
    nb = size // _BLOCK
    for b in range(nb):
        i0 = b * _BLOCK
        blk = x[i0:i0 + _BLOCK]
        hit = 0
        for j in range(_BLOCK):
            hit |= blk[j] >= thr
        if hit:
            for j in range(i0, i0 + _BLOCK):
                v = x[j]
                if v >= thr:
                    out_idx[c] = ids[j] if with_ids else j
                    out_val[c] = v
                    c += 1
    for j in range(nb * _BLOCK, size):
        v = x[j]
        if v >= thr:
            out_idx[c] = ids[j] if with_ids else j
            out_val[c] = v
            c += 1
    return c


@jit
def _expsum(x, size, m):
    z = 0.0
    for j in range(size):
        z += math.exp(np.float64(x[j]) - m)
    return z


@jit
def _copy_all(logits, cand_val, cand_idx):
    for j in range(logits.shape[0]):
        cand_val[j] = logits[j]
        cand_idx[j] = j


@jit
def _sorted_prefix(vals, count, m, need):
    """In a descending list: the smallest prefix whose mass sum(exp(v - m)) reaches `need`, or 0 if
    the whole list falls short."""
    acc = 0.0
    for j in range(count):
        acc += math.exp(np.float64(vals[j]) - m)
        if acc >= need:
            return j + 1
    return 0


@jit
def _swap(vals, idx, w, with_w, p, q):
    v = vals[p]
    vals[p] = vals[q]
    vals[q] = v
    t = idx[p]
    idx[p] = idx[q]
    idx[q] = t
    if with_w:
        e = w[p]
        w[p] = w[q]
        w[q] = e


@jit
def _partition3(vals, idx, w, lo, hi):
    """Three-way partition of vals[lo:hi] around a median-of-3 pivot, moving idx (and w, when it is
    not empty) alongside: [lo, a) > pivot, [a, b) == pivot, [b, hi) < pivot. Returns (a, b)."""
    with_w = w.shape[0] > 0
    mid = (lo + hi) >> 1
    x, y, z = vals[lo], vals[mid], vals[hi - 1]
    if x > y:
        x, y = y, x
    if y > z:
        y = z
    pivot = max(x, y)
    a = lo
    i = lo
    b = hi
    while i < b:
        v = vals[i]
        if v > pivot:
            _swap(vals, idx, w, with_w, i, a)
            a += 1
            i += 1
        elif v < pivot:
            b -= 1
            _swap(vals, idx, w, with_w, i, b)
        else:
            i += 1
    return a, b


@jit
def _select_top(vals, idx, no_w, size, k):
    """Quickselect: reorder vals[:size] so that its k largest come first (in no order). `no_w` is
    an empty float64 array (nothing to move alongside)."""
    lo = 0
    hi = size
    while hi - lo > 1:
        a, b = _partition3(vals, idx, no_w, lo, hi)
        if k <= a:
            hi = a
        elif k <= b:
            return
        else:
            lo = b


@jit
def _weights(vals, size, m, w):
    """w[j] = exp(vals[j] - m) for j < size; returns their sum."""
    z = 0.0
    for j in range(size):
        e = math.exp(np.float64(vals[j]) - m)
        w[j] = e
        z += e
    return z


@jit
def _nucleus(vals, idx, w, size, need):
    """Weighted quickselect for top-p over vals[:size] with weights w (exp(v - m)): reorders them and
    returns c such that vals[:c] are the c largest and c is the smallest count whose weight reaches
    `need` (all of them if the whole set falls short, as llama.cpp then keeps everything)."""
    lo = 0
    hi = size
    while hi - lo > 1:
        a, b = _partition3(vals, idx, w, lo, hi)
        mass = 0.0
        for j in range(lo, a):
            mass += w[j]
        if mass >= need:
            # The nucleus ends inside the larger part: [lo, a) is the new range, [0, lo) stays kept.
            hi = a
            continue
        need -= mass
        for j in range(a, b):
            need -= w[j]
            if need <= 0.0:
                return j + 1
        lo = b
    return hi


@jit
def _finish(cand_val, cand_idx, cand_p, c, m, temp, u):
    """Temperature, softmax over the c candidates (into cand_p) and the draw at uniform `u`."""
    inv_t = 1.0 / temp
    total = 0.0
    for j in range(c):
        d = cand_val[j] - m
        # d == 0 apart: a subnormal temperature makes inv_t infinite, and 0 * inf is NaN.
        w = math.exp(d * inv_t) if d < 0.0 else 1.0
        cand_p[j] = w
        total += w
    inv = 1.0 / total
    for j in range(c):
        cand_p[j] *= inv
    target = u
    acc = 0.0
    for j in range(c):
        acc += cand_p[j]
        if target < acc:
            return cand_idx[j]
    # Rounding left `acc` just below u: the last candidate with any mass.
    for j in range(c - 1, -1, -1):
        if cand_p[j] > 0.0:
            return cand_idx[j]
    return cand_idx[0]


@jit
def _sample_kernel(logits, recent, start, penalty, top_k, top_p, min_p, temp, u, cand_idx, cand_val,
                   cand_p, scr_idx, scr_val, seen, pen_idx, pen_val, no_ids, no_w, heap_max, adaptive_k):
    """The whole chain on one logits vector. Returns (token, n_candidates, bad_recent_ids); the final
    candidates and their probabilities are left in cand_idx/cand_p[:n_candidates]. The penalty is
    applied to `logits` in place and undone before returning."""
    n = logits.shape[0]
    npen = 0
    bad = 0
    if penalty != 1.0:
        npen, bad = _penalize(logits, recent, start, penalty, seen, pen_idx, pen_val)

    if temp <= 0.0:
        tok = _argmax(logits)
        cand_val[0] = logits[tok]
        _restore(logits, npen, seen, pen_idx, pen_val)
        cand_idx[0] = tok
        cand_p[0] = 1.0
        return np.int64(tok), 1, bad

    k = top_k if 0 < top_k < n else n
    if k < n and k <= heap_max:
        # ---- the usual case: heap selection of k, then the chain over the sorted k as llama.cpp
        # runs it (softmax, cumulative cut for top-p, ratio to the first for min-p).
        _heap_topk_sorted(logits, no_ids, n, k, cand_val, cand_idx)
        _restore(logits, npen, seen, pen_idx, pen_val)
        m = np.float64(cand_val[0])
        c = k
        if top_p < 1.0:
            cut = _sorted_prefix(cand_val, k, m, top_p * _expsum(cand_val, k, m))
            if cut > 0:
                c = cut
        if min_p > 0.0:
            thr = m + math.log(min_p)
            j = 1
            while j < c and cand_val[j] >= thr:
                j += 1
            c = j
        return np.int64(_finish(cand_val, cand_idx, cand_p, c, m, temp, u)), c, bad

    # ---- large k or none: no full sort. min-p and top-p both keep a prefix of the descending
    # order, so min-p filters first (linear) and top-p then finds its prefix among the survivors,
    # with the mass normalised over the whole top-k set as llama.cpp's softmax is.
    if k < n:
        _copy_all(logits, cand_val, cand_idx)
        _select_top(cand_val, cand_idx, no_w, n, k)
        size = k
        m = np.float64(cand_val[0])
        for j in range(k):
            m = max(m, np.float64(cand_val[j]))
        in_cand = True
    else:
        size = n
        m = np.float64(logits[_argmax(logits)])
        in_cand = False
    if min_p > 0.0:
        z = 0.0
        if top_p < 1.0:
            z = _expsum(cand_val, size, m) if in_cand else _expsum(logits, n, m)
        thr = m + math.log(min_p)
        if in_cand:
            size = _compact_above(cand_val, cand_idx, size, thr, cand_val, cand_idx)
        else:
            size = _compact_above(logits, no_ids, n, thr, cand_val, cand_idx)
            in_cand = True
        if top_p < 1.0:
            _weights(cand_val, size, m, cand_p)
    elif top_p < 1.0:
        if not in_cand:
            _copy_all(logits, cand_val, cand_idx)
            in_cand = True
        z = _weights(cand_val, size, m, cand_p)  # the survivors are the whole top-k set
    elif not in_cand:
        _copy_all(logits, cand_val, cand_idx)  # nothing filters: the whole vocabulary
    _restore(logits, npen, seen, pen_idx, pen_val)
    if top_p < 1.0:
        need = top_p * z
        c = 0
        if size > 4 * adaptive_k:
            # As llama.cpp does: look for the nucleus among the best adaptive_k first (real models'
            # nuclei are small) and fall back to the weighted quickselect only when it is wider.
            _heap_topk_sorted(cand_val, cand_idx, size, adaptive_k, scr_val, scr_idx)
            c = _sorted_prefix(scr_val, adaptive_k, m, need)
            if c > 0:
                for j in range(c):
                    cand_val[j] = scr_val[j]
                    cand_idx[j] = scr_idx[j]
                size = c
        if c == 0:
            size = _nucleus(cand_val, cand_idx, cand_p, size, need)
    return np.int64(_finish(cand_val, cand_idx, cand_p, size, m, temp, u)), size, bad


# ---------------------------------------------------------------------------------------------------
# Python side

def resolve_seed(seed, default) -> int:
    """The seed a sampler starts from: `seed`, else `default` (params.seed), else (None or < 0)
    fresh OS entropy. Shared by the CPU sampler and the device one."""
    if seed is None:
        seed = default
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise NumbaAprError(f"seed must be an integer, got {seed!r}")
    if seed is None or seed < 0:
        seed = int.from_bytes(os.urandom(8), "little")
    return int(seed)


class Sampler:
    """Draws one token id from a logits vector with the chain above.

    All buffers are allocated here, once; `sample` allocates nothing per call beyond Python scalars.
    """

    def __init__(self, n_vocab: int, params: SamplingParams):
        if isinstance(n_vocab, bool) or not isinstance(n_vocab, (int, np.integer)) or n_vocab < 1:
            raise NumbaAprError(f"n_vocab must be a positive integer, got {n_vocab!r}")
        if not isinstance(params, SamplingParams):
            raise NumbaAprError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        self.n_vocab = int(n_vocab)
        self.params = params
        n = self.n_vocab
        self._adaptive_k = min(ADAPTIVE_K, n)
        # Candidate buffers are vocabulary-sized: with top_k off every token can be a candidate.
        self._cand_idx = np.zeros(n, dtype=np.int32)
        self._cand_val = np.zeros(n, dtype=np.float32)
        self._cand_p = np.zeros(n, dtype=np.float64)
        self._seen = np.zeros(n, dtype=np.uint8)
        # Penalised tokens are distinct, so there are at most min(window, vocabulary) of them.
        window = n if params.repeat_last_n < 0 else min(params.repeat_last_n, n)
        self._pen_idx = np.zeros(max(window, 1), dtype=np.int32)
        self._pen_val = np.zeros(max(window, 1), dtype=np.float32)
        self._scr_idx = np.zeros(ADAPTIVE_K, dtype=np.int32)
        self._scr_val = np.zeros(ADAPTIVE_K, dtype=np.float32)
        self._empty = np.zeros(0, dtype=np.int32)
        self._no_w = np.zeros(0, dtype=np.float64)
        self._n_cand = 0
        self._rng = None
        self.reset()

    def reset(self, seed=None):
        """Re-seed the generator: with `seed`, else params.seed, else fresh OS entropy."""
        self._rng = np.random.Generator(np.random.PCG64(resolve_seed(seed, self.params.seed)))
        self._n_cand = 0

    def sample(self, logits: np.ndarray, recent: np.ndarray) -> int:
        """One token id. `logits` (float32[n_vocab], C-contiguous) is left as it was given: the
        penalty is applied in place and undone before returning. `recent` holds the previous token
        ids (prompt + generated), oldest first; only its last repeat_last_n are penalised."""
        p = self.params
        if not (isinstance(logits, np.ndarray) and logits.dtype == np.float32 and logits.ndim == 1
                and logits.shape[0] == self.n_vocab and logits.flags.c_contiguous):
            raise NumbaAprError(f"logits must be a contiguous float32 array of {self.n_vocab} values, got "
                                f"{getattr(logits, 'dtype', type(logits).__name__)} "
                                f"{getattr(logits, 'shape', '')}")
        if recent is None:
            recent = self._empty
        elif not (isinstance(recent, np.ndarray) and recent.dtype == np.int32 and recent.ndim == 1):
            # Another integer type or a list: only the window matters, so convert just that (and
            # check the range first, since the cast to int32 would wrap large ids silently).
            recent = np.asarray(recent).reshape(-1)
            if p.repeat_last_n > 0:
                recent = recent[-p.repeat_last_n:]
            if recent.size and (recent.min() < 0 or recent.max() >= self.n_vocab):
                raise NumbaAprError(f"recent tokens hold id(s) outside the vocabulary [0, {self.n_vocab})")
            recent = np.ascontiguousarray(recent, dtype=np.int32)
        nr = recent.shape[0]
        if p.repeat_last_n < 0:
            start = 0
        else:
            start = max(nr - p.repeat_last_n, 0) if p.repeat_last_n > 0 else nr
        u = self._rng.random()
        tok, n_cand, bad = _sample_kernel(
            logits, recent, start, float(np.float32(p.repeat_penalty)), int(p.top_k), float(p.top_p),
            float(p.min_p), float(p.temperature), u, self._cand_idx, self._cand_val, self._cand_p,
            self._scr_idx, self._scr_val, self._seen, self._pen_idx, self._pen_val, self._empty, self._no_w,
            HEAP_MAX, self._adaptive_k)
        if bad:
            raise NumbaAprError(f"recent tokens hold {bad} id(s) outside the vocabulary [0, {self.n_vocab})")
        self._n_cand = n_cand
        return int(tok)

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """The last call's final candidates (token ids) and their probabilities (float64), as views
        into the sampler's buffers (valid until the next call). Sorted descending on the top-k heap
        path only."""
        c = self._n_cand
        return self._cand_idx[:c], self._cand_p[:c]


def sample_ref(logits: np.ndarray, recent, params: SamplingParams) -> np.ndarray:
    """Plain NumPy reference: the final probability distribution (float64[n_vocab]) the chain draws
    from. Full sort, no tricks: this is the specification the kernels are tested against."""
    params.validate()
    lg = np.array(logits, dtype=np.float32)  # penalties in float32, like the kernel and llama.cpp
    n = lg.shape[0]
    recent = np.asarray(recent if recent is not None else [], dtype=np.int64).reshape(-1)
    if params.repeat_penalty != 1.0 and params.repeat_last_n != 0:
        window = recent if params.repeat_last_n < 0 else recent[max(len(recent) - params.repeat_last_n, 0):]
        pen = np.float32(params.repeat_penalty)
        for t in np.unique(window):
            lg[t] = lg[t] * pen if lg[t] <= 0 else lg[t] / pen
    out = np.zeros(n, dtype=np.float64)
    if params.temperature <= 0:
        out[int(np.argmax(lg))] = 1.0
        return out
    x = lg.astype(np.float64)
    order = np.argsort(-x, kind="stable")
    if 0 < params.top_k < n:
        order = order[:params.top_k]
    v = x[order]
    if params.top_p < 1.0:
        prob = np.exp(v - v[0])
        prob /= prob.sum()
        cum = np.cumsum(prob)
        hit = np.nonzero(cum >= params.top_p)[0]
        keep = int(hit[0]) + 1 if len(hit) else len(v)
        order, v = order[:keep], v[:keep]
    if params.min_p > 0.0:
        keep = max(int(np.count_nonzero(v >= v[0] + math.log(params.min_p))), 1)
        order, v = order[:keep], v[:keep]
    w = np.exp((v - v[0]) / params.temperature)
    out[order] = w / w.sum()
    return out
