"""Quantized matrix products on the GPU (numba.cuda): out[t, r] = x[t] . W[r] for every GGUF type.

The entry points: `qmatmul` (any T; it picks the kernel), and for decode steps `qmatmul_quant`,
`qmatmul_gated` and `qmatmul_rope` (products whose epilogue also makes the next kernel's input);
`upload` / `concat` / `DeviceMatrix` for the weights; `qmatmul_ref` / `quantize_act_ref`, the
float64 oracle. The kernels live by what they serve:

- qmatrix.py: the device layout of a GGUF matrix (`DeviceMatrix`, `upload`) and the per-type
  unit loaders (`UNITS`) and dots that every kernel reads weights through;
- qmatmul_decode.py: decoding one token (T = 1): `_plan` per shape and the kernel with its
  epilogues (store, quantize the next input, gated activation, RoPE and the KV-cache write);
  with plain stores, also T = 2 (up to FEW_MIN_T - 1 tokens), each weight unit loaded once for
  all of them;
- qmatmul_head.py: decoding an output head (a vocabulary of rows, HEAD_ROWS or more);
- qmatmul_mma.py: prompts (T >= MMA_MIN_T) on the int8 tensor cores, and a few tokens
  (FEW_MIN_T <= T < MMA_MIN_T: a batched decode step) on them too, a row tile a warp;
- here: F32 / F16 / BF16 matrices
  (`_float_kernel`, on the float activations: llama.cpp does not quantize activations for them
  either), the kernel cache and the launches.

Launch: one warp per output row, 4 warps a block, lanes strided over the row's units; the 32
partial sums meet in a butterfly (`ptx.warp_sum`). Decoding, a plan per shape (`_plan`) may
split a long row over 2-4 warps or give a warp two short rows, and its first trip's weights
are loaded before the kernel ahead has finished; an output head has a kernel of its own, four
rows a warp (`_make_head_kernel`). Epilogue: + bias, and either store or add into the output
(the residual stream), selected by an argument; decoding, also the next product's q8 input
(`qmatmul_quant`, `qmatmul_gated`), or RoPE and the KV-cache write (`qmatmul_rope`): see
`_make_decode_kernel`. Decoding a small model, a product may instead take rmsnorm(x) * w
unquantized and quantize it into shared memory itself (`ActBuffers.normed`, QIN_MAX_K).

The names of the modules above that callers use are re-exported here. The tuning values that
this module's launches read (`_plan`, GROUP_BLOCKS, HEAD_ROWS) are read from this module, so a
test that sets them here changes the kernel choice.

`qmatmul_ref` is the float64 NumPy oracle: gguf's dequantized weights times the same quantized
activations, so a test compares only summation order.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import cuda

from ..._numba import cuda_jit
from . import ptx
from .launch import launch
# The kernels' modules; their names that callers use are re-exported from here.
from .qmatmul_decode import (EPI_GATED, EPI_QUANT, EPI_ROPE, EPI_STORE, GATED_GROUP,  # noqa: F401
                             GROUP_BLOCKS, LONG_ROW_UNITS, MAX_NT, NT_UNROLL, PREFETCH_BYTES, QIN_MAX_K, QIN_QKV_MAX_K,
                             SPLIT_ROWS, STAGE_MAX_K, STAGE_MIN_K, _env_int, _make_decode_kernel,
                             _out_group, _plan)
from .qmatmul_head import HALF_MAX_UNITS, HEAD_ROWS, HEAD_RW, _head_plan, _make_head_kernel  # noqa: F401
from .qmatmul_mma import (FEW_MIN_T, MMA_K, MMA_MIN_T, MMA_NTILE, _few_plan, _make_few_kernel,  # noqa: F401
                          _make_mma_kernel, mma_tiles)
from .qmatrix import (FLOAT_TYPES, SUPPORTED, UNITS, WARPS, DeviceMatrix, _store, _unit_dot,  # noqa: F401
                      concat, upload)

@cuda_jit
def _float_kernel(out, col, w, kind, K, rows, x, T, bias, accumulate):
    """F32 (kind 0) / F16 (1) / BF16 (2) rows times float32 activations, one warp per row."""
    lane = cuda.threadIdx.x & 31
    r = cuda.blockIdx.x * WARPS + (cuda.threadIdx.x >> 5)
    rr = min(r, rows - 1)
    for t in range(T):
        acc = np.float32(0.0)
        for k in range(lane, K, 32):
            if kind == 0:
                v = ptx.f32_bits(w[rr * K + k])
            else:
                word = w[(rr * K + k) >> 1] >> (16 * (k & 1))
                v = ptx.f16_bits(word & 0xFFFF) if kind == 1 else ptx.f32_bits((word & 0xFFFF) << 16)
            acc += v * x[t, k]
        acc = ptx.warp_sum(acc)
        if lane == 0 and r < rows:
            _store(out, bias, col + r, t, acc, accumulate)


_KERNELS: dict = {}


def _kernel(qtype: int, NT: int = 1, tc: bool = False, epi=None, plan=None, qtype2=None, qin=False, local=False,
            x16=False, few=None):
    """The product for a type: on the tensor cores (tc: a prompt's; few: a few tokens', with
    _few_plan's (KS, TR) and whether gated), or the decode kernel for NT tokens with
    epilogue `epi` and `plan` (see _plan) (and a second matrix's type; qin: it quantizes its
    input itself; x16: its input has a scale per 16), or with epi "head" the output head's,
    plan (UNROLL, LW)."""
    key = (qtype, NT, tc, epi, plan, qtype2, qin, local, x16, few)
    k = _KERNELS.get(key)
    if k is None:
        unit = UNITS[qtype]
        k = _KERNELS[key] = (
            _make_mma_kernel(unit, qtype != Q.Q6_K, *mma_tiles()) if tc
            else _make_few_kernel(unit, qtype != Q.Q6_K, *few) if few
            else _make_head_kernel(unit, *plan) if epi == "head"
            else _make_decode_kernel(unit, epi, *plan, None if qtype2 is None else UNITS[qtype2], qin, local, x16,
                                     NT))
    return k


def qmatmul(out, m: DeviceMatrix, act, T: int, stream, bias=None, accumulate=False, col=0):
    """out[t, col:col + m.rows] (+)= x[t] . W.T (+ bias[col:col + m.rows]) for t < T. `act` is the
    ActBuffers the input was quantized into (ops.quantize_act, or a decode epilogue): its q8 view
    for quantized W, its float view for float W. Launch only: no allocation, no synchronisation
    (graph-capturable). (`col` rather than a column slice of out: see ActBuffers.cols on what
    slicing costs.)"""
    bias = act.empty if bias is None else bias
    assert act.nw is None or (T == 1 and m.qtype not in FLOAT_TYPES and m.rows < HEAD_ROWS), \
        "only decode products of quantized matrices quantize their input themselves"
    assert not act.x16 or (T == 1 and m.rows < HEAD_ROWS), "only decode products read scales per 16"
    grid_x = (m.rows + WARPS - 1) // WARPS
    if m.qtype in FLOAT_TYPES:
        launch(_float_kernel, grid_x, 32 * WARPS, stream, out, col, m.w, FLOAT_TYPES[m.qtype], m.K, m.rows,
                                                  act.xf, T, bias, accumulate)
        return
    n_units = m.K // 32
    if T == 1 and m.rows >= HEAD_ROWS:
        per_block = WARPS * HEAD_RW
        launch(_kernel(m.qtype, epi="head", plan=_head_plan(n_units)), -(-m.rows // per_block),
               32 * WARPS, stream, out, col, m.w, m.o_qh, m.o_sc, m.s_qs, m.s_qh, m.s_sc, m.rows, n_units,
               act.xq, act.xd, act.xs, act.ss, np.float32(act.eps), bias, accumulate)
        return
    if T >= MMA_MIN_T:
        WR, WT = mma_tiles()
        grid = (-(-T // (8 * MMA_NTILE * WT)), -(-m.rows // (16 * WR)))
        launch(_kernel(m.qtype, tc=True), grid, 32 * WR * WT, stream,
            out, col, m.w, m.o_qh, m.o_sc, m.s_qs, m.s_qh, m.s_sc, m.rows, n_units,
            act.xq, act.xd, act.xs, T, bias, accumulate)
        return
    assert T == 1 or act.ss.shape[0] == 0, "a norm still to apply is one token's"
    if T >= FEW_MIN_T:
        _few(out, m, act, T, stream, bias, accumulate, col, _few_plan(n_units, m.rows))
        return
    # One token, or two (a batched decode step, a short prompt): the decode kernel, each weight
    # unit loaded once for up to MAX_NT tokens
    _decode(EPI_STORE, out, m, act, stream, bias, accumulate, col, m.rows, 0, 0, act.empty, act, T=T)


def qmatmul_quant(out, m: DeviceMatrix, act, stream, dst, norm_w=None, ss=None, eps=0.0, accumulate=True):
    """Decoding: out[0] (+)= x . W.T, and the next product's input quantized from the new out[0]
    into dst (ActBuffers): q8 of out * norm_w, with ss [m.rows / 32] the sums of squares that
    make the norm's 1 / rms (see ActBuffers.pending). Returns the ActBuffers view to pass on.
    The kernel reads out before it waits for the kernel launched ahead of it (programmatic
    dependent launch, launch.py): that one must not write out (in a decode step the kernel
    that last wrote the residual stream is two or more launches back)."""
    d = dst.cols(m.rows)
    _decode(EPI_QUANT, out, m, act, stream, act.empty, accumulate, 0, m.rows, 0, 0,
            act.empty if norm_w is None else norm_w, d, act.empty if ss is None else ss)
    return d if ss is None else d.pending(ss, eps)


def _few(out, m: DeviceMatrix, act, T, stream, bias, accumulate, col, plan, dst=None, mode=0):
    """The few-token tensor-core kernel with _few_plan's plan (KS, TR); with dst, the gated one
    (plan (1, 2)) into dst's float and q8 views."""
    KS, TR = plan
    rows = m.rows // 2 if dst is not None else m.rows
    q = act if dst is None else dst
    launch(_kernel(m.qtype, few=(KS, TR, dst is not None)), (-(-rows // (16 * TR)), -(-T // 8)), 32 * KS * TR,
           stream, out, col, m.w, m.o_qh, m.o_sc, m.s_qs, m.s_qh, m.s_sc, m.rows, m.K // 32,
           act.xq, act.xd, act.xs, T, bias, accumulate, m.rows // 2, mode, q.xq8, q.xd, q.xs)


def gated_takes(m: DeviceMatrix, T: int) -> bool:
    """Whether qmatmul_gated takes T tokens through [gate; up] matrix m: one (the decode kernel),
    or FEW_MIN_T <= T < MMA_MIN_T of a quantized m (the few-token kernel, which reads weights
    through qmatrix.py's units; its blocks are q8 blocks of 32 rows)."""
    return T == 1 or (FEW_MIN_T <= T < MMA_MIN_T and m.qtype not in FLOAT_TYPES and m.rows % 64 == 0)


def qmatmul_gated(m: DeviceMatrix, act, stream, dst, mode, T=1):
    """m = [gate; up] rows: act(x . gate) * (x . up) into dst (float, and q8 with a scale per
    GATED_GROUP values decoding one token, per 32 for several: see gated_takes); returns its
    view."""
    half = m.rows // 2
    if T > 1:
        assert gated_takes(m, T) and act.nw is None
        d = dst.cols(half)
        _few(d.xf, m, act, T, stream, act.empty, False, 0, (1, 2), d, mode)
        return d
    d = dst.cols(half, x16=GATED_GROUP == 16)
    _decode(EPI_GATED, d.xf, m, act, stream, act.empty, False, 0, half, half, mode, act.empty, d)
    return d


def qmatmul_rope(out, mats, act, stream, bias, pos, table, k_cache, v_cache, n_rot, n_q, hd, neox):
    """Decoding, mats = one or two (matrix, first column) of the Q/K/V projection, the second's
    rows right after the first's (columns [q | k | v], the first n_rot rotated, the first n_q
    queries): q . W rotated by RoPE at position pos[0] (table: cos, sin [n_ctx, hd / 2]) into
    out[0], k rotated and v into the f16 caches' row pos[0] (ops.rope_kv's work, for models
    without q/k norms that rotate whole heads), in one launch."""
    bias = act.empty if bias is None else bias
    (m, col), second = mats[0], mats[1:]
    rope = (pos, *table, k_cache, v_cache, n_rot, n_q, hd, bool(neox))
    nb1 = -(-m.rows // (2 * WARPS))          # blocks of the first matrix (a pair a warp)
    if second:
        m2, col2 = second[0]
        assert col2 == col + m.rows and m2.K == m.K
        rope += (m2.w, m2.o_qh, m2.o_sc, m2.s_qs, m2.s_qh, m2.s_sc, m2.rows, nb1)
        n_out = 2 * WARPS * nb1 + m2.rows
    else:
        rope += _placeholders()[1]
        n_out, m2 = m.rows, None
    _decode(EPI_ROPE, out, m, act, stream, bias, False, col, n_out, 0, 0, act.empty, act, rope=rope, m2=m2)


_PLACEHOLDERS: list = []


def _placeholders():
    """Arguments for the kernel parameters an epilogue does not use, typed as the real ones and
    made once: (RoPE's: pos .. neox; a second matrix's: w2 .. nb1)."""
    if not _PLACEHOLDERS:
        f32, f16 = cuda.device_array((1, 1), np.float32), cuda.device_array((1, 1), np.float16)
        _PLACEHOLDERS.append(((cuda.device_array(1, np.int32), f32, f32, f16, f16, 0, 0, 2, False),
                              (cuda.device_array(4, np.uint32), 0, 0, 0, 0, 0, 0, 0)))
    return _PLACEHOLDERS[0]


def _decode(epi, out, m, act, stream, bias, accumulate, col, n_out, half, mode, nw, dst, ss_out=None, rope=None,
            m2=None, T=1):
    """The decode kernel for n_out output rows (gated: n_out = half) of T tokens (EPI_STORE: any
    T, in launches of MAX_NT tokens a block row); m2: RoPE's second matrix."""
    qtype2 = None if m2 is None else m2.qtype
    plan = _plan(m.K // 32, n_out, epi, m.nbytes + (0 if m2 is None else m2.nbytes))
    NT = min(T, MAX_NT)
    qin = act.nw is not None
    if qin:                       # the input staged in shared memory: quantized there (QIN)
        plan = plan[:4] + (m.K,)
    elif NT > 1:                  # (the activations are NT rows: not staged)
        plan = (min(plan[0], NT_UNROLL),) + plan[1:4] + (0,)
    _, KS, RW, _, _ = plan
    G = _out_group(epi)
    local = (KS == 1 and RW == 1 and not qin and n_out % G == 0
             and bool(GROUP_BLOCKS & {EPI_GATED: 1, EPI_QUANT: 2}.get(epi, 0)))
    rwb = G if local else WARPS                      # warps of rows a block (the kernel's RWB)
    launch(_kernel(m.qtype, NT, epi=epi, plan=plan, qtype2=qtype2, qin=qin, local=local, x16=act.x16),
           (-(-n_out // (rwb * RW)), -(-T // NT)), 32 * rwb * KS, stream,
        out, col, m.w, m.o_qh, m.o_sc, m.s_qs, m.s_qh, m.s_sc, m.rows, m.K // 32,
        act.xq, act.xd, act.xs, act.ss, np.float32(act.eps), act.xf, act.empty if act.nw is None else act.nw,
        bias, accumulate, half, mode, nw,
        dst.xq8, dst.xd, dst.xs, dst.xf, act.empty if ss_out is None else ss_out, dst.count,
        *(rope or _placeholders()[0] + _placeholders()[1]), T)


# ---------------------------------------------------------------------------------------------
# Reference.

def quantize_act_ref(x: np.ndarray, group: int = 32):
    """q8 activations as quantize_act computes them: int8 [T, K], scale per 32 [T, K/32] (or per
    `group` values: quant16's 16)."""
    T, K = x.shape
    xb = x.reshape(T, K // group, group).astype(np.float32)
    amax = np.abs(xb).max(axis=2)
    d = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.trunc(xb * inv[:, :, None] + np.copysign(0.5, xb)), -127, 127).astype(np.int8)
    return q.reshape(T, K), d


def qmatmul_ref(raw: np.ndarray, qtype: int, K: int, x: np.ndarray) -> np.ndarray:
    """float64 oracle: dequantized W (gguf-py) times the q8-quantized x ([T, K])."""
    from gguf.quants import dequantize
    W = dequantize(np.ascontiguousarray(raw), Q(qtype)).reshape(raw.shape[0], K).astype(np.float64)
    if qtype in FLOAT_TYPES:
        return x.astype(np.float64) @ W.T
    q, d = quantize_act_ref(x)
    xdq = (q.reshape(x.shape[0], K // 32, 32).astype(np.float64) * d[:, :, None]).reshape(x.shape)
    return xdq @ W.T
