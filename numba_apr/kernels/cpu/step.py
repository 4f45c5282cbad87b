"""One decode step (one token through every layer and the output head) as one compiled call.

`model.forward` runs a step as ~15-20 kernels per layer, each called from Python and each
parallel one a fork and join of the thread pool: on the small models that fixed cost, not the
weight bytes, set the decode speed. Here the same sequence runs inside one parallel region:
each of the n threads takes its share of every product (contiguous groups of 16 rows, as
`qmatmul` splits them) and of the attention heads, thread 0 does the short row work between
them (norms, RoPE, residual adds, quantizing the activations), and the threads meet at a
spinning barrier (sync.py) wherever a stage reads what another thread wrote.

The arithmetic is `forward`'s, through the same row kernels (ops.rmsnorm_row, rope_row,
gated_span, attention.attend, matmul.quantize_blocks, qmatmul's group kernel), so the logits are
the ones `forward` gives for T = 1. It serves models whose every matrix is repacked in one
blob (model/packing.py) with one activation scheme per fused product; `DecodeStep.build` returns
None otherwise and the caller keeps `forward`.

The weights reach the compiled code as the blob and a table of int64 per matrix (offset,
groups, bytes per group, type, activation scheme); norm weights and biases as one float32 table.
"""
from __future__ import annotations

import numba
import numpy as np

from ..._numba import jit, pjit, prange
from ...model.quants import decode_row
from .attention import attend
from .matmul import ACT_Q8_K, quantize_blocks
from .ops import add_bias, gated_span, rmsnorm_row, rope_row, round_f16, scale
from .qmatmul import GROUP, PackedMatrix, _all_tokens
from .sync import barrier, concurrent_iterations

# Matrix slots of a layer in the table (the output head is slot 0 of row n_layer).
WQ, WK, WV, WO, W_GATE, W_UP, W_DOWN = range(7)
_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# Vector slots (norm weights and biases; output_norm is slot 0 of row n_layer).
ATTN_NORM, FFN_NORM, BQ, BK, BV, Q_NORM, K_NORM, POST_ATTN, POST_FFN = range(9)
_VECTORS = ("attn_norm", "ffn_norm", "bq", "bk", "bv", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")
# Columns of the matrix table.
OFF, GROUPS, UNIT, QTYPE, SCHEME = range(5)


@jit(inline="always")
def _group_bytes(blob, m, g):
    """The repacked bytes of group g of matrix m (a row of the table)."""
    o = m[OFF] + g * m[UNIT]
    return blob[o:o + m[UNIT]]


@jit
def _share(c, n, blob, out0, m0, out1, m1, out2, m2, xq, xd, xs, xm):
    """Thread c's contiguous share of the groups of up to three products of one activation row
    (an unused one has zero groups)."""
    G0, G1 = m0[GROUPS], m1[GROUPS]
    G = G0 + G1 + m2[GROUPS]
    for g in range(c * G // n, (c + 1) * G // n):
        if g < G0:
            _all_tokens(out0, GROUP * g, _group_bytes(blob, m0, g), m0[QTYPE], xq, xd, xs, xm)
        elif g < G0 + G1:
            _all_tokens(out1, GROUP * (g - G0), _group_bytes(blob, m1, g - G0), m1[QTYPE], xq, xd, xs, xm)
        else:
            _all_tokens(out2, GROUP * (g - G0 - G1), _group_bytes(blob, m2, g - G0 - G1), m2[QTYPE], xq, xd, xs, xm)


@jit(inline="always")
def _views(act, K):
    """The quantized-activation buffers as [1, K] rows (C-contiguous views of the flat ones)."""
    xq, xd, xs, xm = act
    return (xq[:K].reshape(1, K), xd[:K // 32].reshape(1, K // 32), xs[:K // 16].reshape(1, K // 16),
            xm[:K // 32].reshape(1, K // 32))


@jit(inline="always")
def _quantize(act, x, scheme, b0, b1):
    """Blocks b0..b1-1 of the row x into the activation buffers."""
    xq, xd, xs, xm = act
    quantize_blocks(xq, xd, xs, xm, x, scheme, b0, b1)


@jit(inline="always")
def _residual(x, proj, post_norm, has_post, eps):
    """x += proj, normed first by the block's post-norm where the architecture has one (gemma3)."""
    if has_post:
        rmsnorm_row(proj, proj, post_norm, eps)
    for i in range(x.shape[0]):
        x[i] += proj[i]


@jit(inline="always")
def _n_blocks(K, scheme):
    return K // (256 if scheme == ACT_Q8_K else 32)


@jit
def _step_thread(c, n, counter, token, pos, embd, embd_qtype, blob, mats, vecs, rope_base, window,
                 dims, eps, attn_scale, embd_scale, x, xb, q, att, proj, gate, up, k_cache, v_cache,
                 scores, act, logits):
    """Thread c of n: its part of `forward` for one token at position pos."""
    n_embd, n_head, n_head_kv, hd, hdv, rope_dim, n_ff, n_layer, neox, gelu, has_bias, has_qk_norm, has_post = dims
    nq, nkv, nv, na = n_head * hd, n_head_kv * hd, n_head_kv * hdv, n_head * hdv
    zero = mats[n_layer, 1]  # a row of zeros: no matrix
    k = 1
    if c == 0:
        decode_row(embd[token], embd_qtype, x[0])
        if embd_scale != 1.0:
            scale(x, embd_scale)
    for l in range(n_layer):
        M, V = mats[l], vecs[l]
        kc, vc = k_cache[l, pos:pos + 1], v_cache[l, pos:pos + 1]
        # Attention block.
        if c == 0:
            rmsnorm_row(xb[0], x[0], V[ATTN_NORM, :n_embd], eps)
            _quantize(act, xb[0], M[WQ, SCHEME], 0, _n_blocks(n_embd, M[WQ, SCHEME]))
        k = barrier(counter, n, k)
        xq, xd, xs, xm = _views(act, n_embd)
        _share(c, n, blob, q, M[WQ], kc, M[WK], vc, M[WV], xq, xd, xs, xm)
        k = barrier(counter, n, k)
        if c == 0:
            if has_bias:
                add_bias(q, V[BQ, :nq])
                add_bias(kc, V[BK, :nkv])
                add_bias(vc, V[BV, :nv])
            if has_qk_norm:
                for h in range(n_head):
                    rmsnorm_row(q[0, h * hd:(h + 1) * hd], q[0, h * hd:(h + 1) * hd], V[Q_NORM, :hd], eps)
                for h in range(n_head_kv):
                    rmsnorm_row(kc[0, h * hd:(h + 1) * hd], kc[0, h * hd:(h + 1) * hd], V[K_NORM, :hd], eps)
            rope_row(q[0], pos, n_head, hd, rope_dim, rope_base[l], neox)
            rope_row(kc[0], pos, n_head_kv, hd, rope_dim, rope_base[l], neox)
            round_f16(kc)
            round_f16(vc)
        k = barrier(counter, n, k)
        for h in range(c * n_head // n, (c + 1) * n_head // n):
            attend(att, q, k_cache[l], v_cache[l], 0, h, pos, n_head, n_head_kv, hd, hdv, attn_scale,
                   window[l], scores[c])
        k = barrier(counter, n, k)
        if c == 0:
            _quantize(act, att[0], M[WO, SCHEME], 0, _n_blocks(na, M[WO, SCHEME]))
        k = barrier(counter, n, k)
        xq, xd, xs, xm = _views(act, na)
        _share(c, n, blob, proj, M[WO], proj, zero, proj, zero, xq, xd, xs, xm)
        k = barrier(counter, n, k)
        # Feed-forward block.
        if c == 0:
            _residual(x[0], proj[0], V[POST_ATTN, :n_embd], has_post, eps)
            rmsnorm_row(xb[0], x[0], V[FFN_NORM, :n_embd], eps)
            _quantize(act, xb[0], M[W_GATE, SCHEME], 0, _n_blocks(n_embd, M[W_GATE, SCHEME]))
        k = barrier(counter, n, k)
        xq, xd, xs, xm = _views(act, n_embd)
        _share(c, n, blob, gate, M[W_GATE], up, M[W_UP], up, zero, xq, xd, xs, xm)
        k = barrier(counter, n, k)
        # act(gate) * up and its quantization, block by block over the threads.
        sd = M[W_DOWN, SCHEME]
        bs = 256 if sd == ACT_Q8_K else 32
        nb = n_ff // bs
        b0, b1 = c * nb // n, (c + 1) * nb // n
        gated_span(gate[0, b0 * bs:b1 * bs], up[0, b0 * bs:b1 * bs], gelu)
        _quantize(act, gate[0], sd, b0, b1)
        k = barrier(counter, n, k)
        xq, xd, xs, xm = _views(act, n_ff)
        _share(c, n, blob, proj, M[W_DOWN], proj, zero, proj, zero, xq, xd, xs, xm)
        k = barrier(counter, n, k)
        if c == 0:
            _residual(x[0], proj[0], V[POST_FFN, :n_embd], has_post, eps)
    # Output head.
    head = mats[n_layer, 0]
    if c == 0:
        rmsnorm_row(xb[0], x[0], vecs[n_layer, 0, :n_embd], eps)
        _quantize(act, xb[0], head[SCHEME], 0, _n_blocks(n_embd, head[SCHEME]))
    k = barrier(counter, n, k)
    xq, xd, xs, xm = _views(act, n_embd)
    _share(c, n, blob, logits, head, logits, zero, logits, zero, xq, xd, xs, xm)


@pjit
def _step(n, counter, token, pos, embd, embd_qtype, blob, mats, vecs, rope_base, window, dims, eps,
          attn_scale, embd_scale, x, xb, q, att, proj, gate, up, k_cache, v_cache, scores, act, logits):
    counter[0] = 0
    for c in prange(n):
        _step_thread(c, n, counter, token, pos, embd, embd_qtype, blob, mats, vecs, rope_base, window, dims,
                     eps, attn_scale, embd_scale, x, xb, q, att, proj, gate, up, k_cache, v_cache, scores,
                     act, logits)


class DecodeStep:
    """`forward` for one token, as one compiled call over tables made once at load."""

    def __init__(self, c, w, s, blob: np.ndarray, n_threads: int):
        self.n = n_threads
        self.counter = np.zeros(1, np.int64)
        table = np.zeros((c.n_layer + 1, 7, 5), np.int64)
        for l, L in enumerate(w.layers):
            for slot, name in enumerate(_MATRICES):
                table[l, slot] = self._entry(getattr(L, name), blob)
        table[c.n_layer, 0] = self._entry(w.output, blob)
        width = max(c.n_embd, c.n_head * c.head_dim, c.n_head_kv * max(c.head_dim, c.head_dim_v))
        vecs = np.zeros((c.n_layer + 1, 9, width), np.float32)
        for l, L in enumerate(w.layers):
            for slot, name in enumerate(_VECTORS):
                v = getattr(L, name)
                if v is not None:
                    vecs[l, slot, :len(v)] = v
        vecs[c.n_layer, 0, :c.n_embd] = w.output_norm
        L0 = w.layers[0]
        dims = (c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.head_dim_v, c.rope_dim, c.n_ff, c.n_layer,
                c.rope_neox, c.act == "gelu", L0.bq is not None, L0.q_norm is not None, L0.post_attn_norm is not None)
        qa = s.qact
        act = tuple(a.reshape(-1) for a in (qa.xq, qa.xd, qa.xs, qa.xm))
        blob_view = blob.view(np.ndarray)
        self.args = [w.token_embd.raw, int(w.token_embd.qtype), blob_view, table, vecs,
                     np.array([p.rope_base for p in c.layers], np.float64),
                     np.array([p.window for p in c.layers], np.int64), dims, float(c.norm_eps),
                     float(c.attn_scale), float(c.embd_scale), s.x[:1], s.xb[:1], s.q[:1], s.att[:1], s.proj[:1],
                     s.gate[:1], s.up[:1]]
        self.caches = (s.k_cache, s.v_cache)  # [sequence, layer, position, width]
        self.tail = [s.scores, act, s.logits[:1]]

    @staticmethod
    def _entry(m: PackedMatrix, blob: np.ndarray):
        off = m.data.ctypes.data - blob.ctypes.data
        assert 0 <= off and off + m.data.nbytes <= blob.nbytes and m.data.flags.c_contiguous
        return (off, m.data.shape[0], m.data.shape[1], m.qtype, m.scheme)

    @classmethod
    def build(cls, c, w, s, blob, n_threads: int) -> "DecodeStep | None":
        """A DecodeStep when this model and thread count can take one, else None."""
        mats = [getattr(L, name) for L in w.layers for name in _MATRICES] + [w.output]
        if blob is None or not all(isinstance(m, PackedMatrix) for m in mats):
            return None
        for L in w.layers:
            if len({L.wq.scheme, L.wk.scheme, L.wv.scheme}) != 1 or L.w_gate.scheme != L.w_up.scheme:
                return None
        if n_threads > s.scores.shape[0] or not concurrent_iterations(n_threads):
            return None
        return cls(c, w, s, blob, n_threads)

    def __call__(self, token: int, pos: int, slot: int = 0) -> np.ndarray | None:
        """Logits [1, n_vocab] after `token` at position `pos` of the sequence in KV slot `slot`
        (whose cache gets its K and V); None, having done nothing, when the calling thread's
        thread count is not the one checked at build (then `forward` serves)."""
        if numba.get_num_threads() != self.n:
            return None
        k, v = self.caches
        _step(self.n, self.counter, token, pos, *self.args, k[slot], v[slot], *self.tail)
        return self.tail[-1]
