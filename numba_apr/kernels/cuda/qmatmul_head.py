"""Output heads on the GPU (decoding one token over a vocabulary of rows, plain stores).

`_make_head_kernel` builds the kernel that qmatmul.py's `qmatmul` launches for a decode product
of HEAD_ROWS rows or more: four rows a warp (or, for rows of an odd number of 16-unit halves,
two rows a half-warp), read through the units of qmatrix.py, its input's 1 / rms applied as in
the decode products (qmatmul_decode.py).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..._numba import cuda_jit
from . import ptx
from .launch import overlapped
from .qmatmul_decode import _env_int, _rms_scale
from .qmatrix import WARPS, _row_unit, _store


# Output heads (decoding, a vocabulary of rows, plain stores): a warp takes HEAD_RW consecutive
# rows, each lane the same units of the four, so that a lane has four rows' loads in flight at
# once (HEAD_RW * UNROLL units) and the blocks are a quarter as many. A kernel of its own: as a
# plan of the shared decode kernel, the code written for any rows a warp ran every other product
# slower. As this kernel: 0.5B-shaped head 77 -> 56 us, 7B 241 -> 189
# (docs/experiments.md#four-rows-a-warp).
HEAD_ROWS, HEAD_RW = 32768, 4
# Half-warp rows. Lanes walk a row's units 32 apart, so rows of 48 units (K = 1,536: the 1.5B's)
# take 64 unit slots, 16 of them weighted 0: a lane of the head computes 8 unit products where
# 6 would do. Rows of an odd number of 16-unit halves, up to HALF_MAX_UNITS (16 or 48: past
# that, 5+ units a lane), go to half-warps instead: lanes 0-15 take two of the warp's rows,
# lanes 16-31 the other two, 3 units of each a lane (the 1.5B's head 105.4 -> 80.9 us,
# docs/experiments.md#half-warp-rows). NUMBA_APR_HALF_MAX_UNITS sets the bound (0: off, to
# measure it).
# Tried and not kept: half-warp rows in the decode kernel's two-row warps (docs/experiments.md#half-warp-rows-in-two-row-warps)
HALF_MAX_UNITS = _env_int("NUMBA_APR_HALF_MAX_UNITS", 48)


def _head_plan(n_units: int) -> tuple[int, int]:
    """(UNROLL, LW) of an output head of n_units units a row: units a lane a trip, lanes a row.
    The kernel takes up to 3 units a lane, so half-warps stop at 48 units whatever the bound."""
    if n_units % 32 == 16 and n_units <= min(HALF_MAX_UNITS, 48):
        return n_units // 16, 16
    return 2 if n_units > 32 else 1, 32


def _make_head_kernel(unit, UNROLL, LW):
    assert UNROLL <= 3 and LW in (16, 32), (UNROLL, LW)
    HALF = LW == 16          # lanes 0-15 take rows r, r + 1, lanes 16-31 rows r + 2, r + 3
    NRL = HEAD_RW // 2 if HALF else HEAD_RW   # rows a lane

    @cuda_jit(device=True, inline=True)
    def add(acc, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, rows, u, keep, xq, xd, xs):
        """acc[i] += keep * unit u of row r + i, i < NRL (written out: a loop over the rows stays
        a loop in the PTX, with one row's loads in flight)."""
        acc[0] += keep * _row_unit(unit, w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r, rows - 1), u, xq, xd, xs)
        acc[1] += keep * _row_unit(unit, w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r + 1, rows - 1), u, xq, xd, xs)
        if NRL == 4:
            acc[2] += keep * _row_unit(unit, w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r + 2, rows - 1), u, xq, xd, xs)
            acc[3] += keep * _row_unit(unit, w, o_qh, o_sc, s_qs, s_qh, s_sc, min(r + 3, rows - 1), u, xq, xd, xs)

    @overlapped
    @cuda_jit
    def kernel(out, col, w, o_qh, o_sc, s_qs, s_qh, s_sc, rows, n_units, xq, xd, xs, ss_in, eps, bias,
               accumulate_out):
        lane = cuda.threadIdx.x & 31
        r = (cuda.blockIdx.x * WARPS + (cuda.threadIdx.x >> 5)) * HEAD_RW
        if HALF:
            r += NRL * (lane >> 4)
        ptx.grid_dep()
        acc = cuda.local.array(NRL, np.float32)
        for j in range(NRL):
            acc[j] = 0.0
        one, zero = np.float32(1.0), np.float32(0.0)
        last = n_units - 1
        for u0 in range(lane & (LW - 1), n_units, LW * UNROLL):
            add(acc, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, rows, u0, one, xq, xd, xs)
            # (as in the decode kernel: more units, each weighted 0 past the row)
            if UNROLL >= 2:
                add(acc, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, rows, min(u0 + LW, last),
                    one if u0 + LW < n_units else zero, xq, xd, xs)
            if UNROLL >= 3:
                add(acc, w, o_qh, o_sc, s_qs, s_qh, s_sc, r, rows, min(u0 + 2 * LW, last),
                    one if u0 + 2 * LW < n_units else zero, xq, xd, xs)
        scale = _rms_scale(ss_in, eps, lane)
        for j in range(NRL):
            v = ptx.lanes_sum(acc[j], LW) * scale
            if (lane & (LW - 1)) == 0 and r + j < rows:
                _store(out, bias, col + r + j, 0, v, accumulate_out)
    return kernel
