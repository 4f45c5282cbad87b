"""Products on the GPU's int8 tensor cores (`mma.sync` from ptx.py): prompts (T >= MMA_MIN_T
tokens) and a few tokens (FEW_MIN_T <= T < MMA_MIN_T: a batched decode step, a short prompt).

`_make_mma_kernel` builds, per type and tile shape (`mma_tiles`), the kernel that qmatmul.py's
`qmatmul` launches for prompts: a block decodes a 128-row x 128-column weight tile through the
units of qmatrix.py into shared memory, next to the 64-token q8 activation tile, and each of
its 16 warps multiplies 16 rows by 32 tokens, scaling each int32 result by its halves' d and m;
the next step's loads are in flight while a step multiplies.

`_make_few_kernel` builds the few-token one (`_few_plan`): each warp decodes a 16-row x 128-column
weight tile of its own into shared memory and multiplies it by 8 tokens' q8 activations, read
as mma fragments straight from global memory; a row tile's K may be split over 2-8 warps.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..._numba import cuda_jit
from ...errors import NumbaAprError
from . import ptx
from .launch import overlapped
from .qmatmul_decode import _env_int
from .q8 import gated, quant32
from .qmatrix import _store


# Prompts: the int8 tensor cores (ptx.mma_s8), as llama.cpp's mmq. A block computes a tile of
# 16 WR weight rows x 32 WT tokens (`mma_tiles`), walking K in steps of MMA_K. Each step, its
# threads decode the weight tile through the units of qmatrix.py (each 16-value half of a unit
# is one k16 slice of the tile, with its own d and m) into shared memory as int8, next to the q8
# activation tile, then each warp runs 16 rows x 32 tokens as (MMA_K / 16) x 4 mma
# instructions. The int32 result of one k16 slice is scaled at once: acc += xd * (d * dot + m *
# sum(xq)); where the two k16 slices of each 32 values share d and m (every type but Q6_K, whose
# scales are per 16), they go through one m16n8k32 instruction and one scaling instead.
# Straight-line loads, 128 x 64 tiles of 16 warps and the next step's loads in flight during the
# multiply took it from 13-20 to 26-40 TMAC/s on 7B shapes (docs/experiments.md#from-13-to-40-tmacs).
MMA_NTILE = 4                # column tiles of 8 tokens a warp: 16 accumulators a lane (8 went
                             # to the stack: numba's loops over them were not unrolled)
MMA_K = 128                  # K a step: 4 units a row (K steps of 256 measured slower)
MMA_MIN_T = 16               # from this many tokens up, products go to the tensor cores


def mma_tiles() -> tuple[int, int]:
    """(WR, WT): warps a prompt-product block has along rows x along tokens; its tile is 16 WR
    rows x 8 MMA_NTILE WT tokens. 8 x 2 (76 KB of static shared memory, double-buffered) where
    it was measured, compute capability 9.0 (H100); 4 x 1 (38 KB: within the 48 KB that every
    GPU allows a block without opting in) on others; 2 x 1 on the simulator, which runs a
    thread at a time in Python (test_prompt_product_gpu_tiles also runs 8 x 2 there once)."""
    if not _MMA_TILES:
        _MMA_TILES.append((2, 1) if ptx.SIM else (8, 2) if cuda.get_current_device().compute_capability >= (9, 0)
                          else (4, 1))
    return _MMA_TILES[0]


_MMA_TILES: list = []


@cuda_jit(device=True, inline=True)
def _hold(qa, fa, ea, i, v, ok, base, pad):
    """A unit as qmatrix.py's loaders give it (v) into register slot i: its quants, its halves'
    d and m (0 where not ok: past the row's end) and columns from `base` (pad, pad + 16 where
    not ok), as `put` stores them into a shared tile."""
    qa[i, 0], qa[i, 1], qa[i, 2], qa[i, 3] = v[0], v[1], v[2], v[3]
    qa[i, 4], qa[i, 5], qa[i, 6], qa[i, 7] = v[4], v[5], v[6], v[7]
    fa[i, 0] = v[8] if ok else np.float32(0.0)
    fa[i, 1] = v[9] if ok else np.float32(0.0)
    fa[i, 2] = v[10] if ok else np.float32(0.0)
    fa[i, 3] = v[11] if ok else np.float32(0.0)
    ea[i, 0] = v[12] - base if ok else pad
    ea[i, 1] = v[13] - base if ok else pad + 16


@cuda_jit(device=True, inline=True)
def _scale(acc, i, c0, c1, c2, c3, dA, mA, dB, mB, xa, xb, sa, sb):
    """acc[i..i+4] += the int32 mma results c of rows (A, B) x tokens (a, b), scaled: with the
    rows' d and m, the tokens' scale x and x * sum(xq) s, x * (d * dot + m * sum(xq))."""
    acc[i] += mA * sa                     # (two fma a value)
    acc[i] += xa * dA * np.float32(c0)
    acc[i + 1] += mA * sb
    acc[i + 1] += xb * dA * np.float32(c1)
    acc[i + 2] += mB * sa
    acc[i + 2] += xa * dB * np.float32(c2)
    acc[i + 3] += mB * sb
    acc[i + 3] += xb * dB * np.float32(c3)


@cuda_jit(device=True)
def _scale4(acc, i, c0, c1, c2, c3, dA, mA, dB, mB, sX, sS, p, ta, kx, ks):
    """_scale with the tokens' (ta, ta+1) scales and xd * sum(xq) staged in sX / sS (buffer p)."""
    _scale(acc, i, c0, c1, c2, c3, dA, mA, dB, mB, sX[p, ta, kx], sX[p, ta + 1, kx], sS[p, ta, ks], sS[p, ta + 1, ks])


def _make_mma_kernel(unit, K32, WR, WT):
    """The tensor-core product: WR x WT warps, each 16 rows x 8 * NTILE tokens; a block's tile is
    16 * WR rows x 8 * NTILE * WT tokens (grid: x over token tiles, y over row tiles, so the blocks
    that share a weight tile run together and find it in L2)."""
    KSTEP = MMA_K
    assert KSTEP == 128              # (`multiply` below is written out for it)
    NTILE = MMA_NTILE
    NACC = 4 * NTILE                 # (sizes as closure constants: numba.cuda wants array
    NTOK_W = 8 * NTILE               #  shapes fixed at compile time, not expressions)
    NTOK = NTOK_W * WT
    ROWS = 16 * WR
    NTHR = 32 * WR * WT
    U = KSTEP // 32                  # units a row a step
    SW = KSTEP // 4 + 4              # words a row of a shared tile: +4 puts the 32 lanes'
                                     # fragment loads (row g, word 4kk + q) on 32 banks
    KS = KSTEP // 16                 # k16 slices a step
    K32S = KSTEP // 32
    NA = ROWS * U                    # units a tile
    NB = NTOK * (KSTEP // 4)         # activation words a tile
    NSC = NTOK * KS
    KW4 = KSTEP // 4                 # activation words a token a step
    NAI = (NA + NTHR - 1) // NTHR    # units a thread a step
    NBI = NB // NTHR                 # activation words a thread a step
    NSI = NSC // NTHR                # activation scales a thread a step

    @cuda_jit(device=True)
    def fetch(ku, tid, r0, t0, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, T, kw,
              bw, sx, ss, qa, fa, ea):
        """Step ku's loads into registers, all issued before any is waited on: the activations
        first (plain loads), then the weight units (each decodes once its loads are in)."""
        for i in range(NBI):
            idx = i * NTHR + tid
            t = min(t0 + idx // KW4, T - 1)
            k = ku * 8 + idx % KW4
            v = xq[t, min(k, kw - 1)]
            bw[i] = v if k < kw else 0
        for i in range(NSI):
            idx = i * NTHR + tid
            t = min(t0 + idx // KS, T - 1)
            j = idx % KS
            b = ku + (j >> 1)
            s = xd[t, min(b, n_units - 1)]
            sx[i] = s if b < n_units else np.float32(0.0)
            if K32:   # sS: xd * the sum of the quants of each 32, in the first K32S entries
                b2 = ku + (j & (K32S - 1))
                bc = min(b2, n_units - 1)
                v2 = xd[t, bc] * np.float32(xs[t, 2 * bc] + xs[t, 2 * bc + 1])
                ss[i] = v2 if b2 < n_units else np.float32(0.0)
            else:     # of each k16 slice
                ss[i] = sx[i] * np.float32(xs[t, min(2 * ku + j, 2 * n_units - 1)])
        for i in range(NAI):
            idx = min(i * NTHR + tid, NA - 1)
            u = ku + idx % U
            # (only types of 32-value blocks have a K that KSTEP does not divide)
            _hold(qa, fa, ea, i, unit(w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r0 + idx // U, rows - 1),
                                      min(u, n_units - 1)), u < n_units, 32 * ku, 32 * (u - ku))

    @cuda_jit(device=True)
    def put(p, tid, bw, sx, ss, qa, fa, ea, sA, sD, sM, sB, sX, sS):
        """The registers of fetch into shared buffer p."""
        for i in range(NBI):
            idx = i * NTHR + tid
            sB[p, idx // KW4, idx % KW4] = bw[i]
        for i in range(NSI):
            idx = i * NTHR + tid
            tk = idx // KS
            j = idx % KS
            if (j & 1) == 0:
                sX[p, tk, j >> 1] = sx[i]
            if not K32 or j < K32S:
                sS[p, tk, j] = ss[i]
        for i in range(NAI):
            idx = i * NTHR + tid
            if NA % NTHR == 0 or idx < NA:
                rl = idx // U
                j = ea[i, 0] >> 2
                sA[p, rl, j], sA[p, rl, j + 1], sA[p, rl, j + 2], sA[p, rl, j + 3] = qa[i, 0], qa[i, 1], qa[i, 2], qa[i, 3]
                j = ea[i, 1] >> 2
                sA[p, rl, j], sA[p, rl, j + 1], sA[p, rl, j + 2], sA[p, rl, j + 3] = qa[i, 4], qa[i, 5], qa[i, 6], qa[i, 7]
                sD[p, rl, ea[i, 0] >> 4], sM[p, rl, ea[i, 0] >> 4] = fa[i, 0], fa[i, 1]
                sD[p, rl, ea[i, 1] >> 4], sM[p, rl, ea[i, 1] >> 4] = fa[i, 2], fa[i, 3]

    @cuda_jit(device=True)
    def k32(acc, p, kk, ra, tw, g, q, sA, sD, sM, sB, sX, sS):
        """32 values of K: one k32 mma a column tile (every type but Q6_K: both k16 slices of
        each 32 share d and m, so one scaling)."""
        a0, a1 = sA[p, ra, 8 * kk + q], sA[p, ra + 8, 8 * kk + q]
        a2, a3 = sA[p, ra, 8 * kk + 4 + q], sA[p, ra + 8, 8 * kk + 4 + q]
        dA, mA, dB, mB = sD[p, ra, 2 * kk], sM[p, ra, 2 * kk], sD[p, ra + 8, 2 * kk], sM[p, ra + 8, 2 * kk]
        for nt in range(NTILE):
            tb = tw + 8 * nt
            c0, c1, c2, c3 = ptx.mma_s8_k32(a0, a1, a2, a3, sB[p, tb + g, 8 * kk + q], sB[p, tb + g, 8 * kk + 4 + q])
            _scale4(acc, 4 * nt, c0, c1, c2, c3, dA, mA, dB, mB, sX, sS, p, tb + 2 * q, kk, kk)

    @cuda_jit(device=True)
    def k16(acc, p, kk, ra, tw, g, q, sA, sD, sM, sB, sX, sS):
        """16 values of K: one k16 mma a column tile (Q6_K: scales per 16)."""
        a0, a1 = sA[p, ra, 4 * kk + q], sA[p, ra + 8, 4 * kk + q]
        dA, mA, dB, mB = sD[p, ra, kk], sM[p, ra, kk], sD[p, ra + 8, kk], sM[p, ra + 8, kk]
        for nt in range(NTILE):
            tb = tw + 8 * nt
            c0, c1, c2, c3 = ptx.mma_s8(a0, a1, sB[p, tb + g, 4 * kk + q])
            _scale4(acc, 4 * nt, c0, c1, c2, c3, dA, mA, dB, mB, sX, sS, p, tb + 2 * q, kk >> 1, kk)

    @cuda_jit(device=True)
    def multiply(acc, p, ra, tw, g, q, sA, sD, sM, sB, sX, sS):
        """The step's mma from shared buffer p, written out (KSTEP = 128) so that the
        addresses are constants and the instructions of the slices interleave."""
        if K32:
            k32(acc, p, 0, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k32(acc, p, 1, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k32(acc, p, 2, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k32(acc, p, 3, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
        else:
            k16(acc, p, 0, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 1, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 2, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 3, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 4, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 5, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 6, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            k16(acc, p, 7, ra, tw, g, q, sA, sD, sM, sB, sX, sS)

    @cuda_jit(max_registers=min(255, 65536 // NTHR))   # (8 x 2: one block fills the register file)
    def kernel(out, col, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, T, bias, accumulate_out):
        tid = cuda.threadIdx.x
        lane = tid & 31
        g = lane >> 2
        q = lane & 3
        wi = tid >> 5
        ra = (wi % WR) * 16 + g             # this lane's A rows: ra and ra + 8
        tw = (wi // WR) * NTOK_W            # this warp's first token in the tile
        r0 = cuda.blockIdx.y * ROWS
        t0 = cuda.blockIdx.x * NTOK
        sA = cuda.shared.array((2, ROWS, SW), np.uint32)     # weight quants, int8
        sD = cuda.shared.array((2, ROWS, KS), np.float32)    # their d per k16 slice
        sM = cuda.shared.array((2, ROWS, KS), np.float32)    # and m
        sB = cuda.shared.array((2, NTOK, SW), np.int32)      # activation quants, int8
        sX = cuda.shared.array((2, NTOK, K32S), np.float32)  # their scale per 32
        sS = cuda.shared.array((2, NTOK, KS), np.float32)    # scale * sum of the slice's quants
        acc = cuda.local.array(NACC, np.float32)
        for i in range(NACC):
            acc[i] = 0.0
        bw = cuda.local.array(NBI, np.int32)                 # a step's loads, in registers
        sx = cuda.local.array(NSI, np.float32)
        ss = cuda.local.array(NSI, np.float32)
        qa = cuda.local.array((NAI, 8), np.uint32)
        fa = cuda.local.array((NAI, 4), np.float32)
        ea = cuda.local.array((NAI, 2), np.int64)
        kw = xq.shape[1]
        # One step ahead: step s + 1's loads are in flight while step s multiplies from the
        # other buffer (the last step fetches itself again: no branch in between). Every warp
        # computes all its NTILE column tiles, those past T on copies of token T - 1: no branch
        # between the mma either.
        fetch(0, tid, r0, t0, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, T, kw, bw, sx, ss, qa, fa, ea)
        put(0, tid, bw, sx, ss, qa, fa, ea, sA, sD, sM, sB, sX, sS)
        cuda.syncthreads()
        last = ((n_units - 1) // U) * U
        p = 0
        for ku in range(0, n_units, U):
            fetch(min(ku + U, last), tid, r0, t0, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, T, kw,
                  bw, sx, ss, qa, fa, ea)
            multiply(acc, p, ra, tw, g, q, sA, sD, sM, sB, sX, sS)
            put(1 - p, tid, bw, sx, ss, qa, fa, ea, sA, sD, sM, sB, sX, sS)
            cuda.syncthreads()
            p = 1 - p
        for nt in range(NTILE):
            for j in range(4):
                r = r0 + ra + 8 * (j >> 1)
                t = t0 + tw + 8 * nt + 2 * q + (j & 1)
                if r < rows and t < T:
                    _store(out, bias, col + r, t, acc[4 * nt + j], accumulate_out)
    return kernel


# A few tokens (a batched decode step of 2-8 sequences, a short prompt): the dp4a decode kernel
# dots each weight unit with every token (8 dp4a and their scaling a token a unit), so its cost
# grows with the tokens; one m16n8k32 mma multiplies 16 rows x 32 values by 8 tokens. Each warp
# takes a 16-row tile, decodes its 16 x 128 weights a step (4 units a row, two a lane, through
# qmatrix.py's units) into a shared-memory tile of its own, and reads the A fragments from
# there; the B fragments (token g of the lane, 8 bytes of q8) come straight from global memory,
# where every warp of the card reads the same few KB. The next step's units are loaded while a
# step multiplies. Rows too few to fill the card have K split over KS warps (`_few_plan`),
# which add up in shared memory. T > 8: blocks along y take 8 tokens each.
# From FEW_MIN_T tokens up (below MMA_MIN_T). Off (= MMA_MIN_T) by default: written and tested
# under the simulator, not yet run or timed on a GPU (docs/experiments.md#a-few-tokens-on-the-tensor-cores);
# NUMBA_APR_FEW_MIN_T=3 turns it on, for the step's products and its gated product.
FEW_MIN_T = _env_int("NUMBA_APR_FEW_MIN_T", MMA_MIN_T)
if not 2 <= FEW_MIN_T <= MMA_MIN_T:   # (one token's inputs may be unquantized or per 16: the decode kernel's)
    raise NumbaAprError(f"NUMBA_APR_FEW_MIN_T must be 2..{MMA_MIN_T} ({MMA_MIN_T}: off), got {FEW_MIN_T}")
FEW_WARPS = _env_int("NUMBA_APR_FEW_WARPS", 1056)  # split K while row tiles x KS stay within this
FEW_SW = 36                  # words a row of a warp's tile: 32 (128 values) + 4, which puts the
                             # 32 lanes' fragment loads (row g, word 8kk + q) on 32 banks
FEW_SC = 9                   # k16 scales a row of it: 8 + 1 (rows g on distinct banks)


def _few_plan(n_units: int, rows: int) -> tuple[int, int]:
    """(KS, TR): warps a 16-row tile's K is split over, row tiles a block (blocks of 4 warps, or
    8 with KS = 8). K is split while the warps stay within FEW_WARPS and each keeps 2+ steps."""
    tiles, steps = -(-rows // 16), -(-n_units // 4)
    KS = max(k for k in (1, 2, 4, 8) if k == 1 or (tiles * k <= FEW_WARPS and steps >= 2 * k))
    return KS, max(1, 4 // KS)


def _make_few_kernel(unit, K32, KS, TR, GATED=False):
    """The few-token tensor-core product: TR row tiles of 16 a block, each over KS warps (K steps
    kw, kw + KS, ... of MMA_K values); grid (row blocks, token groups of 8). GATED (KS = 1, TR =
    2): rows [0, half) are gate, [half, 2 half) up (one matrix); each warp takes a gate tile and
    its up tile, and the block's 32 outputs act(gate) * up a token are one q8 block, which it
    quantizes (float into qf, q8 into q8 / qd / qs: the next product's input) without a
    quantizer launch after it."""
    assert MMA_K == 128 and (not GATED or (KS == 1 and TR == 2))
    NW = TR * KS                     # warps a block (sizes as plain constants: numba.cuda takes
                                     # no expression for an array's shape; the simulator does)
    NTL = 2 if GATED else 1          # row tiles a warp: gate and up
    NU = 2 * NTL                     # units a lane a step
    NACC = 4 * NTL
    NRT = 16 * NTL                   # rows of a warp's shared tiles
    SW, SC = FEW_SW, FEW_SC

    @cuda_jit(device=True, inline=True)
    def fetch(qa, fa, ea, w, o_qh, o_sc, s_qs, s_qh, s_sc, r0, rows, half, n_units, s, rl, uu):
        """Step s's units of this lane (rows rl and rl + 8 of the tile, and of the up tile half
        rows on; unit 4 s + uu) into registers; units past the row's end weigh 0, their halves
        at column 32 uu, + 16."""
        u = 4 * s + uu
        ok = u < n_units
        for i in range(NU):
            _hold(qa, fa, ea, i, unit(w, o_qh, o_sc, s_qs, s_qh, s_sc,
                                      min(r0 + rl + 8 * (i & 1) + half * (i >> 1), rows - 1), min(u, n_units - 1)),
                  ok, 128 * s, 32 * uu)

    @cuda_jit(device=True, inline=True)
    def put(qa, fa, ea, warp, rl, sA, sD, sM):
        """fetch's registers into the warp's tiles: quants by their column, d and m by k16 slice."""
        for i in range(NU):
            row = rl + 8 * (i & 1) + 16 * (i >> 1)
            j = ea[i, 0] >> 2
            sA[warp, row, j], sA[warp, row, j + 1], sA[warp, row, j + 2], sA[warp, row, j + 3] = (
                qa[i, 0], qa[i, 1], qa[i, 2], qa[i, 3])
            j = ea[i, 1] >> 2
            sA[warp, row, j], sA[warp, row, j + 1], sA[warp, row, j + 2], sA[warp, row, j + 3] = (
                qa[i, 4], qa[i, 5], qa[i, 6], qa[i, 7])
            sD[warp, row, ea[i, 0] >> 4], sM[warp, row, ea[i, 0] >> 4] = fa[i, 0], fa[i, 1]
            sD[warp, row, ea[i, 1] >> 4], sM[warp, row, ea[i, 1] >> 4] = fa[i, 2], fa[i, 3]

    @cuda_jit(device=True, inline=True)
    def tile32(acc, i, warp, ra, q, kk, b0, b1, xa, xb, sa, sb, sA, sD, sM):
        """A tile's rows (ra, ra + 8) x the 8 tokens over k32 slice kk, into acc[i..i+4]."""
        c0, c1, c2, c3 = ptx.mma_s8_k32(sA[warp, ra, 8 * kk + q], sA[warp, ra + 8, 8 * kk + q],
                                        sA[warp, ra, 8 * kk + 4 + q], sA[warp, ra + 8, 8 * kk + 4 + q], b0, b1)
        _scale(acc, i, c0, c1, c2, c3, sD[warp, ra, 2 * kk], sM[warp, ra, 2 * kk], sD[warp, ra + 8, 2 * kk],
              sM[warp, ra + 8, 2 * kk], xa, xb, sa, sb)

    @cuda_jit(device=True, inline=True)
    def tile16(acc, i, warp, ra, q, kk, b0, xa, xb, sa, sb, sA, sD, sM):
        """The same over k16 slice kk (Q6_K)."""
        c0, c1, c2, c3 = ptx.mma_s8(sA[warp, ra, 4 * kk + q], sA[warp, ra + 8, 4 * kk + q], b0)
        _scale(acc, i, c0, c1, c2, c3, sD[warp, ra, kk], sM[warp, ra, kk], sD[warp, ra + 8, kk], sM[warp, ra + 8, kk],
              xa, xb, sa, sb)

    @cuda_jit(device=True, inline=True)
    def k32(acc, u, kk, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM):
        """k32 slice kk of the tiles (unit u of K) times the 8 tokens. xg: the q8 row of this
        lane's B fragment's token; xda / xdb, xsa / xsb: its result tokens' scales and sums."""
        b0, b1 = ptx.at(xg, 8 * u + q), ptx.at(xg, 8 * u + 4 + q)
        xa, xb = ptx.at(xda, u), ptx.at(xdb, u)
        sa = xa * (np.float32(ptx.at(xsa, 2 * u)) + np.float32(ptx.at(xsa, 2 * u + 1)))  # (int32 + int32
        sb = xb * (np.float32(ptx.at(xsb, 2 * u)) + np.float32(ptx.at(xsb, 2 * u + 1)))  #  is an int64)
        tile32(acc, 0, warp, g, q, kk, b0, b1, xa, xb, sa, sb, sA, sD, sM)
        if NTL == 2:     # (written out: acc's indices stay constants, acc in registers)
            tile32(acc, 4, warp, g + 16, q, kk, b0, b1, xa, xb, sa, sb, sA, sD, sM)

    @cuda_jit(device=True, inline=True)
    def k16(acc, u, kk, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM):
        """The same for k16 slice kk (Q6_K: a scale per 16), of unit u."""
        h = 2 * u + (kk & 1)
        b0 = ptx.at(xg, 4 * h + q)
        xa, xb = ptx.at(xda, u), ptx.at(xdb, u)
        sa, sb = xa * np.float32(ptx.at(xsa, h)), xb * np.float32(ptx.at(xsb, h))
        tile16(acc, 0, warp, g, q, kk, b0, xa, xb, sa, sb, sA, sD, sM)
        if NTL == 2:
            tile16(acc, 4, warp, g + 16, q, kk, b0, xa, xb, sa, sb, sA, sD, sM)

    @cuda_jit(device=True, inline=True)
    def multiply(acc, s, warp, g, q, xg, xda, xdb, xsa, xsb, last, sA, sD, sM):
        """Step s: the warp's tiles times the 8 tokens (4 k32 or 8 k16 mma a tile). A whole step
        is written out (its addresses u's plus constants: in a loop with the clamp below they
        were three quarters of its instructions); the last step of a 32-value type, or one past K
        (a K share's), clamps its units to K (units past it weigh 0)."""
        u = 4 * s
        if u + 3 <= last:
            if K32:
                k32(acc, u, 0, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
                k32(acc, u + 1, 1, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
                k32(acc, u + 2, 2, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
                k32(acc, u + 3, 3, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
            else:
                k16(acc, u, 0, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
                k16(acc, u, 1, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
                k16(acc, u + 1, 2, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
                k16(acc, u + 1, 3, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
                k16(acc, u + 2, 4, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
                k16(acc, u + 2, 5, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
                k16(acc, u + 3, 6, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
                k16(acc, u + 3, 7, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
        elif K32:
            for kk in range(4):
                k32(acc, min(u + kk, last), kk, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)
        else:
            for kk in range(8):
                k16(acc, min(u + (kk >> 1), last), kk, warp, g, q, xg, xda, xdb, xsa, xsb, sA, sD, sM)

    @overlapped
    @cuda_jit
    def kernel(out, col, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, T, bias, accumulate_out,
               half, mode, q8, qd, qs):
        tid = cuda.threadIdx.x
        lane = tid & 31
        g = lane >> 2
        q = lane & 3
        warp = tid >> 5
        kw = warp % KS                   # this warp's steps: kw, kw + KS, ...
        r0 = (cuda.blockIdx.x * TR + warp // KS) * 16
        t0 = cuda.blockIdx.y * 8
        tg = min(t0 + g, T - 1)          # the token of this lane's B fragment
        ta = min(t0 + 2 * q, T - 1)      # and of its results (past T: token T - 1 again, not stored)
        tb = min(t0 + 2 * q + 1, T - 1)
        xg, xda, xdb, xsa, xsb = xq[tg], xd[ta], xd[tb], xs[ta], xs[tb]
        rl = lane >> 2                   # this lane's units: rows rl, rl + 8, unit uu of a step
        uu = lane & 3
        sA = cuda.shared.array((NW, NRT, SW), np.uint32)
        sD = cuda.shared.array((NW, NRT, SC), np.float32)
        sM = cuda.shared.array((NW, NRT, SC), np.float32)
        qa = cuda.local.array((NU, 8), np.uint32)
        fa = cuda.local.array((NU, 4), np.float32)
        ea = cuda.local.array((NU, 2), np.int64)
        acc = cuda.local.array(NACC, np.float32)
        for j in range(NACC):
            acc[j] = 0.0
        # The first step's weights are loaded before waiting for the kernel ahead (launch.py).
        fetch(qa, fa, ea, w, o_qh, o_sc, s_qs, s_qh, s_sc, r0, rows, half, n_units, kw, rl, uu)
        ptx.grid_dep()
        trips = -(-(-(-n_units // 4)) // KS)   # the same for every warp (the simulator's mma is a
        for i in range(trips):                  # block collective); steps past K weigh 0
            s = kw + i * KS
            put(qa, fa, ea, warp, rl, sA, sD, sM)
            ptx.syncwarp()
            fetch(qa, fa, ea, w, o_qh, o_sc, s_qs, s_qh, s_sc, r0, rows, half, n_units, s + KS, rl, uu)
            multiply(acc, s, warp, g, q, xg, xda, xdb, xsa, xsb, n_units - 1, sA, sD, sM)
            ptx.syncwarp()
        if KS > 1:                       # the K shares of a row tile, added in shared memory
            part = cuda.shared.array((NW, 4, 32), np.float32)
            for j in range(4):
                part[warp, j, lane] = acc[j]
            cuda.syncthreads()
            if kw == 0:
                for j in range(4):
                    v = np.float32(0.0)
                    for k in range(KS):
                        v += part[warp + k, j, lane]
                    acc[j] = v
        if GATED:
            # act(gate) * up: out is the float view (qf); the block's 32 rows x 8 tokens are
            # gathered in shared memory, and each warp quantizes 4 tokens' q8 block (blockIdx.x)
            vals = cuda.shared.array((8, 32), np.float32)
            for j in range(4):
                v = gated(acc[j], acc[4 + j], mode)
                tl = 2 * q + (j & 1)
                vals[tl, 16 * warp + g + 8 * (j >> 1)] = v
                if t0 + tl < T:
                    out[t0 + tl, r0 + g + 8 * (j >> 1)] = v
            cuda.syncthreads()
            for k in range(4):           # (block-uniform: quant32 is a collective)
                tl = 4 * warp + k
                quant32(vals[tl, lane], t0 + tl < T, q8, qd, qs, min(t0 + tl, T - 1), cuda.blockIdx.x)
        elif kw == 0:
            for j in range(4):
                r = r0 + g + 8 * (j >> 1)
                t = t0 + 2 * q + (j & 1)
                if r < rows and t < T:
                    _store(out, bias, col + r, t, acc[j], accumulate_out)
    return kernel
