"""Decode products on the GPU (one token, T = 1, or a few: a batched decode step, a short prompt):
the dp4a kernel with its plans and epilogues.

`_make_decode_kernel` builds, per type, epilogue and plan, the kernel that qmatmul.py's decode
entry points (`qmatmul` at T = 1, `qmatmul_quant`, `qmatmul_gated`, `qmatmul_rope`) launch.
`_plan` picks the plan from a product's shape (warps a row, rows a warp, units a lane a trip,
L2 prefetch before the wait, staged activations); the tuning bounds above it (SPLIT_ROWS,
PREFETCH_BYTES, QIN_MAX_K, GROUP_BLOCKS, GATED_GROUP, ...) say why they are what they are, and
docs/experiments.md#decode-products has what was measured to get there. The epilogues store or
accumulate, quantize the next product's input (q8.py), or rotate q and k and write the KV cache.
Weights are read through the units of qmatrix.py.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import cuda

from ..._numba import cuda_jit
from ...errors import NumbaAprError
from . import ptx
from .launch import overlapped
from .q8 import gated, quant8, quant16, quant32
from .qmatrix import WARPS, _dots, _prefetch_rows, _store


# Decoding (T = 1). A block takes 4 * RW rows: each row is taken by KS warps (1, 2 or 4: rows of
# 64+ units are split over KS warps, which add their sums in shared memory; the block has 4 * KS
# warps), and a warp takes RW rows (EPI_GATED: RW gate rows and their up rows); each lane one or
# two units (UNROLL) of each row in flight per trip. The plan (`_plan`) aims at one short
# dependent chain a warp: a DRAM load takes ~0.6 us, and a warp that walks its units in several
# trips waits for each (a 896 x 4864 Q6_K product 7.2 -> 5.7 us with its plan). Many small
# blocks, so that even a 896-row product spreads over all multiprocessors (28 blocks of 32 rows
# leave 104 of 132 idle). Figures: docs/experiments.md#trips-and-warps-a-row.
# The split warps stay in the block of their row (tried and not kept: a block taking 4 / KS rows,
# docs/experiments.md#trips-and-warps-a-row).
#
# Epilogues (EPI, a compile-time choice):
#   EPI_STORE  out[0, col + r] = v (+ bias), or += v;
#   EPI_QUANT  out[0, r] (+)= v, then the next product's input from the new out: q8 of out * nw
#              (the next RMS norm's weight; its 1 / rms, a whole-vector quantity, is left to the
#              consumer) and ss_out[g] = the sum of squares of out's 32-value block g;
#   EPI_GATED  rows [0, half) are gate, [half, 2 half) up (one matrix): the output is
#              act(gate) * up, as float (xf) and q8;
#   EPI_ROPE   the Q/K/V product (columns col.. of [q | k | v]): a warp takes the two rows that
#              RoPE rotates together (`_rope_pair`), rotates them at position pos[0], and stores
#              q into out, k and v into the f16 caches (the work of ops.rope_kv, whose launch
#              this saves).
# The q8 of a 32-value block needs all 32 values, which 32 / (rows a block) blocks compute: each
# block counts itself in `count[g]` after storing its rows, and the last of the group quantizes
# the block and sets the count back to 0 for the next launch (the CUDA threadFenceReduction
# pattern; values are read back with atomics, which go to L2, so no stale L1 line is read). This
# saves the quantizer launch a product used to need. Where the plan allows (GROUP_BLOCKS), a
# block takes 32 rows instead and quantizes them itself (LOCAL).
# The input: q8 of x, or of x * w with ss_in holding x's sums of squares per 32 (as EPI_QUANT
# writes them): then every result is scaled by 1 / rms(x), which commutes with the product.
EPI_STORE, EPI_QUANT, EPI_GATED, EPI_ROPE = 0, 1, 2, 3


@cuda_jit(device=True)
def _rope_pair(j, n_rot, hd, neox):
    """Columns (a, b) of [q | k | v] that pair j holds: in q and k (the first n_rot columns) the
    two that RoPE rotates together (NeoX: i and i + hd/2 of a head; else 2i and 2i + 1), in v
    two neighbours."""
    if 2 * j >= n_rot:
        return 2 * j, 2 * j + 1
    h2 = hd // 2
    head = j // h2
    i = j - head * h2
    if neox:
        return head * hd + i, head * hd + i + h2
    return head * hd + 2 * i, head * hd + 2 * i + 1


def _env_int(name: str, default: int) -> int:
    """A tuning bound from the environment (set only to measure it)."""
    v = os.environ.get(name, str(default))
    if not v.isdigit():
        raise NumbaAprError(f"{name} must be a whole number, got {v!r}")
    return int(v)


# Tokens a decode kernel takes at once (NT): a batched decode step's (up to 8 sequences) and a
# short prompt's products; each weight unit is loaded once and dotted with each token's input,
# more tokens in groups of MAX_NT (blockIdx.y), which find the weights in L2. Units a lane a trip
# (the plan's UNROLL) at most NT_UNROLL with NT > 1: a trip then holds NT times the work. 4 and 1
# measured best of (8, 2), (8, 1), (4, 2), (4, 1), (2, 1): the 1.5B's step at 8 sequences 4.22 ->
# 3.52 ms (docs/experiments.md#tokens-a-decode-kernel).
MAX_NT = _env_int("NUMBA_APR_MAX_NT", 4)
NT_UNROLL = _env_int("NUMBA_APR_NT_UNROLL", 1)
if not (1 <= MAX_NT <= 8 and NT_UNROLL in (1, 2)):
    raise NumbaAprError("NUMBA_APR_MAX_NT must be 1..8 and NUMBA_APR_NT_UNROLL 1 or 2")


SPLIT_ROWS = 4096    # split rows over warps only while rows x warps a row stay within this
# ... or twice that for rows of LONG_ROW_UNITS units and more (8+ trips a warp unsplit): the 7B's
# down product 979 -> 845 us a step, while shorter rows lost (docs/experiments.md#long-rows-split-further).
LONG_ROW_UNITS = 512


# Products of up to this many bytes of weights send them to L2 before waiting for the kernel
# ahead (PRE in _plan): 0.5B tg128 1,174 -> 1,256 tok/s when added; the bound's history:
# docs/experiments.md#l2-prefetch-before-the-wait. NUMBA_APR_PREFETCH sets it (to measure it).
PREFETCH_BYTES = _env_int("NUMBA_APR_PREFETCH", 12 << 20)
# Tried and not kept: trip-by-trip L2 prefetch for products without PRE (docs/experiments.md#trip-by-trip-l2-prefetch)
# Tried and not kept: leads into later products' weights (docs/experiments.md#leads-into-later-products)
# Staged activations (SK in _plan) for rows of STAGE_MIN_K .. STAGE_MAX_K (K + K/8 + K/4 bytes of
# static shared memory): the 7B's down product (K = 18944) 7 us faster a call, but gate/up (K =
# 3584) and the output head slower (docs/experiments.md#staged-activations).
STAGE_MIN_K, STAGE_MAX_K = 8192, 32768
# Decoding, products whose input x (the residual stream) has up to QIN_MAX_K values quantize
# rmsnorm(x) * w themselves (QIN, see the kernel); the products that write x then end without
# EPI_QUANT's tail (a fence, a counter, the last block's read-back). The 0.5B's step (K = 896)
# 0.606 -> 0.571 ms, the 1.5B's (K = 1536) 1.240 -> 1.284: every block reads x (4 bytes a value,
# not q8's 1.1) from L2 after the wait, a burst that grows with K and with the blocks
# (docs/experiments.md#inputs-quantized-by-their-consumer). NUMBA_APR_QIN_MAX_K sets the bound
# (to measure it).
# Tried and not kept: the norm's weights in shared memory; the tails gathered in thread block
# clusters (docs/experiments.md#inputs-quantized-by-their-consumer)
QIN_MAX_K = _env_int("NUMBA_APR_QIN_MAX_K", 1024)
# The bound for the Q/K/V product alone (attention's input; gate/up's stays QIN_MAX_K): its
# launch is few blocks (1.5B: 256, against gate/up's 1,120), so its burst of x reads is small,
# and the down product before it ends without its tail: 1.5B 1,238 -> 1,218 us a step, the 7B's
# K = 3584 unchanged (docs/experiments.md#inputs-quantized-by-their-consumer).
QIN_QKV_MAX_K = _env_int("NUMBA_APR_QIN_QKV_MAX_K", max(QIN_MAX_K, 2048))
# Decode products that quantize their output, with one warp a row (KS = 1, RW = 1) and an input
# quantized ahead (not QIN), run as blocks of 32 warps: each block holds a whole q8 block of the
# output and quantizes it from shared memory (LOCAL in the kernel), where blocks of 4 rows need
# the tail (a fence, a counter, the last block's read-back): 1.5B 1,126 -> 1,068 us a step; not
# for the 0.5B's gated product (two rows a warp, QIN), which lost
# (docs/experiments.md#output-q8-blocks-quantized-in-one-block). Bit 1: EPI_GATED, bit 2: EPI_QUANT.
GROUP_BLOCKS = _env_int("NUMBA_APR_GROUP_BLOCKS", 3)
# Values a q8 block of the gated products' output (decoding): 16, each with its own scale, where
# the rest of the q8 is 32 (quant16; the down product reads it through a view with x16). A LOCAL
# block is a q8 block of rows, and a LOCAL block of 32 warps of 64 registers takes a whole
# multiprocessor: the 1.5B's gate/up (280 such blocks on 132 multiprocessors) ran 3 waves for
# 2.12 waves of work; blocks of 16 warps, two a multiprocessor, cut the last wave to 16 rows a
# block (1.5B 1,006 -> 951 us a step, docs/experiments.md#gated-outputs-in-q8-blocks-of-16). The
# finer scales make the q8 closer to the values, not coarser. NUMBA_APR_GATED_GROUP=32 sets the
# old blocks of 32 (to measure it).
# Tried and not kept: EPI_QUANT's output in blocks of 16 too (docs/experiments.md#gated-outputs-in-q8-blocks-of-16)
GATED_GROUP = _env_int("NUMBA_APR_GATED_GROUP", 16)
if GATED_GROUP not in (16, 32):
    raise NumbaAprError(f"NUMBA_APR_GATED_GROUP must be 16 or 32, got {GATED_GROUP}")


# These products are bound by their instructions more than by their bytes or their latency: the
# structural changes below were measured and lost. Kept from them: scalar loads without numba's
# wraparound (`_ld`) and scale bytes converted in 32 bits (`_byte_f32`): 1.5B 1,217 -> 1,147 us a
# step (docs/experiments.md#fewer-instructions-a-unit).
# Tried and not kept: gate/up capped at 56 registers (docs/experiments.md#gateup-capped-at-56-registers)
# Tried and not kept: persistent blocks (docs/experiments.md#persistent-blocks)
# Tried and not kept: bytes in flight in shared memory, cp.async (docs/experiments.md#bytes-in-flight-in-shared-memory)
# Tried and not kept: units in slots (docs/experiments.md#units-in-slots)
# Tried and not kept: four units a lane, several rows a warp (docs/experiments.md#more-units-or-rows-a-warp)
# Tried and not kept: coherent weight loads; gate/up capped at 72 registers (docs/experiments.md#fewer-instructions-a-unit)
# Tried and not kept: one unit a lane in trips past the row (docs/experiments.md#one-unit-a-lane-in-a-trip-past-the-row)
# Tried and not kept: a warp's rows sharing their activation loads (docs/experiments.md#activations-shared-by-a-warps-rows)


def _plan(n_units: int, rows: int, epi: int, nbytes: int) -> tuple[int, int, int, bool, int]:
    """(UNROLL, KS, RW, PRE, SK) of a decode product of `rows` rows of n_units units, nbytes of
    weights. Rows are split over KS warps only where there are too few rows to fill the card (a
    7B's products have thousands, and its 512-thread blocks, one a multiprocessor at 80
    registers, read 16% slower), a bound twice as high for long rows (LONG_ROW_UNITS). PRE: the
    warps send their rows to L2 before waiting for the kernel ahead (see the kernel). SK: the
    row length K where a block stages the activations in shared memory first (else 0): big
    products of long rows (see STAGE_MIN_K)."""
    split_rows = SPLIT_ROWS * (2 if n_units >= LONG_ROW_UNITS else 1)
    KS = max(k for k in (1, 2, 4) if k == 1 or (n_units >= 32 * k and rows * k <= split_rows))
    UNROLL = 2 if n_units > 32 * KS else 1
    RW = 2 if epi == EPI_ROPE or (epi == EPI_GATED and KS == 1 and UNROLL == 1) else 1
    PRE = nbytes <= PREFETCH_BYTES
    return UNROLL, KS, RW, PRE, 32 * n_units if not PRE and STAGE_MIN_K <= 32 * n_units <= STAGE_MAX_K else 0


@cuda_jit(device=True)
def _rope_consts(bias, a, b, p, cos, sin, n_rot, hd, neox):
    """What EPI_ROPE's stores of columns a, b at position p read besides the products: their
    biases (0 without) and the rotation's cos and sin (1, 0 in v). Weights and tables, none
    written by the kernel ahead: loaded before its wait."""
    ba, bb = np.float32(0.0), np.float32(0.0)
    if bias.shape[0] > 0:
        ba, bb = bias[a], bias[b]
    if a >= n_rot:
        return ba, bb, np.float32(1.0), np.float32(0.0)
    i = a % hd if neox else (a % hd) // 2
    return ba, bb, cos[p, i], sin[p, i]


@cuda_jit(device=True)
def _rope_store(out, va, vb, a, b, p, c, sn, k_cache, v_cache, n_rot, n_q):
    """EPI_ROPE's stores for columns a, b of [q | k | v] at position p (biases added, c / sn
    from _rope_consts): q rotated into out, k rotated into the cache, v into the cache."""
    if a >= n_rot:
        v_cache[p, a - n_rot] = np.float16(va)
        v_cache[p, b - n_rot] = np.float16(vb)
        return
    x0, x1 = va * c - vb * sn, va * sn + vb * c
    if a < n_q:
        out[0, a] = x0
        out[0, b] = x1
    else:
        k_cache[p, a - n_q] = np.float16(x0)
        k_cache[p, b - n_q] = np.float16(x1)


@cuda_jit(device=True, inline=True)
def _rms_scale(ss_in, eps, lane):
    """1 / rms(x) from ss_in, the sums of squares of x per 32 values (1 where there are none:
    the input needs no norm). A warp collective."""
    if ss_in.shape[0] == 0:
        return np.float32(1.0)
    s = np.float32(0.0)
    for i in range(lane, ss_in.shape[0], 32):
        s += ss_in[i]
    s = ptx.warp_sum(s)
    return np.float32(1.0) / math.sqrt(s / np.float32(32 * ss_in.shape[0]) + eps)


def _make_fetcher(unit, EPI, RW, unit_dot, NT=1):
    """(fetch, dots): fetch loads unit u of the warp's rows (r, then r1 with two rows a warp,
    then their up rows where gated) into the register arrays qa / fa / ea from slot i0 on; dots
    adds their products with the activations (of NT tokens: rows tl[0 .. NT) of the input,
    into acc[j + NA i] for token i)."""
    NA = RW * (2 if EPI == EPI_GATED else 1)
    @cuda_jit(device=True, inline=True)
    def put(qa, fa, ea, i, v):
        qa[i, 0], qa[i, 1], qa[i, 2], qa[i, 3] = v[0], v[1], v[2], v[3]
        qa[i, 4], qa[i, 5], qa[i, 6], qa[i, 7] = v[4], v[5], v[6], v[7]
        fa[i, 0], fa[i, 1], fa[i, 2], fa[i, 3] = v[8], v[9], v[10], v[11]
        ea[i, 0], ea[i, 1] = v[12], v[13]

    @cuda_jit(device=True, inline=True)
    def fetch(qa, fa, ea, i0, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u):
        put(qa, fa, ea, i0, unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r, rows - 1), u))
        if RW == 2:
            put(qa, fa, ea, i0 + 1, unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r1, rows - 1), u))
        if EPI == EPI_GATED:
            put(qa, fa, ea, i0 + RW, unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, r + half, u))
            if RW == 2:
                put(qa, fa, ea, i0 + RW + 1, unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, r1 + half, u))

    @cuda_jit(device=True, inline=True)
    def dot1(acc, j, qa, fa, ea, i, keep, xq, xd, xs, t):
        acc[j] += keep * unit_dot(xq, xd, xs, t, qa[i, 0], qa[i, 1], qa[i, 2], qa[i, 3], qa[i, 4], qa[i, 5],
                                  qa[i, 6], qa[i, 7], fa[i, 0], fa[i, 1], fa[i, 2], fa[i, 3], ea[i, 0], ea[i, 1])

    @cuda_jit(device=True, inline=True)
    def dots_token(acc, qa, fa, ea, i0, keep, xq, xd, xs, j0, t):
        dot1(acc, j0, qa, fa, ea, i0, keep, xq, xd, xs, t)
        if RW == 2:
            dot1(acc, j0 + 1, qa, fa, ea, i0 + 1, keep, xq, xd, xs, t)
        if EPI == EPI_GATED:
            dot1(acc, j0 + RW, qa, fa, ea, i0 + RW, keep, xq, xd, xs, t)
            if RW == 2:
                dot1(acc, j0 + RW + 1, qa, fa, ea, i0 + RW + 1, keep, xq, xd, xs, t)

    @cuda_jit(device=True, inline=True)
    def dots(acc, qa, fa, ea, i0, keep, xq, xd, xs, tl):
        # (written out, not a loop over the tokens: each accumulator index then is a constant,
        # so acc stays in registers; one token reads row 0, a constant too)
        dots_token(acc, qa, fa, ea, i0, keep, xq, xd, xs, 0, 0 if NT == 1 else tl[0])
        if NT > 1:
            dots_token(acc, qa, fa, ea, i0, keep, xq, xd, xs, NA, tl[1])
        if NT > 2:
            dots_token(acc, qa, fa, ea, i0, keep, xq, xd, xs, 2 * NA, tl[2])
        if NT > 3:
            dots_token(acc, qa, fa, ea, i0, keep, xq, xd, xs, 3 * NA, tl[3])
        if NT > 4:
            dots_token(acc, qa, fa, ea, i0, keep, xq, xd, xs, 4 * NA, tl[4])
        if NT > 5:
            dots_token(acc, qa, fa, ea, i0, keep, xq, xd, xs, 5 * NA, tl[5])
        if NT > 6:
            dots_token(acc, qa, fa, ea, i0, keep, xq, xd, xs, 6 * NA, tl[6])
        if NT > 7:
            dots_token(acc, qa, fa, ea, i0, keep, xq, xd, xs, 7 * NA, tl[7])
    return fetch, dots


@cuda_jit(device=True, inline=True)
def _quant_group(v, g, G, store, nwv, q8, qd, qs, ss_out, sums):
    """q8 block g of G values (32, or 16: see GATED_GROUP) of a decode product's output from a
    warp's values (v: this lane's, value G g + lane): of v * nwv (this lane's norm weight, or 1);
    with `sums`, also ss_out[g] = the sum of v^2 (where ss_out has entries). Written only where
    `store` (with G = 16, lanes 16-31 must not store). A warp collective (see quant32)."""
    if G == 16:
        quant16(v * nwv, store, q8, qd, qs, 0, g)
    else:
        quant32(v * nwv, store, q8, qd, qs, 0, g)
    if sums and ss_out.shape[0] > 0:
        s2 = ptx.warp_sum(v * v)
        if store and (cuda.threadIdx.x & 31) == 0:
            ss_out[g] = s2


def _out_group(epi: int) -> int:
    """Values a q8 block of what a quantizing decode epilogue writes (GATED_GROUP)."""
    return GATED_GROUP if epi == EPI_GATED else 32


def _make_decode_kernel(unit, EPI, UNROLL, KS, RW, PRE, SK, unit2=None, QIN=False, LOCAL=False, X16=False,
                        NT=1):
    # (two rows a warp are RoPE's pair or two gate rows: the plain epilogues store one row a warp)
    assert RW == 1 or (RW == 2 and EPI in (EPI_ROPE, EPI_GATED)), (EPI, RW)
    # NT > 1: a few tokens (a batched decode step, a short prompt), plain stores only
    assert 1 <= NT <= MAX_NT and (NT == 1 or (EPI == EPI_STORE and RW == 1 and not QIN and not SK and not X16
                                               and unit2 is None)), (NT, EPI)
    assert not LOCAL or (KS == 1 and RW == 1 and EPI in (EPI_QUANT, EPI_GATED)), (EPI, KS, RW)
    NR = 2 if EPI == EPI_GATED else 1
    NA = NR * RW                         # accumulators a lane a token
    NANT = NA * NT                       # ... and in all (a plain constant: array shapes)
    assert not (QIN and X16), "QIN quantizes its input itself, a scale per 32"
    G = _out_group(EPI)                  # values a q8 block of the output
    RWB = G if LOCAL else WARPS          # warps of rows a block (LOCAL: a whole q8 block of rows)
    GROUP = G // (WARPS * RW)            # blocks a q8 block of the output takes (not LOCAL)
    NWB = RWB * KS                       # warps a block (a plain constant: a shared array's shape)
    TAIL = EPI in (EPI_QUANT, EPI_GATED)
    TWO = unit2 is not None              # EPI_ROPE: blocks from nb1 on take a second matrix (w2 ..)
    XSH = 4 if X16 else 5                # the input's scales: one per 2**XSH values
    unit_dot = _dots(ptx.ld4_2d if SK else ptx.ldg4_2d, XSH)[0]
    fetch1, dots = _make_fetcher(unit, EPI, RW, unit_dot, NT)
    fetch2 = _make_fetcher(unit2, EPI, RW, unit_dot)[0] if TWO else fetch1
    NP = NA * UNROLL                     # units a lane holds: a trip's

    @cuda_jit(device=True, inline=True)
    def fetch_trip(qa, fa, ea, second, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u0, u1):
        """A trip's units into registers: u0 (and with UNROLL 2, u1) of the warp's rows, from
        the matrix the block takes."""
        if TWO and second:
            fetch2(qa, fa, ea, 0, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u0)
            if UNROLL == 2:
                fetch2(qa, fa, ea, NA, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u1)
        else:
            fetch1(qa, fa, ea, 0, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u0)
            if UNROLL == 2:
                fetch1(qa, fa, ea, NA, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u1)

    @cuda_jit(device=True, inline=True)
    def dots_trip(acc, qa, fa, ea, keep0, keep1, xq, xd, xs, tl):
        """acc += a fetched trip's products, unit u0's weighted keep0 and u1's keep1."""
        dots(acc, qa, fa, ea, 0, keep0, xq, xd, xs, tl)
        if UNROLL == 2:
            dots(acc, qa, fa, ea, NA, keep1, xq, xd, xs, tl)
    NTHR = 32 * NWB
    QT = max(1, -(-SK // (8 * NTHR)))    # QIN: trips of 8 input values a thread
    # shared shapes: plain constants, never 0 (sq: 3 words spare for aligned16)
    SQ, SD, SX = max(SK, 32) // 4 + 3, max(SK, 32) >> XSH, max(SK, 32) // 16

    @overlapped
    @cuda_jit(**({"max_registers": 64} if LOCAL else {}))   # (1024 threads a block: 64 at most)
    def kernel(out, col, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, ss_in, eps, xf_in, nw_in,
               bias, accumulate_out, half, mode, nw, q8, qd, qs, qf, ss_out, count,
               pos, cos, sin, k_cache, v_cache, n_rot, n_q, hd, neox,
               w2, o_qh2, o_sc2, s_qs2, s_qh2, s_sc2, rows2, nb1, T):
        lane = cuda.threadIdx.x & 31
        # NT > 1: tokens t0 .. t0 + NT of T (blockIdx.y: a group of NT); past T, token T - 1
        # is computed again and not stored
        t0 = cuda.blockIdx.y * NT
        tl = cuda.local.array(NT, np.int32)
        for i in range(NT):
            tl[i] = min(t0 + i, T - 1)
        warp = cuda.threadIdx.x >> 5
        kw = warp % KS                   # this warp's share of its row's units
        bx = cuda.blockIdx.x
        second = False
        if TWO and bx >= nb1:            # (block-uniform) the second matrix's rows, after the first's
            second = True
            bx -= nb1
            col += rows
            w, o_qh, o_sc, s_qs, s_qh, s_sc, rows = w2, o_qh2, o_sc2, s_qs2, s_qh2, s_sc2, rows2
        r = (bx * RWB + warp // KS) * RW
        r1 = r + 1
        # What the epilogue reads besides the products, loaded before the wait (after it, each
        # is a memory round trip on the kernel's critical path): weights, tables and the
        # position (which the step's last kernel moves), and EPI_QUANT's out, the residual
        # stream, which the kernel two or more launches ahead wrote (see qmatmul_quant).
        # 1.5B 1,067 -> 1,027 us a step (docs/experiments.md#epilogue-inputs-loaded-before-the-wait).
        if EPI == EPI_ROPE:              # rows r, r1: a RoPE pair (columns a, b of [q | k | v])
            a, b = _rope_pair(min(r, rows - 2) + col >> 1, n_rot, hd, neox)
            r, r1 = a - col, b - col
            p = pos[0]
            ba, bb, c, sn = _rope_consts(bias, a, b, p, cos, sin, n_rot, hd, neox)
        if EPI == EPI_QUANT:
            rr = min(r, rows - 1)
            base = bias[rr] if bias.shape[0] > 0 else np.float32(0.0)
            if accumulate_out:
                base += out[0, rr]
        if TAIL:                         # the output's q8 block g: this lane's norm weight in it
            g = bx if LOCAL else bx // GROUP
            nwv = nw[32 * g + lane] if EPI == EPI_QUANT and nw.shape[0] > 0 else np.float32(1.0)
        # The weights do not depend on the kernel before: the warp's rows go to L2 while that
        # kernel still runs (launched early, see launch.overlapped), then wait for its output.
        if PRE:
            if EPI == EPI_ROPE:          # (RoPE pairs: rows a head dimension apart)
                if lane == 0 and kw == 0:
                    _prefetch_rows(w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r, rows - 1), 1)
                    _prefetch_rows(w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r1, rows - 1), 1)
            elif cuda.threadIdx.x == 0:
                # The block's rows are consecutive: one thread sends them all, a prefetch a
                # stream (per warp, the ~40 instructions of each prefetch were ~20% of what a
                # 1.5B gate/up warp issues).
                r0 = bx * RWB * RW
                nr = min(RWB * RW, (half if EPI == EPI_GATED else rows) - r0)
                _prefetch_rows(w, o_qh, o_sc, s_qs, s_qh, s_sc, r0, nr)
                if EPI == EPI_GATED:
                    _prefetch_rows(w, o_qh, o_sc, s_qs, s_qh, s_sc, r0 + half, nr)
        # The first trip's units, into registers before the wait as well (a 0.5B's rows are all
        # one trip): after it, only the activations are read. 0.5B tg128 1,505 -> 1,595 tok/s
        # (docs/experiments.md#first-trip-loaded-before-the-wait).
        qa = cuda.local.array((NP, 8), np.uint32)
        fa = cuda.local.array((NP, 4), np.float32)
        ea = cuda.local.array((NP, 2), np.int64)
        ua = lane + 32 * kw
        ub = ua + 32 * KS
        fetch_trip(qa, fa, ea, second, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half,
                   min(ua, n_units - 1), min(ub, n_units - 1))
        if QIN:                          # the norm's weights this thread applies (constants)
            wq = cuda.local.array((QT, 8), np.float32)
            for k in range(QT):
                i = min(k * NTHR + cuda.threadIdx.x, SK // 8 - 1)
                for j in range(8):
                    wq[k, j] = nw_in[8 * i + j]
        ptx.grid_dep()
        if QIN:
            # The input as the product ahead left it (x, the residual stream): the block
            # quantizes rmsnorm(x) * nw_in into shared memory itself, 8 values a thread, its
            # 1 / rms applied to the results as with ss_in. The product ahead then needs no
            # quantizing tail (see QIN_MAX_K).
            sq = ptx.aligned16(cuda.shared.array((1, SQ), np.int32))
            sd = cuda.shared.array((1, SD), np.float32)
            sx = cuda.shared.array((1, SX), np.int32)
            s2 = cuda.shared.array(SD, np.float32)
            for k in range(QT):          # (block-uniform trips: quant8 is a collective)
                i = k * NTHR + cuda.threadIdx.x
                quant8(xf_in, wq[k], 0, 0, min(i, SK // 8 - 1), i < SK // 8, sq, sd, sx, s2)
            cuda.syncthreads()
            xq, xd, xs, ss_in = sq, sd, sx, s2
        elif SK:
            # The q8 activations, staged in shared memory once a block: the products' reads of
            # them then make no L1 lookups (a probe without those reads ran the 7B's big
            # products 13-25% faster; see STAGE_MIN_K for where staging pays).
            sq = ptx.aligned16(cuda.shared.array((1, SQ), np.int32))   # (16-byte loads)
            sd = cuda.shared.array((1, SD), np.float32)
            sx = cuda.shared.array((1, SX), np.int32)
            tid = cuda.threadIdx.x
            for i in range(4 * tid, SK // 4, 4 * NTHR):
                a0, a1, a2, a3 = ptx.ldg4_2d(xq, 0, i)
                sq[0, i] = a0
                sq[0, i + 1] = a1
                sq[0, i + 2] = a2
                sq[0, i + 3] = a3
            for i in range(tid, SK >> XSH, NTHR):
                sd[0, i] = xd[0, i]
            for i in range(tid, SK // 16, NTHR):
                sx[0, i] = xs[0, i]
            cuda.syncthreads()
            xq, xd, xs = sq, sd, sx
        # 1 / rms of the input: its loads (written by the kernel ahead) in flight with the dots'
        scale = _rms_scale(ss_in, eps, lane)
        acc = cuda.local.array(NANT, np.float32)
        for j in range(NANT):
            acc[j] = 0.0
        if LOCAL:
            vals = cuda.shared.array(32, np.float32)
        one = np.float32(1.0)
        zero = np.float32(0.0)
        dots_trip(acc, qa, fa, ea, one if ua < n_units else zero, one if ub < n_units else zero, xq, xd, xs, tl)
        for u0 in range(ua + 32 * KS * UNROLL, n_units, 32 * KS * UNROLL):
            # (the second unit, with UNROLL 2, weighted 0 past the row's end)
            u1 = min(u0 + 32 * KS, n_units - 1)
            fetch_trip(qa, fa, ea, second, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, r1, rows, half, u0, u1)
            dots_trip(acc, qa, fa, ea, one, one if u0 + 32 * KS < n_units else zero, xq, xd, xs, tl)
        for j in range(NANT):
            acc[j] = ptx.warp_sum(acc[j]) * scale
        if KS > 1:
            part = cuda.shared.array((NWB, NANT), np.float32)
            if lane == 0:
                for j in range(NANT):
                    part[warp, j] = acc[j]
            cuda.syncthreads()
            for j in range(NANT):
                t = np.float32(0.0)
                for i in range(KS):
                    t += part[warp - kw + i, j]
                acc[j] = t
        if NT > 1:
            if lane == 0 and kw == 0 and r < rows:
                for i in range(NT):
                    if t0 + i < T:
                        _store(out, bias, col + r, t0 + i, acc[i], accumulate_out)
        elif EPI == EPI_ROPE:
            if lane == 0 and kw == 0 and (bx * RWB + warp // KS) * 2 < rows:
                _rope_store(out, acc[0] + ba, acc[1] + bb, a, b, p, c, sn, k_cache, v_cache, n_rot, n_q)
        elif lane == 0 and kw == 0:
            # (EPI_QUANT / EPI_GATED: each storing lane fences its own stores, below, for the
            # block that quantizes; a fence by every thread of a 512-thread block cost ~1.5 us)
            for j in range(RW):
                v = acc[j]
                if EPI == EPI_GATED:
                    v = gated(v, acc[RW + j], mode)
                    qf[0, r + j] = v
                elif r < rows:
                    if EPI == EPI_QUANT:
                        v += base
                        out[0, r] = v
                    else:
                        _store(out, bias, col + r, 0, v, accumulate_out)
                if LOCAL:                # (one row a warp: r = G bx + warp)
                    vals[warp] = v
            if TAIL and not LOCAL:
                # (tried and not kept: fence.acq_rel.gpu, docs/experiments.md#a-stronger-fence-in-the-tails)
                cuda.threadfence()       # this lane's values, visible to the last block
        if TAIL and LOCAL:
            # The block's G rows are a whole q8 block of the output: quantized here, from shared
            # memory (no fence, counter or read-back: see GROUP_BLOCKS).
            cuda.syncthreads()
            if ptx.SIM or warp == 0:     # (the simulator's warp collectives take the whole block)
                _quant_group(vals[lane % G], g, G, warp == 0 and lane < G, nwv, q8, qd, qs, ss_out, EPI == EPI_QUANT)
        elif TAIL:
            last = cuda.shared.array(1, np.int32)
            cuda.syncthreads()
            if cuda.threadIdx.x == 0:
                last[0] = cuda.atomic.add(count, g, 1) == GROUP - 1
            cuda.syncthreads()
            if last[0]:
                i = G * g + lane % G
                v = cuda.atomic.add(qf, (0, i), 0.0) if EPI == EPI_GATED else cuda.atomic.add(out, (0, i), 0.0)
                _quant_group(v, g, G, cuda.threadIdx.x < G, nwv, q8, qd, qs, ss_out, EPI == EPI_QUANT)
                if cuda.threadIdx.x == 0:
                    count[g] = 0
    return kernel
