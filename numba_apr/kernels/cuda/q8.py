"""The q8 activation format on the GPU, as device functions shared by every kernel that writes it.

A product's quantized input is int8 per value (4 packed in an int32 word: what `dp4a` reads), a
float scale per 32 values and an int sum per 16 (what the weights' offsets multiply): llama.cpp's
q8_1. It is written by `ops.quantize_act` (a launch of its own, for prompts), and in decode steps
by the kernel that computes the values: the products' epilogues (qmatmul: the residual stream
after wo / w_down, the gated activation after gate/up) and decode attention, so a decode step
has no quantizer launches at all.

`quant32` quantizes 32 values a warp holds, one a lane; `quant16` the same 32 values as two
blocks of 16, each with its own scale (the decode step's gated activations: see
qmatmul_decode.GATED_GROUP; a consumer reads such a q8 through an ActBuffers view with `x16`);
`quant8` a block of 32 from 4 threads of 8 values each, for a block that quantizes its own
input into shared memory (a decode product's QIN, qmatmul_decode.py): it and quant32 give the
same q8. `gated` is the activation of a gated feed-forward, act(gate) * up.
"""
import math

import numpy as np
from numba import cuda

from ..._numba import cuda_jit
from . import ptx

# Tried and not kept: a correctly rounded division, div.rn.f32 (docs/experiments.md#correctly-rounded-division)
MODE_COPY, MODE_NORM, MODE_SILU, MODE_GELU = 0, 1, 2, 3
GELU_C = math.sqrt(2.0 / math.pi)


@cuda_jit(device=True)
def round_away(a):
    h = np.float32(0.5)   # (a float64 literal would turn the whole expression float64)
    return int(a + h) if a >= 0 else -int(h - a)


@cuda_jit(device=True)
def gated(v, up, mode):
    """act(v) * up: SiLU (MODE_SILU) or tanh-GELU (MODE_GELU)."""
    # (exponents capped at 80: e^80 is already past every float32 that matters here, and the
    # simulator's Python math.exp raises where the GPU's would give inf)
    if mode == MODE_SILU:
        return v / (np.float32(1.0) + math.exp(min(-v, np.float32(80.0)))) * up
    # tanh(y) = 1 - 2 / (exp(2y) + 1): fast-math's tanh is a coarse approximation
    y = np.float32(GELU_C) * v * (np.float32(1.0) + np.float32(0.044715) * v * v)
    th = np.float32(1.0) - np.float32(2.0) / (math.exp(min(np.float32(2.0) * y, np.float32(80.0))) + np.float32(1.0))
    return np.float32(0.5) * v * (np.float32(1.0) + th) * up


@cuda_jit(device=True)
def quant32(v, store, xq8, xd, xs, t, b):
    """Quantize the warp's 32 values (v: this lane's) as q8 block b of token t; written only when
    `store`. A warp collective: every thread of the block calls it (see ptx.py)."""
    lane = cuda.threadIdx.x & 31
    amax = ptx.warp_max(abs(v))
    inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
    q = round_away(v * inv)
    lo = ptx.warp_sum(q if lane < 16 else 0)
    hi = ptx.warp_sum(q if lane >= 16 else 0)
    if store:
        xq8[t, 32 * b + lane] = q
        if lane == 0:
            xd[t, b] = amax / np.float32(127.0)
            xs[t, 2 * b] = lo
            xs[t, 2 * b + 1] = hi


@cuda_jit(device=True)
def quant16(v, store, xq8, xd, xs, t, b):
    """Quantize the warp's 32 values (v: this lane's) as the 16-value q8 blocks b (lanes 0-15)
    and b + 1 (lanes 16-31) of token t, each with its own scale xd[t, b ..] and sum xs[t, b ..];
    written only when `store`. A warp collective (see ptx.py); the halves do not mix."""
    lane = cuda.threadIdx.x & 31
    amax = ptx.lanes_max(abs(v), 16)
    inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
    q = round_away(v * inv)
    n = ptx.lanes_sum(q, 16)
    if store:
        xq8[t, 16 * b + lane] = q
        if (lane & 15) == 0:
            xd[t, b + (lane >> 4)] = amax / np.float32(127.0)
            xs[t, b + (lane >> 4)] = n


@cuda_jit(device=True)
def quant8(x, w, wo, t, i, store, xq, xd, xs, ss):
    """Values 8i .. 8i + 8 of x[t] * w (value e's weight at w[wo + e - 8i]: the whole vector's,
    wo = 8i, or 8 a thread loaded ahead), a quarter of q8 block i // 4, quantized by the block's 4
    neighbouring threads together (a collective of the 4 lanes; see ptx.py): two words of quants
    into xq[0, 2i ..], from the block's first thread its scale xd[0, i // 4] and ss[i // 4], the
    sum of x's squares (the norm's, see ops.ActBuffers.ss), from each half's first its sum xs;
    written only when `store`. The 8 values a thread are 32 contiguous bytes, so a warp's loads
    cover 1 KB without gaps, and a 32-value block needs two shuffles, not quant32's five."""
    e = 8 * i
    z = cuda.local.array(8, np.float32)
    s2 = np.float32(0.0)
    amax = np.float32(0.0)
    for j in range(8):
        v = x[t, e + j]
        s2 += v * v
        z[j] = v * w[wo + j]
        amax = max(amax, abs(z[j]))
    amax = ptx.lanes_max(amax, 4)
    s2 = ptx.lanes_sum(s2, 4)
    inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
    lo, hi, n = 0, 0, 0
    for j in range(4):
        a, b = round_away(z[j] * inv), round_away(z[4 + j] * inv)
        n += a + b
        # (the top byte signed: the word is then a valid int32 as it stands)
        if j == 3:
            lo |= a << 24
            hi |= b << 24
        else:
            lo |= (a & 0xFF) << (8 * j)
            hi |= (b & 0xFF) << (8 * j)
    n = ptx.lanes_sum(n, 2)
    if store:
        xq[0, 2 * i] = lo
        xq[0, 2 * i + 1] = hi
        if (i & 3) == 0:
            xd[0, i >> 2] = amax / np.float32(127.0)
            ss[i >> 2] = s2
        if (i & 1) == 0:
            xs[0, i >> 1] = n
