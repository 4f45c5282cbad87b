"""The device side of the GPU sampler (kernels/cuda/sampling.py's `DeviceSampler` launches it): the
two kernels, `_k_scan` and `_k_select`, and what they are made of: the layout of the sampler's
small device arrays and its limits, the random generator, the 63-bit rank keys, and the
block-wide helpers (block max / sum and scans, `_cross`: where a cumulative weight crosses a
bound, `_load_sorted`: rank counting or a bitonic sort in shared memory, `_radix_select`, the
chain's stages over sorted or unsorted candidates, the draw in index order, `_emit`).
sampling.py's docstring states the chain, its order and its ties.

The kernels and the device functions that use `cuda.` stay in one module: numba's simulator
gives a kernel's module its fake `cuda` for the whole launch, while a device function of another
module swaps its own module's `cuda` at each call, which races between the simulator's threads.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..._numba import cuda_jit
from . import ptx

SIM = ptx.SIM

# Exact IEEE arithmetic here (the package default is fast-math): the penalty's float32 quotient,
# the float64 softmax and the threshold compares must match the CPU chain; the kernels are
# latency-bound, so fast-math would buy nothing.
_OPTS = dict(fastmath=False)

# Layout of the small device arrays.
P_TEMP, P_TOPK, P_TOPP, P_MINP, P_PEN, P_LASTN, P_U = 0, 1, 2, 3, 4, 5, 6   # prm (float64)
N_PRM = 8
C_HIST, C_DONE1, C_DONE2, C_NCAND, C_BSTAR, C_NREST, C_NKEPT = 0, 1, 2, 3, 4, 5, 6  # ctl (int32)
N_CTL = 8
S_MAX, S_TAU, S_NFIN, S_MIN = 0, 1, 2, 3                                   # st (int64)
N_ST = 4
R_SEED, R_STEP = 0, 1                                                      # rng (uint64)
F_M = 0                                                                    # fctl (float64)

MAX_THREADS = 512        # block size bound (the tail kernel's registers: 1024 fails to launch)
MAX_PER = 16             # logits per thread bound (local candidate buffer)
MAX_TILE = 8192          # threads * per_thread bound (shared penalty flags)
NBINS = 4096             # top 12 bits of the value key: sign, exponent, 3 mantissa bits
BIN_SHIFT = 51           # key >> 51 = those 12 bits (the value key sits at bit 31)
SORT_CAP_MAX = 2048      # shared sort buffer (16 KB of int64)
ADAPT_K = 512            # top-k off, top-p on: the nucleus is looked for among this many first
RANK_MAX = 256           # up to this many keys are sorted by rank counting, more by a bitonic sort
RANK_PER = RANK_MAX // 32

MODE_W, MODE_ONE, MODE_EXP, MODE_TEMP = 0, 1, 2, 3   # weights: array, count, exp(v-M), exp((v-M)/T)
_I64_MAX = np.int64(0x7FFFFFFFFFFFFFFF)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INV53 = 1.0 / 9007199254740992.0
_M64 = (1 << 64) - 1


def splitmix_uniform(seed: int, step: int) -> float:
    """The device generator's uniform for (seed, step), in plain Python: output `step` of the
    splitmix64 stream started at `seed`, top 53 bits scaled to [0, 1)."""
    z = (int(seed) + (int(step) + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return (z >> 11) * _INV53


# ---------------------------------------------------------------------------------------------------
# Bit casts, the generator, the int64 warp max and the warp scan: device code on a GPU, Python twins
# in the simulator (which has no warp shuffles: its twins go through shared memory and barriers)

if SIM:
    # (ptx.py, imported above, makes the simulator's shared-array creation thread-safe)

    def _f2bits(v):
        return int(np.float32(v).view(np.uint32))

    def _uniform(seed, step):
        return splitmix_uniform(int(seed), int(step))

    def _warp_max_i64(v):
        buf = cuda.shared.array(MAX_THREADS, np.int64)   # one per block (keyed by line)
        t = cuda.threadIdx.x
        cuda.syncthreads()
        buf[t] = v
        cuda.syncthreads()
        base = t - t % 32
        r = np.int64(buf[base:min(base + 32, cuda.blockDim.x)].max())
        cuda.syncthreads()
        return r

    def _warp_scan_f64(v):
        buf = cuda.shared.array(MAX_THREADS, np.float64)
        t = cuda.threadIdx.x
        cuda.syncthreads()
        buf[t] = v
        cuda.syncthreads()
        r = float(np.sum(buf[t - t % 32:t + 1]))
        cuda.syncthreads()
        return r
else:
    from numba.cuda import libdevice

    @cuda_jit(device=True, inline=True, **_OPTS)
    def _f2bits(v):
        return np.int64(libdevice.float_as_int(np.float32(v))) & 0xFFFFFFFF

    @cuda_jit(device=True, inline=True, **_OPTS)
    def _uniform(seed, step):
        z = seed + (step + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
        return np.float64(z >> np.uint64(11)) * _INV53

    @cuda_jit(device=True, inline=True, **_OPTS)
    def _warp_max_i64(v):
        for m in (16, 8, 4, 2, 1):
            o = cuda.shfl_xor_sync(0xFFFFFFFF, v, m)
            if o > v:
                v = o
        return v

    @cuda_jit(device=True, inline=True, **_OPTS)
    def _warp_scan_f64(v):
        """Inclusive prefix sum over the lanes of a warp (Kogge-Stone, shfl.up)."""
        lane = cuda.threadIdx.x & 31
        for d in (1, 2, 4, 8, 16):
            o = cuda.shfl_up_sync(0xFFFFFFFF, v, d)
            if lane >= d:
                v += o
        return v


# ---------------------------------------------------------------------------------------------------
# Keys

@cuda_jit(device=True, inline=True, **_OPTS)
def _key(v, i):
    """The rank key of value v (float32) at index i: order-preserving value bits, then ~index."""
    b = _f2bits(v)
    if b == 0x80000000:
        b = 0          # -0.0 ranks with +0.0 (sample_ref's sort sees them equal)
    if b >= 0x80000000:
        k = b ^ 0xFFFFFFFF
    else:
        k = b | 0x80000000
    return (np.int64(k) << 31) | (0x7FFFFFFF - np.int64(i))


@cuda_jit(device=True, inline=True, **_OPTS)
def _kval(key):
    """The float64 value of the float32 a key ranks."""
    k = key >> 31
    if k >= 0x80000000:
        b = k ^ 0x80000000
    else:
        b = k ^ 0xFFFFFFFF
    return np.float64(ptx.f32_bits(b))


@cuda_jit(device=True, inline=True, **_OPTS)
def _kidx(key):
    return 0x7FFFFFFF - (key & 0x7FFFFFFF)


def key_host(value, index):
    """`_key` on the host (tests): the rank key of float32 `value` at `index`."""
    b = int(np.float32(value).view(np.uint32))
    if b == 0x80000000:
        b = 0
    k = b ^ 0xFFFFFFFF if b >= 0x80000000 else b | 0x80000000
    return (k << 31) | (0x7FFFFFFF - int(index))


@cuda_jit(device=True, inline=True, **_OPTS)
def _wkey(key, mode, M, inv_t):
    """Weight of a key: 1 (counting), exp(v - M) (top-p mass) or exp((v - M) / T) (the draw)."""
    if mode == MODE_ONE:
        return 1.0
    d = _kval(key) - M
    if mode == MODE_EXP:
        return math.exp(d)
    # d == 0 apart: a subnormal temperature makes inv_t infinite, and 0 * inf is NaN.
    if d < 0.0:
        return math.exp(d * inv_t)
    return 1.0


@cuda_jit(device=True, inline=True, **_OPTS)
def _pen_value(v, flagged, pen):
    """llama.cpp's penalty on one float32 logit, in float64 then rounded (as the CPU kernel)."""
    if flagged:
        if v <= 0.0:
            return np.float32(np.float64(v) * pen)
        return np.float32(np.float64(v) / pen)
    return v


# ---------------------------------------------------------------------------------------------------
# Block-wide helpers. All of them contain barriers: call them with every thread of the block, in
# block-uniform control flow.

@cuda_jit(device=True, **_OPTS)
def _mark_penalised(hist, prm, ctl, flags, base, tile):
    """flags[e] = 1 for the tile's logits named in the penalty window (once however often they
    appear: marking is idempotent, so no dedup is needed). Returns whether the penalty is on."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    pen = prm[P_PEN]
    last_n = np.int64(prm[P_LASTN])
    on = pen != 1.0 and last_n != 0
    if on:
        for e in range(t, tile, nt):
            flags[e] = 0
        cnt = np.int64(ctl[C_HIST])
        start = 0
        if last_n > 0 and cnt > last_n:
            start = cnt - last_n
        cuda.syncthreads()
        for w in range(start + t, cnt, nt):
            e = np.int64(hist[w]) - base
            if e >= 0 and e < tile:
                flags[e] = 1
        cuda.syncthreads()
    return on


@cuda_jit(device=True, **_OPTS)
def _block_max(v, wred):
    t = cuda.threadIdx.x
    lane = t & 31
    v = _warp_max_i64(v)
    if lane == 0:
        wred[t >> 5] = v
    cuda.syncthreads()
    x = np.int64(-1)
    if lane < (cuda.blockDim.x >> 5):
        x = wred[lane]
    x = _warp_max_i64(x)
    cuda.syncthreads()
    return x


@cuda_jit(device=True, **_OPTS)
def _block_sum(v, wsum):
    t = cuda.threadIdx.x
    lane = t & 31
    v = ptx.warp_sum(np.float64(v))
    if lane == 0:
        wsum[t >> 5] = v
    cuda.syncthreads()
    x = 0.0
    if lane < (cuda.blockDim.x >> 5):
        x = wsum[lane]
    x = ptx.warp_sum(x)
    cuda.syncthreads()
    return x


@cuda_jit(device=True, **_OPTS)
def _last_block(ctl, slot, ri):
    """True in the last block of the grid to get here (all others' writes are then visible)."""
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        ri[0] = 1 if cuda.atomic.add(ctl, slot, 1) == cuda.gridDim.x - 1 else 0
    cuda.syncthreads()
    last = ri[0] != 0
    if last:
        cuda.threadfence()
    return last


@cuda_jit(device=True, **_OPTS)
def _scan_inplace(tsum, wtot):
    """Inclusive prefix sum of tsum[:blockDim], in place: a shuffle scan in each warp, then each
    thread adds the totals of the warps before its own (two barriers, against 2 log2(threads) for
    a shared-memory scan). wtot: 32 float64 of shared scratch."""
    t = cuda.threadIdx.x
    w = t >> 5
    x = _warp_scan_f64(tsum[t])
    if (t & 31) == 31:
        wtot[w] = x
    cuda.syncthreads()
    off = 0.0
    for i in range(w):
        off += wtot[i]
    tsum[t] = x + off
    cuda.syncthreads()


@cuda_jit(device=True, **_OPTS)
def _cross(keys, w, n, mode, M, inv_t, need, frac, strict, tsum, wtot, ri, rf):
    """Where a cumulative sum crosses `need`, over weights in order: w[j] (mode MODE_W) or _wkey of
    keys[j]. With frac >= 0 the target is frac * (the total). Returns (r, above, total, lastpos):
    r the first position whose inclusive cumulative weight is >= need (> need when strict), -1 if
    none; above the cumulative weight before r; lastpos, when r is -1, the last position with a
    positive weight (else -1).
    Each thread sums a contiguous chunk, a block scan orders the chunks, and the one chunk where
    the sum crosses is walked again."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    per = (n + nt - 1) // nt
    j0 = min(t * per, n)
    j1 = min(j0 + per, n)
    s = 0.0
    lastpos = -1
    for j in range(j0, j1):
        x = np.float64(w[j]) if mode == MODE_W else _wkey(keys[j], mode, M, inv_t)
        s += x
        if x > 0.0:
            lastpos = j
    if t == 0:
        ri[2] = n
        ri[3] = -1
    tsum[t] = s
    cuda.syncthreads()
    _scan_inplace(tsum, wtot)
    incl = tsum[t]
    excl = tsum[t - 1] if t > 0 else 0.0
    total = tsum[nt - 1]
    if frac >= 0.0:
        need = frac * total
    if strict:
        hit = incl > need
        before = t > 0 and excl > need
    else:
        hit = incl >= need
        before = t > 0 and excl >= need
    if hit and not before and j0 < j1:
        acc = excl
        found = j1 - 1      # rounding between the scan and this walk: the chunk's end
        for j in range(j0, j1):
            acc += np.float64(w[j]) if mode == MODE_W else _wkey(keys[j], mode, M, inv_t)
            if (acc > need) if strict else (acc >= need):
                found = j
                break
        cuda.atomic.min(ri, 2, found)
    cuda.syncthreads()
    r = ri[2]
    if r < n and j0 <= r and r < j1:
        acc = excl
        for j in range(j0, r):
            acc += np.float64(w[j]) if mode == MODE_W else _wkey(keys[j], mode, M, inv_t)
        rf[0] = acc
    cuda.syncthreads()
    above = rf[0] if r < n else total
    lp = -1
    if r >= n:
        # Only then (rare: rounding) the last positive weight, one atomic per thread.
        if lastpos >= 0:
            cuda.atomic.max(ri, 3, lastpos)
        cuda.syncthreads()
        lp = ri[3]
    cuda.syncthreads()       # everyone has read ri/rf before the next call rewrites them
    if r >= n:
        r = -1
    return r, above, total, lp


@cuda_jit(device=True, **_OPTS)
def _load_sorted(cand, nc, lo, skeys, tsum, wsum):
    """Copy the keys >= lo of cand[:nc] into skeys (all of them when lo < 0) and sort them
    descending. Returns their count (the caller knows it fits). The filtered copy takes offsets
    from a block scan of per-thread counts: one shared counter for all would serialise."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    if lo < 0:
        for i in range(t, nc, nt):
            skeys[i] = cand[i]
        cnt = nc
    else:
        per = (nc + nt - 1) // nt
        j0 = min(t * per, nc)
        j1 = min(j0 + per, nc)
        c = 0
        for j in range(j0, j1):
            if cand[j] >= lo:
                c += 1
        tsum[t] = np.float64(c)
        cuda.syncthreads()
        _scan_inplace(tsum, wsum)
        o = np.int64(tsum[t]) - c
        cnt = np.int64(tsum[nt - 1])
        for j in range(j0, j1):
            key = cand[j]
            if key >= lo:
                skeys[o] = key
                o += 1
    cuda.syncthreads()
    if cnt <= RANK_MAX:
        # Few keys (the usual top-k case): each one's rank is the count of larger keys (unique
        # keys: a permutation). O(cnt^2 / threads) broadcast reads, two barriers instead of the
        # sort's log2(cnt)^2 / 2.
        kl = cuda.local.array(RANK_PER, np.int64)
        rk = cuda.local.array(RANK_PER, np.int64)
        m = 0
        for i in range(t, cnt, nt):
            key = skeys[i]
            r = 0
            for j in range(cnt):
                if skeys[j] > key:
                    r += 1
            kl[m] = key
            rk[m] = r
            m += 1
        cuda.syncthreads()
        for q in range(m):
            skeys[rk[q]] = kl[q]
        cuda.syncthreads()
        return cnt
    p = 2
    while p < cnt:
        p <<= 1
    for i in range(cnt + t, p, nt):
        skeys[i] = -1
    cuda.syncthreads()
    size = 2
    while size <= p:
        stride = size >> 1
        while stride > 0:
            for i in range(t, p >> 1, nt):
                a = ((i & ~(stride - 1)) << 1) | (i & (stride - 1))
                b = a + stride
                x = skeys[a]
                y = skeys[b]
                # Segments whose `size` bit is clear end descending, the others ascending; the
                # last merge (size == p) is all descending.
                if (x < y) == ((a & size) == 0):
                    skeys[a] = y
                    skeys[b] = x
            cuda.syncthreads()
            stride >>= 1
        size <<= 1
    return cnt


@cuda_jit(device=True, **_OPTS)
def _radix_select(cand, nc, lo, mode, M, inv_t, need, strict, hmass, hcnt, tsum, wsum, ri, rf):
    """Among the keys >= lo of cand[:nc], in descending order: the key where the cumulative weight
    (_wkey) first reaches `need` (exceeds it when strict): the k-th largest when counting, the end
    of a softmax-mass prefix otherwise. If the whole set falls short (rounding), its smallest key.
    8-bit digits from the top, one histogram pass each; stops once the chosen bin holds one key."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    prefix = np.int64(0)
    short = False
    for d in range(7, -1, -1):
        sh = 8 * d
        for q in range(t, 256, nt):
            hmass[q] = 0.0
            hcnt[q] = 0
        cuda.syncthreads()
        for i in range(t, nc, nt):
            key = cand[i]
            if key >= lo:
                ok = True
                if d < 7:
                    ok = (key >> (sh + 8)) == prefix
                if ok:
                    q = 255 - np.int64((key >> sh) & 255)    # bins in descending order
                    if mode != MODE_ONE:
                        cuda.atomic.add(hmass, q, _wkey(key, mode, M, inv_t))
                    cuda.atomic.add(hcnt, q, 1)
        cuda.syncthreads()
        r = -1
        above = 0.0
        if not short:
            if mode == MODE_ONE:
                r, above, total, lp = _cross(cand, hcnt, 256, MODE_W, M, inv_t, need, -1.0, strict,
                                             tsum, wsum, ri, rf)
            else:
                r, above, total, lp = _cross(cand, hmass, 256, MODE_W, M, inv_t, need, -1.0, strict,
                                             tsum, wsum, ri, rf)
            if r < 0:
                short = True
        if short:
            # Keep everything: descend through the lowest non-empty bins to the smallest key.
            if t == 0:
                ri[1] = -1
            cuda.syncthreads()
            for q in range(t, 256, nt):
                if hcnt[q] > 0:
                    cuda.atomic.max(ri, 1, q)
            cuda.syncthreads()
            r = ri[1]
            cuda.syncthreads()
        else:
            need -= above
        prefix = (prefix << 8) | (255 - r)
        single = hcnt[r] == 1
        # Everyone has read hcnt before the next pass clears it (else a late thread sees the bin
        # emptied, takes the other branch, and the block's barriers no longer match).
        cuda.syncthreads()
        if d == 0:
            return prefix
        if single:
            # One key left under this prefix: fetch it instead of more passes.
            for i in range(t, nc, nt):
                key = cand[i]
                if key >= lo and (key >> sh) == prefix:
                    ri[1] = key
            cuda.syncthreads()
            res = ri[1]
            cuda.syncthreads()
            return res
    return prefix


@cuda_jit(device=True, **_OPTS)
def _mass(cand, nc, lo, mode, M, inv_t, wsum):
    """Total weight of the keys >= lo of cand[:nc]."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    s = 0.0
    for i in range(t, nc, nt):
        key = cand[i]
        if key >= lo:
            s += _wkey(key, mode, M, inv_t)
    return _block_sum(s, wsum)


@cuda_jit(device=True, **_OPTS)
def _draw_sorted(skeys, c, M, inv_t, u, st, tsum, wsum, ri, rf):
    """Temperature and the draw over the c best sorted keys: the first whose cumulative weight
    exceeds u * total (the last with any weight if rounding leaves u above them all)."""
    r, above, total, lp = _cross(skeys, skeys, c, MODE_TEMP, M, inv_t, 0.0, u, True, tsum, wsum, ri, rf)
    if r < 0:
        r = lp if lp >= 0 else 0
    if cuda.threadIdx.x == 0:
        st[S_TAU] = skeys[c - 1]
        st[S_NFIN] = c
    return _kidx(skeys[r])


@cuda_jit(device=True, **_OPTS)
def _chain_sorted(skeys, kk, M, top_p, min_p, inv_t, zext, u, topk_on, st, tsum, wsum, ri, rf):
    """top-p, min-p, temperature and the draw over the kk best keys, sorted in skeys. The top-p
    mass is normalised over those kk (top-k on) or is the whole vocabulary's `zext` (top-k off)."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    c = kk
    if top_p < 1.0:
        if topk_on:
            r, above, total, lp = _cross(skeys, skeys, kk, MODE_EXP, M, inv_t, 0.0, top_p, False,
                                         tsum, wsum, ri, rf)
        else:
            r, above, total, lp = _cross(skeys, skeys, kk, MODE_EXP, M, inv_t, top_p * zext, -1.0,
                                         False, tsum, wsum, ri, rf)
        if r >= 0:
            c = r + 1
    if min_p > 0.0:
        thr = M + math.log(min_p)
        if t == 0:
            ri[1] = c
        cuda.syncthreads()
        # Sorted: the one position where the values cross the threshold writes it.
        for j in range(t + 1, c, nt):
            if _kval(skeys[j]) < thr and not _kval(skeys[j - 1]) < thr:
                ri[1] = j
        cuda.syncthreads()
        cm = ri[1]
        cuda.syncthreads()
        c = max(cm, 1)
    return _draw_sorted(skeys, c, M, inv_t, u, st, tsum, wsum, ri, rf)


@cuda_jit(device=True, **_OPTS)
def _chain_generic(cand, nc, lo, M, top_p, min_p, inv_t, zext, u, topk_on, sort_cap, st, skeys,
                   hmass, hcnt, tsum, wsum, wred, ri, rf):
    """The chain over the keys >= lo of a candidate set too large to sort: every stage keeps a
    prefix of the descending order, so each is a threshold key and the final set is the keys at or
    above the largest of them."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    tau = lo
    if top_p < 1.0:
        z = zext
        if topk_on:
            z = _mass(cand, nc, lo, MODE_EXP, M, inv_t, wsum)
        tp = _radix_select(cand, nc, lo, MODE_EXP, M, inv_t, top_p * z, False, hmass, hcnt, tsum,
                           wsum, ri, rf)
        if tp > tau:
            tau = tp
    if min_p > 0.0:
        thr = M + math.log(min_p)
        low = _I64_MAX
        for i in range(t, nc, nt):
            key = cand[i]
            if key >= lo and _kval(key) >= thr and key < low:
                low = key
        tm = _I64_MAX - _block_max(_I64_MAX - low, wred)
        if tm > tau:
            tau = tm
    # The final set's size, and its smallest key (tau may be a bound below it: -1, or min-p's).
    low = _I64_MAX
    c = 0.0
    for i in range(t, nc, nt):
        key = cand[i]
        if key >= tau:
            c += 1.0
            if key < low:
                low = key
    nf = np.int64(_block_sum(c, wsum))
    tau = _I64_MAX - _block_max(_I64_MAX - low, wred)
    if nf <= sort_cap:
        _load_sorted(cand, nc, tau, skeys, tsum, wsum)
        return _draw_sorted(skeys, nf, M, inv_t, u, st, tsum, wsum, ri, rf)
    wt = _mass(cand, nc, tau, MODE_TEMP, M, inv_t, wsum)
    td = _radix_select(cand, nc, tau, MODE_TEMP, M, inv_t, u * wt, True, hmass, hcnt, tsum, wsum, ri, rf)
    if t == 0:
        st[S_TAU] = tau
        st[S_NFIN] = nf
    return _kidx(td)


@cuda_jit(device=True, **_OPTS)
def _draw_by_index(logits, hist, prm, ctl, st, zpart, flags, skeys, M, thr, inv_t, u, n, tile, tsum,
                   wsum, ri, rf):
    """The draw over min-p's survivors (or everything) in index order, from the blocks' partial
    weights in zpart: the block whose cumulative weight first exceeds u * total, then, within its
    tile (re-read and re-penalised here), the token, a chunk of sort buffer at a time."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    g = cuda.gridDim.x
    rb, above, total, lpb = _cross(skeys, zpart, g, MODE_W, M, inv_t, 0.0, u, True, tsum, wsum,
                                   ri, rf)
    need = u * total - above
    if rb < 0:
        rb = lpb if lpb >= 0 else 0
        need = math.inf                   # rounding: the last token with any weight
    base = rb * tile
    pen = prm[P_PEN]
    pen_on = _mark_penalised(hist, prm, ctl, flags, base, tile)
    ntile = min(tile, n - base)
    tok = np.int64(-1)
    last = base
    for c0 in range(0, ntile, SORT_CAP_MAX):
        clen = min(SORT_CAP_MAX, ntile - c0)
        for e in range(t, clen, nt):
            i = base + c0 + e
            v = _pen_value(logits[i], pen_on and flags[c0 + e] != 0, pen)
            if not np.float64(v) >= thr:
                v = np.float32(-math.inf)      # out of the set: weight 0, same order
            skeys[e] = _key(v, i)
        cuda.syncthreads()
        r, a2, tot2, lp2 = _cross(skeys, skeys, clen, MODE_TEMP, M, inv_t, need, -1.0, True, tsum,
                                  wsum, ri, rf)
        if r >= 0:
            tok = base + c0 + r
            break
        if lp2 >= 0:
            last = base + c0 + lp2
        need -= tot2
    if tok < 0:
        tok = last
    if t == 0:
        st[S_NFIN] = cuda.atomic.exch(ctl, C_NKEPT, 0)
        st[S_TAU] = cuda.atomic.exch(st, S_MIN, _I64_MAX)
    return tok


@cuda_jit(device=True, **_OPTS)
def _emit(tok, out_token, hist, ctl, prm, rng):
    """One thread: publish the token, append it to the history, advance the generator."""
    out_token[0] = tok
    c = ctl[C_HIST]
    if c < hist.shape[0]:
        hist[c] = tok
        ctl[C_HIST] = c + 1
    rng[R_STEP] = rng[R_STEP] + np.uint64(1)
    prm[P_U] = -1.0     # a forced u serves one call


# ---------------------------------------------------------------------------------------------------
# Kernels

@cuda_jit(**_OPTS)
def _k_scan(logits, hist, prm, ctl, st, rng, fctl, ghist, out_token, n, per):
    """Pass 1: the penalised maximum (and, top-k on, the key histogram); greedy finishes here."""
    flags = cuda.shared.array(MAX_TILE, np.uint8)
    shist = cuda.shared.array(NBINS, np.int32)
    tsum = cuda.shared.array(MAX_THREADS, np.float64)
    wred = cuda.shared.array(32, np.int64)
    wsum = cuda.shared.array(32, np.float64)
    ri = cuda.shared.array(4, np.int64)
    rf = cuda.shared.array(2, np.float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    tile = nt * per
    base = cuda.blockIdx.x * tile
    k = np.int64(prm[P_TOPK])
    # top_k = 1 keeps one token whatever the rest says: the argmax, as greedy.
    sampling = prm[P_TEMP] > 0.0 and k != 1
    topk_on = sampling and k > 0 and k < n
    # top-k off, top-p on: bin for the ADAPT_K best too (pass 2 keeps them apart, see _k_select).
    hist_on = topk_on or (sampling and prm[P_TOPP] < 1.0)
    pen = prm[P_PEN]
    pen_on = _mark_penalised(hist, prm, ctl, flags, base, tile)
    if hist_on:
        for q in range(t, NBINS, nt):
            shist[q] = 0
        cuda.syncthreads()
    best = np.int64(-1)
    for j in range(per):
        e = j * nt + t
        i = base + e
        if i < n:
            v = _pen_value(logits[i], pen_on and flags[e] != 0, pen)
            key = _key(v, i)
            if key > best:
                best = key
            if hist_on:
                cuda.atomic.add(shist, key >> BIN_SHIFT, 1)
    best = _block_max(best, wred)
    if t == 0:
        cuda.atomic.max(st, S_MAX, best)
    if hist_on:
        cuda.syncthreads()
        for q in range(t, NBINS, nt):
            c = shist[q]
            if c != 0:
                cuda.atomic.add(ghist, q, c)
    if not _last_block(ctl, C_DONE1, ri):
        return
    # ---- the last block
    if t == 0:
        ri[1] = cuda.atomic.exch(st, S_MAX, np.int64(-1))
    cuda.syncthreads()
    top = ri[1]
    if not sampling:
        if t == 0:
            st[S_TAU] = top
            st[S_NFIN] = 1
            _emit(_kidx(top), out_token, hist, ctl, prm, rng)
            ctl[C_DONE1] = 0
        return
    if hist_on:
        # The bin holding the k-th largest key, walking down from the top bin; the global
        # histogram is cleared for the next call as it is read.
        for q in range(t, NBINS, nt):
            shist[q] = ghist[NBINS - 1 - q]
            ghist[NBINS - 1 - q] = 0
        cuda.syncthreads()
        kt = k if topk_on else min(np.int64(ADAPT_K), n)
        r, above, total, lp = _cross(st, shist, NBINS, MODE_W, 0.0, 0.0, np.float64(kt), -1.0, False,
                                     tsum, wsum, ri, rf)
        if t == 0:
            ctl[C_BSTAR] = NBINS - 1 - r
    if t == 0:
        fctl[F_M] = _kval(top)
        ctl[C_DONE1] = 0


@cuda_jit(**_OPTS)
def _k_select(logits, hist, prm, ctl, st, rng, fctl, cand, zpart, out_token, n, per, sort_cap):
    """Pass 2 (sampling only): every block filters its tile; the last block runs the rest of the
    chain. Three cases, from the parameters (block-uniform):

    * top-k on: the keys in or above the k-th key's bin go to `cand` (a superset of the top k);
    * top-k off, top-p on: the logits that pass min-p, split into the ones in or above the bin of
      the ADAPT_K-th key (front of `cand`) and the others (back of `cand`), and the whole
      vocabulary's softmax mass per block in zpart (top-p normalises over it);
    * top-k and top-p off: nothing is compacted. The final set (min-p's survivors, or everything)
      is known here, so each block sums its tokens' weights exp((v - M) / T) into zpart, and the
      draw walks the vocabulary in index order: the block whose partial sum crosses u, then its
      tile.
    """
    temp = prm[P_TEMP]
    if not temp > 0.0 or np.int64(prm[P_TOPK]) == 1:
        return              # greedy (or top_k = 1): pass 1 has done everything
    flags = cuda.shared.array(MAX_TILE, np.uint8)
    skeys = cuda.shared.array(SORT_CAP_MAX, np.int64)
    hmass = cuda.shared.array(256, np.float64)
    hcnt = cuda.shared.array(256, np.int32)
    tsum = cuda.shared.array(MAX_THREADS, np.float64)
    wsum = cuda.shared.array(32, np.float64)
    wred = cuda.shared.array(32, np.int64)
    ri = cuda.shared.array(4, np.int64)
    rf = cuda.shared.array(2, np.float64)
    loc = cuda.local.array(MAX_PER, np.int64)
    loc2 = cuda.local.array(MAX_PER, np.int64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    b = cuda.blockIdx.x
    tile = nt * per
    base = b * tile
    k = np.int64(prm[P_TOPK])
    topk_on = k > 0 and k < n
    top_p = prm[P_TOPP]
    min_p = prm[P_MINP]
    pen = prm[P_PEN]
    inv_t = 1.0 / temp
    M = fctl[F_M]
    bstar = np.int64(ctl[C_BSTAR])
    thr = -math.inf
    if min_p > 0.0:
        thr = M + math.log(min_p)
    nucleus = (not topk_on) and top_p < 1.0
    by_index = (not topk_on) and not top_p < 1.0
    pen_on = _mark_penalised(hist, prm, ctl, flags, base, tile)
    cnt = 0
    cnt2 = 0
    z = 0.0
    low = _I64_MAX
    for j in range(per):
        e = j * nt + t
        i = base + e
        if i < n:
            v = _pen_value(logits[i], pen_on and flags[e] != 0, pen)
            key = _key(v, i)
            if topk_on:
                if (key >> BIN_SHIFT) >= bstar:
                    loc[cnt] = key
                    cnt += 1
            else:
                d = np.float64(v) - M
                if nucleus:
                    z += math.exp(d)
                if np.float64(v) >= thr:
                    if by_index:
                        z += math.exp(d * inv_t) if d < 0.0 else 1.0
                        cnt += 1
                        if key < low:
                            low = key
                    elif (key >> BIN_SHIFT) >= bstar:
                        loc[cnt] = key
                        cnt += 1
                    else:
                        loc2[cnt2] = key
                        cnt2 += 1
    if by_index:
        z = _block_sum(z, wsum)
        c = _block_sum(np.float64(cnt), wsum)
        low = _I64_MAX - _block_max(_I64_MAX - low, wred)
        if t == 0:
            zpart[b] = z
            cuda.atomic.add(ctl, C_NKEPT, np.int32(c))
            cuda.atomic.min(st, S_MIN, low)
    else:
        # One global atomic per block and list; within the block, offsets from a scan of the
        # threads' counts (both lists at once: cnt + 65536 * cnt2 is exact in float64, and a
        # tile holds fewer than 65536 logits). A shared counter for all would serialise.
        mine = np.float64(cnt) + 65536.0 * np.float64(cnt2)
        tsum[t] = mine
        cuda.syncthreads()
        _scan_inplace(tsum, wsum)
        ex = np.int64(tsum[t] - mine)
        tot = np.int64(tsum[nt - 1])
        off = ex & 0xFFFF
        off2 = ex >> 16
        if t == 0:
            ri[2] = cuda.atomic.add(ctl, C_NCAND, np.int32(tot & 0xFFFF))
            if (tot >> 16) > 0:
                ri[0] = cuda.atomic.add(ctl, C_NREST, np.int32(tot >> 16))
        cuda.syncthreads()
        g = ri[2] + off
        for j in range(cnt):
            cand[g + j] = loc[j]
        g2 = n - 1 - (ri[0] + off2)       # the others fill `cand` from the back
        for j in range(cnt2):
            cand[g2 - j] = loc2[j]
        if nucleus:
            z = _block_sum(z, wsum)
            if t == 0:
                zpart[b] = z
    if not _last_block(ctl, C_DONE2, ri):
        return
    # ---- the last block: the rest of the chain
    u = prm[P_U]
    if u < 0.0:
        u = _uniform(rng[R_SEED], rng[R_STEP])
    if by_index:
        tok = _draw_by_index(logits, hist, prm, ctl, st, zpart, flags, skeys, M, thr, inv_t, u, n,
                             tile, tsum, wsum, ri, rf)
    else:
        if t == 0:
            ri[1] = cuda.atomic.exch(ctl, C_NCAND, 0)
            ri[3] = cuda.atomic.exch(ctl, C_NREST, 0)
        cuda.syncthreads()
        nc = np.int64(ri[1])
        nrest = np.int64(ri[3])
        cuda.syncthreads()
        zext = 0.0
        if nucleus:
            s = 0.0
            for q in range(t, cuda.gridDim.x, nt):
                s += zpart[q]
            zext = _block_sum(s, wsum)
        tok = np.int64(-1)
        if nucleus and nc <= sort_cap:
            # Adaptive top-p (llama.cpp's trick): the ADAPT_K or so best are a prefix of the
            # order; if the nucleus ends among them the cut is exact and the rest is not looked at.
            _load_sorted(cand, nc, np.int64(-1), skeys, tsum, wsum)
            r, above, total, lp = _cross(skeys, skeys, nc, MODE_EXP, M, inv_t, top_p * zext, -1.0,
                                         False, tsum, wsum, ri, rf)
            if r >= 0 or nrest == 0:
                # (No others: min-p ends the set before top-p would; the candidates passed it.)
                tok = _draw_sorted(skeys, r + 1 if r >= 0 else nc, M, inv_t, u, st, tsum, wsum,
                                   ri, rf)
        if nucleus and tok < 0:
            # A wider nucleus: bring the others next to the best (order does not matter).
            m = min(n - nrest - nc, nrest)
            for q in range(t, m, nt):
                cand[nc + q] = cand[n - m + q]
            nc += nrest
            cuda.syncthreads()
        if tok < 0:
            kk = k if topk_on else n
            if nc <= sort_cap:
                _load_sorted(cand, nc, np.int64(-1), skeys, tsum, wsum)
                tok = _chain_sorted(skeys, min(kk, nc), M, top_p, min_p, inv_t, zext, u, topk_on,
                                    st, tsum, wsum, ri, rf)
            else:
                lo = np.int64(-1)
                ns = nc
                if topk_on:
                    lo = _radix_select(cand, nc, lo, MODE_ONE, M, inv_t, np.float64(k), False,
                                       hmass, hcnt, tsum, wsum, ri, rf)
                    ns = k
                if ns <= sort_cap:
                    _load_sorted(cand, nc, lo, skeys, tsum, wsum)
                    tok = _chain_sorted(skeys, ns, M, top_p, min_p, inv_t, zext, u, topk_on, st,
                                        tsum, wsum, ri, rf)
                else:
                    tok = _chain_generic(cand, nc, lo, M, top_p, min_p, inv_t, zext, u, topk_on,
                                         sort_cap, st, skeys, hmass, hcnt, tsum, wsum, wred, ri, rf)
    if t == 0:
        _emit(tok, out_token, hist, ctl, prm, rng)
        ctl[C_DONE2] = 0
