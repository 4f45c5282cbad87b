"""Grouped-query causal attention over the KV cache (CPU), with an optional sliding window.

One kernel serves the prompt (T query tokens at once) and decoding (T = 1): every (token, head)
pair is independent, so `prange` runs over all of them. Softmax is computed online (running
max and sum, rescaling the accumulated output when the max grows), so no scores buffer of
context length is needed per pair and nothing is allocated.
"""
import numpy as np

from ..._numba import pjit, prange


@pjit
def attention(out, q, k_cache, v_cache, pos0, n_head, n_head_kv, head_dim, head_dim_v, scale, window):
    """out[t, h*dv:(h+1)*dv] = softmax(scale * q_t,h . K^T) V over the visible cache positions.

    q: [T, n_head*head_dim]; k_cache: [n_ctx, n_head_kv*head_dim]; v_cache: [n_ctx, n_head_kv*dv].
    Query t sits at position pos0 + t and sees positions <= its own; with window > 0 only the
    last `window` of them (itself included), as llama.cpp's standard sliding window.
    The cache must already hold positions up to pos0 + T - 1.
    """
    T = q.shape[0]
    group = n_head // n_head_kv
    for th in prange(T * n_head):
        t, h = th // n_head, th % n_head
        kvh = h // group
        p = pos0 + t
        start = 0 if window <= 0 else max(0, p - window + 1)
        qo, ko, vo = h * head_dim, kvh * head_dim, kvh * head_dim_v
        oo = h * head_dim_v
        for d in range(head_dim_v):
            out[t, oo + d] = 0.0
        m = -np.inf
        denom = np.float32(0.0)
        for j in range(start, p + 1):
            s = np.float32(0.0)
            for d in range(head_dim):
                s += q[t, qo + d] * k_cache[j, ko + d]
            s *= np.float32(scale)
            if s > m:
                # New maximum: rescale what was accumulated so far.
                corr = np.float32(np.exp(m - s))
                denom *= corr
                for d in range(head_dim_v):
                    out[t, oo + d] *= corr
                m = s
            w = np.float32(np.exp(s - m))
            denom += w
            for d in range(head_dim_v):
                out[t, oo + d] += w * v_cache[j, vo + d]
        inv = np.float32(1.0) / denom
        for d in range(head_dim_v):
            out[t, oo + d] *= inv


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
