"""Token sampling on the GPU (numba.cuda): the CPU sampler's chain, graph-capturable.

`DeviceSampler.sample(logits, out_token, stream)` reads a float32 logits vector in device memory
and writes the drawn token id to out_token[0] (an int32 device array), appends it to a device-side
token history and advances a device-side random counter. It launches two kernels and nothing else:
no allocation, no host synchronisation, no host<->device copy, so a decode step
forward -> logits -> sample can be captured in one CUDA graph, and only the token id comes back.
Every top_k runs on the device (there is no host fallback: `graph_capturable` is always True).

The chain is llama.cpp's, as `numba_apr.sampling` states it (`sample_ref` is the specification):
repetition penalty over the last repeat_last_n history tokens -> top-k -> top-p -> min-p ->
temperature -> a draw at a uniform u, in float64. The caller's logits are never written: the
penalty is applied on the fly wherever a kernel reads a logit (each block marks the history
tokens that fall in its tile in shared memory).

Order and ties. Every logit is ranked by a 63-bit key: the order-preserving bits of its (penalised)
float32 value above the complement of its index. Keys are unique, and descending key order is a
stable descending sort (equal values: lower index first), i.e. sample_ref's argsort. So greedy
returns the first index among equal maxima, a tie at the k-th value keeps the lower indices, and
the draw walks the kept tokens in that order: the first whose cumulative probability exceeds u.
One exception: with top-k and top-p both off, the draw walks the kept tokens in index order (see
below); the distribution is the same, only the token a given u maps to differs.

The two kernels (a grid of ceil(n_vocab / (threads * per_thread)) blocks of `threads`, each thread
reading `per_thread` logits; 256 x 4 by default). Neither needs a grid-wide barrier: the last
block to finish (threadfence + a done counter, CUDA's threadFenceReduction pattern) does the
serial part.

* `_k_scan`: every block reduces its penalised tile to its largest key (warp shuffles) and does one
  atomicMax; with top-k (or top-p) on it also bins its keys' top 12 bits (sign, exponent, three
  mantissa bits) into a shared histogram merged into a global one. The last block reads the
  maximum M. Greedy (temperature <= 0, or top_k = 1) ends here. Else it walks the histogram from
  the top to the bin holding the k-th largest key (top_k, or ADAPT_K = 512 with top-k off).
* `_k_select` (returns at once when greedy): every block re-reads its tile, then by parameters:
  - top-k on: the keys in or above that bin (a superset of the top k: normally tens to hundreds)
    are compacted into a candidate buffer. The last block sorts them in shared memory (rank
    counting up to 256, bitonic up to sort_cap = 2048; radix select for the k-th key first when
    there are more), then runs top-p / min-p / temperature / the draw as block scans;
  - top-k off, top-p on: the min-p survivors are compacted, the ~ADAPT_K best apart from the
    rest, and the whole vocabulary's softmax mass is summed per block (top-p normalises over it).
    As llama.cpp does, the nucleus is first looked for among the best, exactly; only a wider one
    brings the rest in;
  - top-k and top-p off: the final set (min-p's survivors or everything) is known, so each block
    sums its weights exp((v - M) / T) and the draw walks the vocabulary in index order: the
    block whose partial sum crosses u, then, re-read, its tile.
  Candidate sets too large to sort (flat logits, top_k above 2048, a nucleus wider than the best
  ~512 with min-p off) go through radix select (8-bit digits over the keys, with count or
  softmax-mass histograms) in the last block alone: correct for any k, but slow (milliseconds on
  a 152k vocabulary).

On a 152k vocabulary (H100): greedy ~10 us, llama.cpp's defaults ~30 us, the radix path
milliseconds; most of it is the last blocks' serial work (docs/experiments.md#sampler-timings).

Parameters (temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, and a forced u for
tests) live in a small device array written by __init__/reset, so one captured graph serves any
of them (scalar kernel arguments would be frozen into the graph). The random uniform is
splitmix64(seed + (step + 1) * golden) >> 11 scaled to [0, 1) (`splitmix_uniform` on the host),
with the step counter in device memory, advanced by every sample (greedy included, as the CPU
Sampler draws u on every call).

Under NUMBA_ENABLE_CUDASIM=1 the same kernels run in numba's simulator: the bit casts, the
generator and the warp reductions have plain-Python twins (as in ptx.py), and importing this
module there makes the simulator's shared-array allocation thread-safe (see
_thread_safe_sim_shared). Use small `threads` / `per_thread` there.

Here: `DeviceSampler`, the host side. The device side (the two kernels, the device functions
they are made of, the generator and the layout of the small device arrays) is in
sampling_kernels.py; the names of it that callers use (`splitmix_uniform`, `key_host`, the
layout constants) are re-exported here.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ...errors import NumbaAprError
from .sampling_kernels import (  # noqa: F401  (re-exported: the layout, splitmix_uniform, key_host)
    ADAPT_K, BIN_SHIFT, C_BSTAR, C_DONE1, C_DONE2, C_HIST, C_NCAND, C_NKEPT, C_NREST, F_M,
    MAX_PER, MAX_THREADS, MAX_TILE, MODE_EXP, MODE_ONE, MODE_TEMP, MODE_W, N_CTL, N_PRM, N_ST, NBINS,
    P_LASTN, P_MINP, P_PEN, P_TEMP, P_TOPK, P_TOPP, P_U, R_SEED, R_STEP, RANK_MAX, RANK_PER, S_MAX,
    S_MIN, S_NFIN, S_TAU, SIM, SORT_CAP_MAX, _I64_MAX, _M64, _OPTS, _k_scan, _k_select, _kidx, _key,
    _kval, key_host, splitmix_uniform)
from ...sampling import SamplingParams, resolve_seed


# ---------------------------------------------------------------------------------------------------
# Python side

def _pow2(x):
    return x > 0 and (x & (x - 1)) == 0


class DeviceSampler:
    """The sampling chain of `numba_apr.sampling.Sampler`, on the device, graph-capturable.

    Every device buffer is allocated here, once. `threads` (a power of two, 32..512) and
    `per_thread` (1..16) set the launch: ceil(n_vocab / (threads * per_thread)) blocks of `threads`;
    `sort_cap` (1..2048) is the largest candidate set sorted in shared memory (tests lower it to
    reach the radix-select paths with small vocabularies). The history holds n_ctx tokens; once
    full, sampled tokens are no longer appended (a context is never longer than n_ctx).
    """

    graph_capturable = True   # no host fallback: every top_k runs on the device

    def __init__(self, n_vocab: int, params: SamplingParams, n_ctx: int, *, threads: int = 256,
                 per_thread: int = 4, sort_cap: int = SORT_CAP_MAX):
        if isinstance(n_vocab, bool) or not isinstance(n_vocab, (int, np.integer)) or n_vocab < 1:
            raise NumbaAprError(f"n_vocab must be a positive integer, got {n_vocab!r}")
        if n_vocab >= 1 << 31:
            raise NumbaAprError(f"n_vocab must be below 2**31, got {n_vocab}")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
            raise NumbaAprError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        if not isinstance(params, SamplingParams):
            raise NumbaAprError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        if not (_pow2(threads) and 32 <= threads <= MAX_THREADS):
            raise NumbaAprError(f"threads must be a power of two in [32, {MAX_THREADS}], got {threads}")
        if not 1 <= per_thread <= MAX_PER or threads * per_thread > MAX_TILE:
            raise NumbaAprError(f"per_thread must be in [1, {MAX_PER}] with threads * per_thread <= "
                                f"{MAX_TILE}, got {per_thread}")
        if not 1 <= sort_cap <= SORT_CAP_MAX:
            raise NumbaAprError(f"sort_cap must be in [1, {SORT_CAP_MAX}], got {sort_cap}")
        self.n_vocab = int(n_vocab)
        self.n_ctx = int(n_ctx)
        self.params = params
        self.threads = int(threads)
        self.per_thread = int(per_thread)
        self.sort_cap = int(sort_cap)
        self.grid = -(-self.n_vocab // (self.threads * self.per_thread))
        # Greedy, pass 2 would return at once (the same test as _k_select's): not launched. Its
        # launch alone cost ~6 us a token (H100, 0.5B tg128 1680 -> 1698 tok/s without it).
        self._greedy = not params.temperature > 0 or int(params.top_k) == 1
        n = self.n_vocab
        self._prm = cuda.to_device(self._params_host(params, -1.0))
        self._ctl = cuda.to_device(np.zeros(N_CTL, np.int32))
        st = np.full(N_ST, -1, np.int64)
        st[S_MIN] = _I64_MAX
        self._st = cuda.to_device(st)
        self._rng = cuda.to_device(np.zeros(2, np.uint64))
        self._fctl = cuda.to_device(np.zeros(2, np.float64))
        self._ghist = cuda.to_device(np.zeros(NBINS, np.int32))
        self._cand = cuda.device_array(n, np.int64)
        self._zpart = cuda.device_array(self.grid, np.float64)
        self._hist = cuda.to_device(np.zeros(self.n_ctx, np.int32))
        self.reset()

    @staticmethod
    def _params_host(p, u):
        a = np.zeros(N_PRM, np.float64)
        a[P_TEMP] = p.temperature
        a[P_TOPK] = p.top_k
        a[P_TOPP] = p.top_p
        a[P_MINP] = p.min_p
        a[P_PEN] = float(np.float32(p.repeat_penalty))   # llama.cpp's penalty is a float32
        a[P_LASTN] = p.repeat_last_n
        a[P_U] = u
        return a

    def reset(self, seed=None, stream=0):
        """Re-seed the device generator (step 0): with `seed`, else params.seed, else OS entropy.
        A host->device copy: not inside a graph."""
        seed = resolve_seed(seed, self.params.seed)
        self._rng.copy_to_device(np.array([seed & _M64, 0], np.uint64), stream=stream)
        self._prm.copy_to_device(self._params_host(self.params, -1.0), stream=stream)

    def set_history(self, tokens, stream=0):
        """Copy the token history (prompt + generated so far, oldest first) to the device and set
        its count; `sample` appends from there. Host->device copies: not inside a graph."""
        tok = np.ascontiguousarray(np.asarray(tokens).reshape(-1))
        if tok.size and (not np.issubdtype(tok.dtype, np.integer) or tok.min() < 0
                         or tok.max() >= self.n_vocab):
            raise NumbaAprError(f"history holds id(s) outside the vocabulary [0, {self.n_vocab})")
        if tok.size > self.n_ctx:
            raise NumbaAprError(f"history of {tok.size} tokens exceeds n_ctx = {self.n_ctx}")
        tok = tok.astype(np.int32, copy=False)
        if tok.size:
            self._hist[:tok.size].copy_to_device(tok, stream=stream)
        ctl = np.zeros(N_CTL, np.int32)
        ctl[C_HIST] = tok.size
        self._ctl.copy_to_device(ctl, stream=stream)

    def sample(self, logits, out_token, stream=0, u=None):
        """Draw one token: out_token[0] = the id (int32 device array), appended to the device
        history; the generator advances. `logits` (float32 device array of n_vocab) is only read.
        Two kernel launches on `stream` (one when greedy), nothing else: graph-capturable.

        `u` (tests): a float in [0, 1) replaces the generator's uniform for this call only (it is
        written to the parameter array: a host->device copy, so not for graphs)."""
        if getattr(logits, "shape", None) != (self.n_vocab,) or logits.dtype != np.float32:
            raise NumbaAprError(f"logits must be a float32 device array of {self.n_vocab} values")
        if u is not None:
            if not 0.0 <= float(u) < 1.0:
                raise NumbaAprError(f"u must be in [0, 1), got {u!r}")
            self._prm.copy_to_device(self._params_host(self.params, float(u)), stream=stream)
        args = (logits, self._hist, self._prm, self._ctl, self._st, self._rng, self._fctl)
        _k_scan[self.grid, self.threads, stream](*args, self._ghist, out_token, self.n_vocab,
                                                 self.per_thread)
        if not self._greedy:
            _k_select[self.grid, self.threads, stream](*args, self._cand, self._zpart, out_token,
                                                       self.n_vocab, self.per_thread, self.sort_cap)

    # Inspection (synchronous device->host copies: tests and debugging, never in a decode loop).

    def history(self):
        """The device history, as a host int32 array."""
        n = int(self._ctl.copy_to_host()[C_HIST])
        return self._hist.copy_to_host()[:n]

    @property
    def step(self) -> int:
        """How many uniforms the device generator has used since the last reset."""
        return int(self._rng.copy_to_host()[R_STEP])

    def last_selection(self):
        """(count, last id) of the previous call's final candidate set, the tokens the draw chose
        among: `count` tokens, ending (in descending value order, lower id first on ties) at `last`."""
        st = self._st.copy_to_host()
        return int(st[S_NFIN]), int(_kidx_host(int(st[S_TAU])))


def _kidx_host(key):
    return 0x7FFFFFFF - (key & 0x7FFFFFFF)
