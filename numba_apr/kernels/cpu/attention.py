"""Grouped-query causal attention over the KV cache (CPU), with an optional sliding window.

One kernel serves the prompt (T query tokens at once), decoding (T = 1) and batches of several
sequences (each token at its own KV slot and position, `attention_batch`): every (token, head)
pair is independent, so the pairs are split over the threads (`attend` is one pair, shared with
the one-call decode step). Each pair takes three plain
passes that LLVM vectorises: the scores q.k of every visible position, their softmax, and the
weighted sum of the V rows. The scores go to the calling thread's row of `scores` ([threads,
n_ctx], allocated once by the caller), so nothing is allocated.
"""
import numba
import numpy as np

from ..._numba import jit, pjit, prange


def scores_buffer(n_ctx: int, n_threads: int) -> np.ndarray:
    """The scratch `attention` needs: one row of n_ctx scores per thread."""
    return np.zeros((n_threads, n_ctx), np.float32)


@jit
def attend(out, q, k_cache, v_cache, t, h, pos0, n_head, n_head_kv, head_dim, head_dim_v, scale, window, sc):
    """One (query token t, head h) pair: out[t, h*dv:(h+1)*dv], with sc[:n_ctx] as scratch."""
    kvh = h // (n_head // n_head_kv)
    p = pos0 + t
    start = 0 if window <= 0 else max(0, p - window + 1)
    n = p + 1 - start
    qo, ko, vo, oo = h * head_dim, kvh * head_dim, kvh * head_dim_v, h * head_dim_v
    # (Row slices, indexed from 0: Numba then knows the indices are not negative and
    # emits no wraparound code, so the loops vectorise.)
    qv = q[t, qo:qo + head_dim]
    m = -np.inf
    for j in range(n):
        kv = k_cache[start + j, ko:ko + head_dim]
        s = np.float32(0.0)
        for d in range(head_dim):
            s += qv[d] * kv[d]
        s *= np.float32(scale)
        sc[j] = s
        m = max(m, s)
    denom = np.float32(0.0)
    for j in range(n):
        e = np.float32(np.exp(sc[j] - m))
        sc[j] = e
        denom += e
    o = out[t, oo:oo + head_dim_v]
    o[:] = 0.0
    for j in range(n):
        w = sc[j]
        v = v_cache[start + j, vo:vo + head_dim_v]
        for d in range(head_dim_v):
            o[d] += w * v[d]
    inv = np.float32(1.0) / denom
    for d in range(head_dim_v):
        o[d] *= inv


@pjit
def _attention(out, q, k_cache, v_cache, layer, slots, positions, n_head, n_head_kv, head_dim, head_dim_v,
               scale, window, scores, n_threads):
    """Token t attends over its own sequence: slot slots[t] of the caches, positions up to
    positions[t]. Caches: [slot, layer, position, kv_head * dim]."""
    n_pairs = q.shape[0] * n_head
    n_chunks = max(1, min(n_pairs, n_threads))
    for c in prange(n_chunks):
        for th in range(c * n_pairs // n_chunks, (c + 1) * n_pairs // n_chunks):
            t = th // n_head
            sl = slots[t]
            attend(out, q, k_cache[sl, layer], v_cache[sl, layer], t, th % n_head, positions[t] - t, n_head,
                   n_head_kv, head_dim, head_dim_v, scale, window, scores[c])


@jit
def store_kv(k_cache, v_cache, layer, k, v, slots, positions):
    """The K and V rows of a batch into their sequences' caches (at slot, layer, position)."""
    for t in range(k.shape[0]):
        k_cache[slots[t], layer, positions[t]] = k[t]
        v_cache[slots[t], layer, positions[t]] = v[t]


def attention_batch(out, q, k_cache, v_cache, layer, slots, positions, n_head, n_head_kv, head_dim, head_dim_v,
                    scale, window, scores):
    """`attention` for a batch of tokens from several sequences: token t is at position
    positions[t] of the sequence in cache slot slots[t] ([slot, layer, position, width] caches,
    already holding every position a token sees)."""
    _attention(out, q, k_cache, v_cache, layer, slots, positions, n_head, n_head_kv, head_dim, head_dim_v, scale,
               window, scores, numba.get_num_threads())


def attention(out, q, k_cache, v_cache, pos0, n_head, n_head_kv, head_dim, head_dim_v, scale, window,
              scores=None):
    """out[t, h*dv:(h+1)*dv] = softmax(scale * q_t,h . K^T) V over the visible cache positions.

    q: [T, n_head*head_dim]; k_cache: [n_ctx, n_head_kv*head_dim]; v_cache: [n_ctx, n_head_kv*dv].
    Query t sits at position pos0 + t and sees positions <= its own; with window > 0 only the
    last `window` of them (itself included), as llama.cpp's standard sliding window.
    The cache must already hold positions up to pos0 + T - 1. `scores` is the scratch of
    `scores_buffer` (allocated here when not given).
    """
    n_threads = numba.get_num_threads()
    if scores is None or scores.shape[0] < n_threads or scores.shape[1] < k_cache.shape[0]:
        scores = scores_buffer(k_cache.shape[0], n_threads)
    T = q.shape[0]
    attention_batch(out, q, k_cache[None, None], v_cache[None, None], 0, np.zeros(T, np.int64),
                    np.arange(pos0, pos0 + T, dtype=np.int64), n_head, n_head_kv, head_dim, head_dim_v, scale,
                    window, scores)


def attention_ref(q, k_cache, v_cache, pos0, n_head, n_head_kv, head_dim, head_dim_v, scale, window):
    T = q.shape[0]
    group = n_head // n_head_kv
    out = np.zeros((T, n_head * head_dim_v))
    for t in range(T):
        p = pos0 + t
        start = 0 if window <= 0 else max(0, p - window + 1)
        for h in range(n_head):
            kvh = h // group
            qv = q[t, h * head_dim:(h + 1) * head_dim].astype(np.float64)
            K = k_cache[start:p + 1, kvh * head_dim:(kvh + 1) * head_dim].astype(np.float64)
            V = v_cache[start:p + 1, kvh * head_dim_v:(kvh + 1) * head_dim_v].astype(np.float64)
            s = K @ qv * scale
            w = np.exp(s - s.max())
            out[t, h * head_dim_v:(h + 1) * head_dim_v] = w @ V / w.sum()
    return out
