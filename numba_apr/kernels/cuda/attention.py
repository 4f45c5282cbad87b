"""Grouped-query causal attention over the f16 KV cache on the GPU (numba.cuda), with an optional
sliding window: the CUDA twin of kernels/cpu/attention.py.

    attention(out, q, k_cache, v_cache, pos, T, n_head, n_head_kv, head_dim, head_dim_v, scale,
              window, stream, workspace=None)

Token t of the batch sits at position pos[0] + t (pos is read on the device, so a decode step
can be replayed from a CUDA graph) and attends to the cache positions start..pos[0] + t, start
= 0, or with window > 0 the last `window` positions. Query head h reads kv head
h // (n_head // n_head_kv). Everything accumulates in float32; the softmax is online (running
max and sum, rescaled when the max grows). The launchers only launch: no allocation, no host
copy, no synchronisation.

Launch design (blocks of 4 warps; a block serves HB query heads that share one kv head, so every
K/V row it reads from memory serves HB heads: `_plan` picks HB, the largest divisor of the group
size that the registers allow, at most 8):

* decoding, T <= DECODE_MAX_T (the `decode` kernel of `_kernels`): flash-decoding. Grid
  (n_head_kv * head groups, n_split, T). Block s takes the s-th chunk of the positions its token
  sees; the chunk length is worked out on the device from pos[0], so at any context length the
  work spreads over the splits (a short context uses a few, the others exit at once). Each warp
  takes 32 consecutive keys at a time, one key a lane: the lane's K row arrives in 16-byte loads
  (`ptx.ldg4`, 4 in flight; with one query head a block, the whole K row and the warp's 32 V
  rows at once, the first trip's while q is staged: AHEAD) and its scores for the HB heads are
  plain per-lane dots against q in shared memory (broadcast reads, two dims a load: no shuffle
  per key); one `warp_max` per head and 32 keys updates the running max; then the lanes switch
  to the head dimension for p * V,
  each V row one coalesced 128-byte warp load per 64 dims, 8-16 rows in flight. The 4 warps'
  (max, sum, acc) meet in shared memory at the end. Where only one split has keys (a context of
  up to KEYS positions, or one split in all) the block writes `out`; else (o, max, sum) partials
  go to the caller's workspace, and the last of the splits' blocks to finish (an atomic count a
  head group) merges them (`_merge`: lane = dim, a warp a 32-dim chunk): no second launch. The
  splits: up to TARGET_BLOCKS / (kv heads x head groups), as many as the workspace holds.
* prompts, T > DECODE_MAX_T (the `prompt` kernel): flash attention. Grid (n_head_kv * head
  groups, ceil(T / WT)). A block owns R = 4 * RW (token, head) rows, WT = R // HB tokens times
  its HB heads, RW rows a warp. It walks the keys its tokens see in tiles of KT = 32: a tile's K
  and V rows are loaded once (16-byte coalesced loads; the next tile's loads are issued before
  the current tile is computed) into shared memory, where every warp reads them for its rows:
  lane = key for the scores, lane = dimension for p * V, as in decoding.

Pass a workspace (`attention_workspace`, allocated once) for decoding: without it a token gets
one block per (kv head, head group), fine for a few hundred positions only. Timings:
docs/experiments.md#decode-attention-timings.

`attention_ref` is the float64 NumPy oracle of the tests.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from ..._numba import cuda_jit
from . import ptx
from .launch import launch, overlapped, view_once
from .ptx import f16_bits, f32_bits, ldg4, warp_max, warp_sum
from .q8 import quant32

NT = 128              # threads a block
NWARP = NT // 32
KEYS = NT             # keys a decode block takes per step (32 a warp)
KT = 32               # keys a prompt tile holds
DECODE_MAX_T = 4      # batches up to this size use the decode kernel (one token per block)
MAX_SPLIT = 512
TARGET_BLOCKS = 528   # decode blocks to aim for: ~4 resident a multiprocessor on an H100 (132)
CU = 8                # splits whose partials a merging warp loads at once
HB_MAX = 8            # query heads a block at most (see _plan)
SHORT_CTX = 1024      # decoding within this many positions: one query head a block (`short`)
NEG = np.float32(-1e30)   # "no score yet": finite, since fastmath assumes no infinities

def _plan(group: int, D: int, DV: int):
    """(HB, RW): query heads a block, prompt rows a warp.

    A decode warp keeps HB * DV/32 accumulators per lane and a prompt warp RW * DV/32: both are
    capped so that registers stay under ~64 floats for them (HB <= 2048 / (D + DV), at most 8)."""
    cap = max(1, min(HB_MAX, 2048 // (D + DV)))
    HB = max(d for d in range(1, cap + 1) if group % d == 0)
    RW = 4 if D + DV <= 256 else 2
    return HB, RW


def _n_split(n_ctx: int) -> int:
    """Splits a workspace holds: one per block step of the context (KEYS positions), at most
    MAX_SPLIT. `attention` uses up to TARGET_BLOCKS / (kv heads x head groups) of them."""
    return max(1, min(MAX_SPLIT, -(-n_ctx // KEYS)))


def attention_workspace(n_ctx: int, n_head: int, head_dim_v: int, max_T: int = 1, n_split: int | None = None):
    """Device buffers for split decoding: (partial outputs [Ts, n_split, n_head, head_dim_v],
    partial (max, sum) [Ts, n_split, n_head, 2], counters [Ts, n_head] of the splits done, zeros
    between launches), Ts = max_T (the most tokens a decode launch takes: DECODE_MAX_T, or a
    batch of several sequences). Allocate once and pass to every `attention` call (all layers
    can share it: launches on one stream run in order)."""
    ns = _n_split(n_ctx) if n_split is None else max(1, int(n_split))
    ts = max(1, max_T)
    return (cuda.device_array((ts, ns, n_head, head_dim_v), np.float32),
            cuda.device_array((ts, ns, n_head, 2), np.float32),
            cuda.to_device(np.zeros((ts, n_head), np.int32)))


_PLACEHOLDERS: list = []


def _placeholders():
    """A workspace's arrays, typed as the real ones, for one-split launches (which use none)."""
    if not _PLACEHOLDERS:
        _PLACEHOLDERS.append((cuda.device_array((1, 1, 1, 1), np.float32),
                              cuda.device_array((1, 1, 1, 2), np.float32),
                              cuda.device_array((1, 1), np.int32)))
    return _PLACEHOLDERS[0]


@cuda_jit(device=True, inline=True)
def _first_key(p, window):
    return 0 if window <= 0 else max(0, p - window + 1)


@cuda_jit(device=True, inline=True)
def _chunk(n, n_split):
    """Keys a split takes for n visible keys: an even share, a whole number of block steps."""
    c = (n + n_split - 1) // n_split
    return (c + KEYS - 1) // KEYS * KEYS


@cuda_jit(device=True)
def _prefetch(pre, w, start, hi, stride, off, tid, CH, NCHR, NT):
    """A prompt tile's K or V rows start.. (capped at row hi-1) into registers: chunk cc =
    tid + NT * i of the tile is row cc // NCHR, 16 bytes at word 4 * (cc % NCHR)."""
    for i in range(CH):
        cc = tid + NT * i
        r = cc // NCHR
        a0, a1, a2, a3 = ldg4(w, min(start + r, hi - 1) * stride + off + 4 * (cc - r * NCHR))
        pre[i, 0] = a0
        pre[i, 1] = a1
        pre[i, 2] = a2
        pre[i, 3] = a3


@cuda_jit(device=True)
def _stage(tile, pre, tid, CH, NCHR, NT):
    """The rows _prefetch loaded, from registers into the shared tile (same chunk layout)."""
    for i in range(CH):
        cc = tid + NT * i
        r = cc // NCHR
        col = 4 * (cc - r * NCHR)
        for e in range(4):
            tile[r, col + e] = pre[i, e]


@functools.lru_cache(maxsize=None)
def _kernels(D: int, DV: int, HB: int, RW: int):
    """The decode and prompt kernels for head dims D, DV (multiples of 32), HB heads a block and
    RW prompt rows a warp. These are compile-time constants, so the loops over them unroll and
    the per-lane arrays (scores, accumulators, prefetched tiles) live in registers."""
    DW, DVW = D // 2, DV // 2          # 32-bit words (two f16) in a head's K / V row
    NCH, DVCH = D // 8, DV // 8        # 16-byte chunks in a head's K / V row
    NWV = (DVW + 31) // 32             # V words a lane accumulates (lane + 32 c)
    NACC = 2 * NWV                     # its accumulators (shapes must be plain constants)
    FULLV = DVW % 32 == 0
    KP = DW + 1                        # K tile pitch: lane-per-key reads hit 32 distinct banks
    R = NWARP * RW                     # prompt rows a block
    WT = R // HB                       # prompt tokens a block
    KCH, VCH = KT * NCH // NT, KT * DVCH // NT   # prompt tile chunks a thread loads (D/32, DV/32)
    # Decode: a lane's K row comes in batches of KB words (all of a batch's 16-byte loads in
    # flight at once), and the warp's V rows in batches of JB keys (NWV words a key a lane).
    # AHEAD (one query head a block, so registers to spare): a trip's whole K row (KB = DW) and
    # all its 32 keys' V words (JB = 32) are loaded at once, at the trip's top (the first trip's
    # before q is staged): one memory round trip a trip rather than one per batch (0.5B-shaped
    # 4.7 -> 3.6 us a layer: docs/experiments.md#a-trips-k-and-v-rows-at-once).
    # Tried and not kept: cached keys loaded before the wait (docs/experiments.md#cached-keys-loaded-before-the-wait)
    # Tried and not kept: a lane's score in 4 partial sums (docs/experiments.md#partial-score-sums)
    AHEAD = HB == 1
    KB = DW if AHEAD else 16           # 32+ left the word array in local memory (H100, D=128, HB=6)
    JB = 32 if AHEAD else 16 if NWV <= 2 else 8
    NVV = JB * NWV

    @cuda_jit(device=True, inline=True)
    def load_k(kr, kw, base, cb):
        """KB words of this lane's K row from word cb, 16 bytes a load."""
        for g in range(KB // 4):
            a0, a1, a2, a3 = ldg4(kw, base + cb + 4 * g)
            kr[4 * g] = a0
            kr[4 * g + 1] = a1
            kr[4 * g + 2] = a2
            kr[4 * g + 3] = a3

    @cuda_jit(device=True, inline=True)
    def load_v(vv, vw, k, c1, vstride, kvh, lane):
        """The V words of keys k .. k + JB (rows past the chunk: its last row) this lane takes."""
        for jj in range(JB):
            vb = min(k + jj, c1 - 1) * vstride + kvh * DVW
            for c in range(NWV):
                w = lane + 32 * c
                if FULLV or w < DVW:
                    vv[jj * NWV + c] = vw[vb + w]

    @cuda_jit(device=True, inline=True)
    def load_trip(kr, vv, kw, vw, k0, c1, kstride, vstride, kvh, lane):
        """AHEAD: the K row of this lane's key k0 + lane and the V words of the warp's keys k0 ..
        k0 + 32 (none where the warp has no keys left)."""
        load_k(kr, kw, min(k0 + lane, c1 - 1) * kstride + kvh * DW, 0)
        if k0 < c1:
            load_v(vv, vw, k0, c1, vstride, kvh, lane)

    # Tried and not kept: decode waiting for its own head's q, k, v only (docs/experiments.md#waiting-for-the-own-head-only)
    @overlapped
    @cuda_jit
    def decode(out, po, ml, count, q, kw, vw, kstride, vstride, pos, rows, batched, group, n_hb, scale, window,
               n_split, quant, xq8, xd, xs):
        ptx.grid_dep()
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        kvh = cuda.blockIdx.x // n_hb
        h0 = kvh * group + (cuda.blockIdx.x - kvh * n_hb) * HB
        s = cuda.blockIdx.y
        t = cuda.blockIdx.z
        # Keys are cache rows: those of a sequence's slot start at rows[t] (several sequences).
        r0 = rows[t] if batched else 0
        p = (pos[t] if batched else pos[0] + t)
        lo = _first_key(p, window) + r0
        p += r0
        chunk = _chunk(p + 1 - lo, n_split)
        c0 = lo + s * chunk
        if c0 > p:
            return      # the whole block: this split has no keys at this position
        c1 = min(p + 1, c0 + chunk)

        # q (scaled) as pairs of float32 in 8-byte words: one shared load feeds two dims.
        qs = cuda.shared.array((HB, DW), np.uint64)
        qf = qs.view(np.float32)
        ps = cuda.shared.array((NWARP, HB, 32), np.float32)
        mw = cuda.shared.array((NWARP, HB), np.float32)
        lw = cuda.shared.array((NWARP, HB), np.float32)
        aw = cuda.shared.array((NWARP, HB, DV), np.float32)
        flag = cuda.shared.array(1, np.int32)
        fm = cuda.local.array(CU, np.float32)
        fl = cuda.local.array(CU, np.float32)
        fo = cuda.local.array(CU, np.float32)
        kr = cuda.local.array(KB, np.uint32)
        vv = cuda.local.array(NVV, np.uint32)
        if AHEAD:    # the first trip's K and V rows in flight while q is staged
            load_trip(kr, vv, kw, vw, c0 + warp * 32, c1, kstride, vstride, kvh, lane)
        for i in range(tid, HB * D, NT):
            hh = i // D
            d = i - hh * D
            qf[hh, d] = q[t, (h0 + hh) * D + d] * scale   # scale folded into q once
        cuda.syncthreads()

        m = cuda.local.array(HB, np.float32)
        lsum = cuda.local.array(HB, np.float32)
        sc = cuda.local.array(HB, np.float32)
        acc = cuda.local.array((HB, NACC), np.float32)
        pj = cuda.local.array(HB, np.float32)
        for hh in range(HB):
            m[hh] = NEG
            lsum[hh] = 0.0
            for c in range(NACC):
                acc[hh, c] = 0.0

        for kb in range(c0, c1, KEYS):
            k0 = kb + warp * 32               # this warp's 32 keys
            key = k0 + lane
            valid = key < c1
            # Lanes past the chunk read its last row (always written, so finite) and mask it.
            base = min(key, c1 - 1) * kstride + kvh * DW
            for hh in range(HB):
                sc[hh] = 0.0
            for cb in range(0, DW, KB):
                if not AHEAD:
                    load_k(kr, kw, base, cb)
                for e in range(KB):
                    wd = kr[e]
                    klo = f16_bits(wd & 0xFFFF)
                    khi = f16_bits(wd >> 16)
                    for hh in range(HB):
                        qq = qs[hh, cb + e]
                        sc[hh] += f32_bits(qq & 0xFFFFFFFF) * klo + f32_bits(qq >> 32) * khi
            for hh in range(HB):
                si = sc[hh] if valid else NEG
                mn = max(m[hh], warp_max(si))
                corr = math.exp(m[hh] - mn)   # 1 unless the max grew
                pe = math.exp(si - mn) if valid else np.float32(0.0)
                lsum[hh] = lsum[hh] * corr + pe   # per-lane partial sums, added up at the end
                m[hh] = mn
                for c in range(NACC):
                    acc[hh, c] *= corr
                ps[warp, hh, lane] = pe
            ptx.syncwarp()
            # p * V, lane = dimension pair: JB keys' V words loaded at once (rows past the chunk
            # read its last row, with p = 0), then their products.
            for j0 in range(0, 32, JB):
                if k0 + j0 < c1:              # warp-uniform
                    if not AHEAD:
                        load_v(vv, vw, k0 + j0, c1, vstride, kvh, lane)
                    for jj in range(JB):
                        for hh in range(HB):
                            pj[hh] = ps[warp, hh, j0 + jj]
                        for c in range(NWV):
                            w = lane + 32 * c
                            if FULLV or w < DVW:
                                vd = vv[jj * NWV + c]
                                vlo = f16_bits(vd & 0xFFFF)
                                vhi = f16_bits(vd >> 16)
                                for hh in range(HB):
                                    acc[hh, 2 * c] += pj[hh] * vlo
                                    acc[hh, 2 * c + 1] += pj[hh] * vhi
            ptx.syncwarp()
            if AHEAD and kb + KEYS < c1:      # the next trip's rows
                load_trip(kr, vv, kw, vw, k0 + KEYS, c1, kstride, vstride, kvh, lane)

        # Merge the 4 warps' (max, sum, acc) per head: the output itself where this is the only
        # split with keys, else this split's partial (o, max, sum).
        na = (p + 1 - lo + chunk - 1) // chunk
        for hh in range(HB):
            lt = warp_sum(lsum[hh])
            if lane == 0:
                mw[warp, hh] = m[hh]
                lw[warp, hh] = lt
            for c in range(NWV):
                w = lane + 32 * c
                if FULLV or w < DVW:
                    aw[warp, hh, 2 * w] = acc[hh, 2 * c]
                    aw[warp, hh, 2 * w + 1] = acc[hh, 2 * c + 1]
        cuda.syncthreads()
        for i0 in range(0, HB * DV, NT):    # (block-uniform trips: quant32 is a collective)
            i = min(i0 + tid, HB * DV - 1)
            ok = i0 + tid < HB * DV           # warp-uniform: HB * DV is a multiple of 32
            hh = i // DV
            d = i - hh * DV
            mx = mw[0, hh]
            for wi in range(1, NWARP):
                mx = max(mx, mw[wi, hh])
            o = np.float32(0.0)
            lt = np.float32(0.0)
            for wi in range(NWARP):
                f = math.exp(mw[wi, hh] - mx)
                o += f * aw[wi, hh, d]
                lt += f * lw[wi, hh]
            if na == 1:
                o = o / lt
                if ok:
                    out[t, (h0 + hh) * DV + d] = o
                if quant:                     # a 32-dim group of one head: one warp
                    quant32(o, ok, xq8, xd, xs, t, ((h0 + hh) * DV + d) >> 5)
            elif ok:
                po[t, s, h0 + hh, d] = o
                if d == 0:
                    ml[t, s, h0 + hh, 0] = mx
                    ml[t, s, h0 + hh, 1] = lt
        if na > 1:
            # The last of the na blocks of these heads to finish merges the partials (a
            # launch less than a combine kernel of its own: ~3 us a layer, measured).
            cuda.threadfence()                # this thread's partials, visible to that block
            cuda.syncthreads()
            if tid == 0:
                flag[0] = cuda.atomic.add(count, (t, h0), 1) == na - 1
            cuda.syncthreads()
            if flag[0]:
                for c0 in range(0, HB * DV // 32, NWARP):   # warps over 32-dim chunks of the heads
                    c = min(c0 + warp, HB * DV // 32 - 1)
                    _merge(out, po, ml, t, h0 + c * 32 // DV, (c * 32) % DV + lane, na, DV,
                           c0 + warp < HB * DV // 32, quant, xq8, xd, xs, fm, fl, fo)
                if tid == 0:
                    count[t, h0] = 0

    @cuda_jit
    def prompt(out, q, kw, vw, kstride, vstride, pos, T, group, n_hb, scale, window):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        kvh = cuda.blockIdx.x // n_hb
        h0 = kvh * group + (cuda.blockIdx.x - kvh * n_hb) * HB
        t0 = cuda.blockIdx.y * WT
        nt = min(WT, T - t0)
        pos0 = pos[0]

        ks = cuda.shared.array((KT, KP), np.uint32)
        vs = cuda.shared.array((KT, DVW), np.uint32)
        qs = cuda.shared.array((R, DW), np.uint64)     # q pairs, as in decode
        qf = qs.view(np.float32)
        ps = cuda.shared.array((NWARP, RW, 32), np.float32)
        # Row r = (token r // HB, head r % HB); rows past the batch hold zeros and see no key.
        for i in range(tid, R * D, NT):
            r = i // D
            d = i - r * D
            tl = r // HB
            v = np.float32(0.0)
            if tl < nt:
                v = q[t0 + tl, (h0 + r - tl * HB) * D + d] * scale
            qf[r, d] = v

        rlo = cuda.local.array(RW, np.int64)
        rhi = cuda.local.array(RW, np.int64)
        m = cuda.local.array(RW, np.float32)
        lsum = cuda.local.array(RW, np.float32)
        sc = cuda.local.array(RW, np.float32)
        pr = cuda.local.array(RW, np.float32)
        acc = cuda.local.array((RW, NACC), np.float32)
        kpre = cuda.local.array((KCH, 4), np.uint32)
        vpre = cuda.local.array((VCH, 4), np.uint32)
        for i in range(RW):
            tl = (warp * RW + i) // HB
            pi = pos0 + t0 + tl
            rlo[i] = _first_key(pi, window)
            rhi[i] = pi + 1
            if tl >= nt:
                rlo[i] = 0
                rhi[i] = 0
            m[i] = NEG
            lsum[i] = 0.0
            for c in range(NACC):
                acc[i, c] = 0.0

        lo = _first_key(pos0 + t0, window)    # keys the block's tokens see: [lo, hi)
        hi = pos0 + t0 + nt
        # Prefetch the first tile (rows past hi read row hi-1: finite, masked below).
        _prefetch(kpre, kw, lo, hi, kstride, kvh * DW, tid, KCH, NCH, NT)
        _prefetch(vpre, vw, lo, hi, vstride, kvh * DVW, tid, VCH, DVCH, NT)

        for kt in range(lo, hi, KT):
            cuda.syncthreads()            # every warp is done with the previous tile
            _stage(ks, kpre, tid, KCH, NCH, NT)
            _stage(vs, vpre, tid, VCH, DVCH, NT)
            cuda.syncthreads()
            nxt = kt + KT
            if nxt < hi:                  # block-uniform: the next tile's loads fly meanwhile
                _prefetch(kpre, kw, nxt, hi, kstride, kvh * DW, tid, KCH, NCH, NT)
                _prefetch(vpre, vw, nxt, hi, vstride, kvh * DVW, tid, VCH, DVCH, NT)

            # Scores: lane = key of the tile, its K row against the warp's RW query rows.
            key = kt + lane
            for i in range(RW):
                sc[i] = 0.0
            for w in range(DW):
                wd = ks[lane, w]
                klo = f16_bits(wd & 0xFFFF)
                khi = f16_bits(wd >> 16)
                for i in range(RW):
                    qq = qs[warp * RW + i, w]
                    sc[i] += f32_bits(qq & 0xFFFFFFFF) * klo + f32_bits(qq >> 32) * khi
            for i in range(RW):
                valid = key >= rlo[i] and key < rhi[i]
                si = sc[i] if valid else NEG
                mn = max(m[i], warp_max(si))
                corr = math.exp(m[i] - mn)
                pe = math.exp(si - mn) if valid else np.float32(0.0)
                lsum[i] = lsum[i] * corr + pe
                m[i] = mn
                for c in range(NACC):
                    acc[i, c] *= corr
                ps[warp, i, lane] = pe
            ptx.syncwarp()
            # p * V: lane = dimension pair, over the tile's keys that exist (< hi).
            jn = min(KT, hi - kt)
            for j in range(jn):
                for i in range(RW):
                    pr[i] = ps[warp, i, j]
                for c in range(NWV):
                    w = lane + 32 * c
                    if FULLV or w < DVW:
                        vd = vs[j, w]
                        vlo = f16_bits(vd & 0xFFFF)
                        vhi = f16_bits(vd >> 16)
                        for i in range(RW):
                            acc[i, 2 * c] += pr[i] * vlo
                            acc[i, 2 * c + 1] += pr[i] * vhi

        for i in range(RW):
            lt = warp_sum(lsum[i])
            r = warp * RW + i
            tl = r // HB
            if tl < nt:
                inv = np.float32(1.0) / lt
                col = (h0 + r - tl * HB) * DV
                for c in range(NWV):
                    w = lane + 32 * c
                    if FULLV or w < DVW:
                        out[t0 + tl, col + 2 * w] = acc[i, 2 * c] * inv
                        out[t0 + tl, col + 2 * w + 1] = acc[i, 2 * c + 1] * inv

    return decode, prompt, WT


@cuda_jit(device=True)
def _merge(out, po, ml, t, h, d, na, DV, ok, quant, xq8, xd, xs, fm, fl, fo):
    """out[t, h*DV + d] = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s over the na splits that
    had keys (partials in po / ml, written by other blocks of this launch: read through L2, see
    ptx.ldcg), online (the max rescaled as it grows), CU splits' loads in flight at a time; and
    with `quant`, its q8 (the next product's input, q8.py) into xq8 / xd / xs. A warp takes 32
    dims of one head (lane = dim), stored where `ok`; a warp collective (quant32)."""
    mx = NEG
    o = np.float32(0.0)
    lt = np.float32(0.0)
    for s0 in range(0, na, CU):
        for u in range(CU):
            s = min(s0 + u, na - 1)        # past the last split: reread it, skipped below
            fm[u] = ptx.ldcg(ml, t, s, h, 0)
            fl[u] = ptx.ldcg(ml, t, s, h, 1)
            fo[u] = ptx.ldcg(po, t, s, h, d)
        for u in range(CU):
            if s0 + u < na:
                mn = max(mx, fm[u])
                c = math.exp(mx - mn)
                f = math.exp(fm[u] - mn)
                o = o * c + f * fo[u]
                lt = lt * c + f * fl[u]
                mx = mn
    o = o / lt
    if ok:
        out[t, h * DV + d] = o
    if quant:
        quant32(o, ok, xq8, xd, xs, t, (h * DV + d) >> 5)


def _words(cache):
    """The f16 cache as one flat uint32 array (two halves a word) for 16-byte loads."""
    return view_once(cache, "words", lambda: cache.reshape(cache.shape[0] * cache.shape[1]).view(np.uint32))


def attention(out, q, k_cache, v_cache, pos, T, n_head, n_head_kv, head_dim, head_dim_v, scale, window,
              stream, workspace=None, dst=None, short=False, rows=None):
    """out[t, h*dv:(h+1)*dv] = softmax(scale * q_t,h . K^T) V over the positions token t sees.

    out: f32 [>= T, n_head*dv]; q: f32 [>= T, n_head*head_dim] (rows may be strided);
    k_cache / v_cache: f16 [n_ctx, n_head_kv*head_dim / *dv], C-contiguous, positions up to
    pos[0] + T - 1 written; pos: int32 device array. head_dim and dv: multiples of 32, <= 256.
    workspace: `attention_workspace(...)`, for split decoding (see the module docstring).
    dst: ActBuffers (ops.py) for the q8 of out, when out is a product's input: decoding, the
    block that writes out quantizes it too, and the view is returned; else None.
    short: the caller's promise that no token sees more than SHORT_CTX positions; decoding then
    gives each query head its own blocks (HB = 1). A block's latency is its HB heads' dots and
    p * V one after another, so with few positions (few splits busy) that is the whole
    kernel: measured 9.3 -> 5.2 us at 200 positions, 0.5B-shaped, on an H100. At long
    contexts it would read each K/V row HB times, hence the promise.
    rows: a decode step of several sequences (int32 [T], device): token t is at position pos[t]
    of the sequence whose positions are cache rows rows[t] .. (a slot each); any T, through the
    decode kernel (the workspace must then have T rows: `attention_workspace(max_T=T)`)."""
    if T <= 0:
        return None
    D, DV = int(head_dim), int(head_dim_v)
    if D % 32 or DV % 32 or not 0 < D <= 256 or not 0 < DV <= 256:
        raise ValueError(f"attention: head dims must be multiples of 32 up to 256, got {D}, {DV}")
    group = n_head // n_head_kv
    HB, RW = _plan(group, D, DV)
    if short and T <= DECODE_MAX_T:
        HB = 1
    decode, prompt, WT = _kernels(D, DV, HB, RW)
    n_hb = group // HB
    kw, vw = _words(k_cache), _words(v_cache)
    kstride, vstride = k_cache.shape[1] // 2, v_cache.shape[1] // 2
    sc, win = np.float32(scale), int(window)
    batched = rows is not None
    if T <= DECODE_MAX_T or batched:
        n_split = 1
        if workspace is not None and T <= workspace[0].shape[0]:
            # Enough splits for ~TARGET_BLOCKS blocks at full context (fewer kv heads, more
            # splits); at short contexts most of them exit at once (see _chunk).
            n_split = min(workspace[0].shape[1], max(1, -(-TARGET_BLOCKS // (n_head_kv * n_hb))))
            # Tried and not kept: fewer splits at short contexts (docs/experiments.md#fewer-splits-at-short-contexts)
            po, ml, count = workspace
        else:
            po, ml, count = _placeholders()
        a = None if dst is None else dst.cols(n_head * DV)
        launch(decode, (n_head_kv * n_hb, n_split, T), NT, stream,
               out, po, ml, count, q, kw, vw, kstride, vstride, pos, pos if rows is None else rows, batched, group,
               n_hb, sc, win, n_split,
               *((False, out, out, out) if a is None else (True, a.xq8, a.xd, a.xs)))
        return a
    else:
        launch(prompt, (n_head_kv * n_hb, -(-T // WT)), NT, stream,
            out, q, kw, vw, kstride, vstride, pos, T, group, n_hb, sc, win)
        return None


# The oracle is the CPU module's float64 reference (one statement of attention for both backends).
from ..cpu.attention import attention_ref  # noqa: E402,F401
