"""Quantizers: float32 rows -> raw GGUF tensor bytes, and llama.cpp's Q4_K_M type recipe.

`quantize(x, qtype)` turns a float32 matrix [rows, cols] into the raw uint8 rows
[rows, row_bytes] that GGUF stores (the layout `numba_apr.model.quants` decodes), for F32, F16, Q8_0,
Q5_0, Q4_K and Q6_K: the types llama.cpp's Q4_K_M mixture uses. `quantize_into` writes into a
caller's buffer, so a model writer can stream a big tensor through one reused buffer.

How each type picks its scales (the algorithms of ggml's reference quantizers,
`quantize_row_*_ref` in ggml-quants.c, which `llama-quantize` runs when it has no importance
matrix; written anew here):
- Q8_0 / Q5_0: one scale per 32 values from the largest magnitude (Q5_0 maps the signed extreme
  to -16, so the asymmetric range -16..15 is used in full). These are byte for byte ggml's (and
  gguf-py's) output; the tests check that against `gguf.quants.quantize`.
- Q4_K: per 32-value sub-block an affine fit x ~ scale * q - min (q in 0..15, min >= 0): the
  min/max grid, then a grid of candidate inverse scales, each refitted by weighted least
  squares (weights |x| + rms, which favour the large values a matmul is most sensitive to);
  the lowest error wins. The 8 scales and 8 mins are then quantized to 6 bits against two f16
  super-scales, and the values quantized against the scales as stored.
- Q6_K: per 16-value sub-block a symmetric fit x ~ scale * q (q in -32..31), the best of a grid
  of candidate scales by x^2-weighted least squares; the 16 scales go to int8 against one f16 d.
The K-quant grids are coarser than llama.cpp's by default (`NSTEP`): on Gaussian weights our
Q4_K has a relative RMS error of 0.0719 where llama-quantize's has 0.0713, and Q6_K 0.01775
for both, at a fraction of the search cost. `nstep` gives llama.cpp's grids when asked.

Kernels: `pjit` over rows, one `jit` function per block format. The Q8_0/Q5_0/F16 helpers are
compiled without fast-math so their float rounding is exactly the reference's (a fused
multiply-add could flip a truncation); the K-quant searches use the package's fast-math so
LLVM vectorises their sums.

`q4_k_m_type(name, dims, n_layer, tied)` is the type llama.cpp's `llama_tensor_get_type` picks
for LLAMA_FTYPE_MOSTLY_Q4_K_M (see its docstring).
"""
from __future__ import annotations

import re

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .._numba import jit, pjit, prange
from .quants import _half as _half_value, _half_bits, _nearest

_Q = GGMLQuantizationType
F32, F16, Q8_0, Q5_0, Q4_K, Q6_K = (int(_Q.F32), int(_Q.F16), int(_Q.Q8_0), int(_Q.Q5_0),
                                    int(_Q.Q4_K), int(_Q.Q6_K))
#: Types `quantize` can write.
QUANTIZABLE = (F32, F16, Q8_0, Q5_0, Q4_K, Q6_K)
#: Default length of the K-quants' scale search (see `quantize_into`).
NSTEP = {Q4_K: 8, Q6_K: 4}

_U = np.uint64  # unsigned indices: no negative-index wrap test per access (see quants.py)
_F = np.float32
_EXACT = dict(fastmath=False)  # bit-exact float rounding (see the module docstring)


# ---------------------------------------------------------------------------------------------
# Scalar helpers (inlined into their callers, so they take the caller's fast-math setting).


@jit(inline="always")
def _put_half(out, o, f):
    """Store float32 `f` as a little-endian half at out[o]; returns the value as stored."""
    h = _half_bits(f)
    out[_U(o)] = np.uint8(h & np.uint32(0xFF))
    out[_U(o + 1)] = np.uint8(h >> np.uint32(8))
    return _half_value(h)


# ---------------------------------------------------------------------------------------------
# Block quantizers: the block whose first value is x[xo] goes to out[oo : oo + type_size].


@jit(inline="always")
def _signed_absmax(x, xo, n):
    """(the first of x[xo:xo+n] with the largest magnitude, that magnitude)."""
    m = _F(0.0)
    amax = _F(0.0)
    for j in range(n):
        v = x[_U(xo + j)]
        if abs(v) > amax:
            amax = abs(v)
            m = v
    return m, amax


@jit(**_EXACT)
def _q8_0_block(x, xo, out, oo):
    # 34 bytes: f16 d, 32 x int8; d = max|x| / 127, q = round(x / d) (ties away from zero)
    amax = _F(0.0)
    for j in range(32):
        amax = max(amax, abs(x[_U(xo + j)]))
    d = amax / _F(127.0)
    inv = _F(1.0) / d if d != _F(0.0) else _F(0.0)
    _put_half(out, oo, d)
    for j in range(32):
        v = x[_U(xo + j)] * inv
        a = abs(v)
        r = np.floor(a)
        r += np.floor(_F(2.0) * (a - r))  # round half away from zero, like C's roundf
        q = np.int32(r) if v >= _F(0.0) else -np.int32(r)
        out[_U(oo + 2 + j)] = np.uint8(q & 0xFF)


@jit(**_EXACT)
def _q5_0_block(x, xo, out, oo):
    # 22 bytes: f16 d, uint32 qh (bit j = 5th bit of value j), 16 bytes of low nibbles (value j
    # in the low nibble of byte j, value j + 16 in its high nibble); x = d * (q - 16).
    # d = m / -16 where m is the value of largest magnitude: m lands on q = 0, the end of the
    # range with room for it (-16), so every value of the range is usable.
    m, amax = _signed_absmax(x, xo, 32)
    d = m / _F(-16.0)
    inv = _F(1.0) / d if d != _F(0.0) else _F(0.0)
    _put_half(out, oo, d)
    qh = np.uint32(0)
    for j in range(16):
        a = min(31, np.int32(x[_U(xo + j)] * inv + _F(16.5)))  # truncation, as ggml's (int8_t) cast
        b = min(31, np.int32(x[_U(xo + 16 + j)] * inv + _F(16.5)))
        out[_U(oo + 6 + j)] = np.uint8((a & 0xF) | ((b & 0xF) << 4))
        qh |= np.uint32((a >> 4) & 1) << np.uint32(j)
        qh |= np.uint32((b >> 4) & 1) << np.uint32(j + 16)
    for k in range(4):
        out[_U(oo + 2 + k)] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


@jit(inline="always")
def _clamp_round(t, lo, hi):
    """rint(t) clamped to [lo, hi], in float (np.rint vectorises to one instruction)."""
    return min(hi, max(lo, np.rint(t)))


@jit
def _fit_affine(x, xo, w, nmax, nstep):
    """Fit x[xo : xo + n] ~ scale * q - mn, q integer in 0..nmax, mn >= 0 (n = len(w), the
    weights). Returns (scale, mn).

    Candidates: the plain min/max grid, then `nstep + 1` inverse scales evenly spread from
    (nmax - 1) / range to (nmax + 1) / range (llama.cpp: nstep = 20, steps of 0.1). For each
    candidate the rounded q are fixed and (scale, -mn) solved by weighted least squares, with
    -mn kept <= 0 (the scale alone is refitted when it comes out positive). At a least-squares
    solution the weighted squared error is sum(w x^2) - scale * sum(w q x) + mn * sum(w x), so
    a candidate costs one pass for three sums and no q are stored: the caller quantizes
    against the winning scales once they are rounded for storage.
    """
    n = w.shape[0]
    lo = x[_U(xo)]
    hi = lo
    sw = _F(0.0)
    swx = _F(0.0)
    swxx = _F(0.0)
    for i in range(n):
        v = x[_U(xo + i)]
        lo = min(lo, v)
        hi = max(hi, v)
        wi = w[_U(i)]
        sw += wi
        swx += wi * v
        swxx += wi * v * v
    lo = min(lo, _F(0.0))  # the grid must reach 0 (the stored offset cannot be positive)
    if hi == lo:
        return _F(0.0), -lo
    fmax = _F(nmax)
    width = hi - lo
    iscale = fmax / width
    scale = _F(1.0) / iscale
    mn = lo
    best = _F(0.0)  # the min/max grid is not a least-squares fit: score it directly
    for i in range(n):
        v = x[_U(xo + i)]
        e = scale * _clamp_round(iscale * (v - lo), _F(0.0), fmax) + lo - v
        best += w[_U(i)] * e * e
    for step in range(nstep + 1):
        iscale = (fmax - _F(1.0) + _F(2.0) / _F(max(nstep, 1)) * _F(step)) / width
        sl = _F(0.0)
        sl2 = _F(0.0)
        sxl = _F(0.0)
        for i in range(n):
            v = x[_U(xo + i)]
            q = _clamp_round(iscale * (v - lo), _F(0.0), fmax)
            wq = w[_U(i)] * q
            sl += wq
            sl2 += wq * q
            sxl += wq * v
        det = sw * sl2 - sl * sl
        if det > _F(0.0):
            s = (sw * sxl - swx * sl) / det
            m = (sl2 * swx - sl * sxl) / det
            if m > _F(0.0):
                m = _F(0.0)
                s = sxl / sl2
            err = swxx - s * sxl - m * swx
            if err < best:
                best = err
                scale = s
                mn = m
    return scale, -mn


@jit
def _q4_k_block(x, xo, out, oo, w, scales, mins, nstep):
    # 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) pairs, 128 bytes of nibbles
    # (bytes 32c..32c+31: sub-block 2c in the low nibbles, 2c+1 in the high ones);
    # x = d * sc * q - dmin * mc for the sub-block's 6-bit sc, mc. w (32), scales, mins (8):
    # scratch.
    max_scale = _F(0.0)
    max_min = _F(0.0)
    for j in range(8):
        s2 = _F(0.0)
        for i in range(32):
            v = x[_U(xo + 32 * j + i)]
            s2 += v * v
        rms = np.sqrt(s2 / _F(32.0))
        for i in range(32):
            w[_U(i)] = rms + abs(x[_U(xo + 32 * j + i)])
        s, m = _fit_affine(x, xo + 32 * j, w, 15, nstep)
        scales[j] = s
        mins[j] = m
        max_scale = max(max_scale, s)
        max_min = max(max_min, m)
    inv_s = _F(63.0) / max_scale if max_scale > _F(0.0) else _F(0.0)
    inv_m = _F(63.0) / max_min if max_min > _F(0.0) else _F(0.0)
    sc = oo + 4
    for k in range(12):
        out[_U(sc + k)] = 0
    for j in range(8):
        # clamped below too: a negative fit (pathological data) must not wrap around in uint8
        ls = min(63, max(0, _nearest(inv_s * scales[j])))
        lm = min(63, max(0, _nearest(inv_m * mins[j])))
        if j < 4:
            out[_U(sc + j)] = np.uint8(ls)
            out[_U(sc + j + 4)] = np.uint8(lm)
        else:  # low 4 bits in byte j + 4, top 2 bits in the spare top bits of bytes j - 4, j
            out[_U(sc + j + 4)] = np.uint8((ls & 0xF) | ((lm & 0xF) << 4))
            out[_U(sc + j - 4)] |= np.uint8((ls >> 4) << 6)
            out[_U(sc + j)] |= np.uint8((lm >> 4) << 6)
        scales[j] = _F(ls)
        mins[j] = _F(lm)
    d = _put_half(out, oo, max_scale / _F(63.0))
    dmin = _put_half(out, oo + 2, max_min / _F(63.0))
    # Quantize against the scales as the decoder will read them. A sub-block whose scale
    # rounded to 0 decodes to -dmin * mc whatever its q: those get q = 0.
    q = oo + 16
    for c in range(4):
        d0 = d * scales[2 * c]
        d1 = d * scales[2 * c + 1]
        i0 = _F(1.0) / d0 if d0 != _F(0.0) else _F(0.0)
        i1 = _F(1.0) / d1 if d1 != _F(0.0) else _F(0.0)
        m0 = dmin * mins[2 * c]
        m1 = dmin * mins[2 * c + 1]
        for i in range(32):
            a = _clamp_round((x[_U(xo + 64 * c + i)] + m0) * i0, _F(0.0), _F(15.0))
            b = _clamp_round((x[_U(xo + 64 * c + 32 + i)] + m1) * i1, _F(0.0), _F(15.0))
            out[_U(q + 32 * c + i)] = np.uint8(a) | (np.uint8(b) << np.uint8(4))


@jit
def _fit_symmetric(x, xo, nmax, nstep):
    """Fit x[xo : xo + 16] ~ scale * q, q integer in -nmax..nmax-1, weights x^2. Returns scale.

    The value of largest magnitude, m, is mapped to -nmax (the end of the range with room for
    it); then inverse scales -(nmax + k * 0.9 / h) / m for k = +-1..+-h, h = nstep // 2, are
    tried (llama.cpp: nstep = 18, steps of 0.1). Each is scored by its least-squares scale
    sum(w q x) / sum(w q^2), whose error falls as sum(w q x)^2 / sum(w q^2) rises."""
    m, amax = _signed_absmax(x, xo, 16)
    if amax < _F(1e-15):
        return _F(0.0)
    fmax = _F(nmax)
    half = nstep // 2
    delta = _F(0.9) / _F(max(half, 1))
    scale = _F(0.0)
    best = _F(0.0)
    for k in range(-half, half + 1):
        # k = 0, the base, is tried first and always taken
        kk = 0 if k == -half else (k - 1 if k <= 0 else k)
        iscale = -(fmax + delta * _F(kk)) / m
        sxl = _F(0.0)
        sl2 = _F(0.0)
        for i in range(16):
            v = x[_U(xo + i)]
            q = _clamp_round(iscale * v, -fmax, fmax - _F(1.0))
            wq = v * v * q
            sxl += wq * v
            sl2 += wq * q
        if kk == 0 or (sl2 > _F(0.0) and sxl * sxl > best * sl2):
            scale = sxl / sl2 if sl2 > _F(0.0) else _F(0.0)
            best = scale * sxl
    return scale


@jit
def _q6_k_block(x, xo, out, oo, L, scales, nstep):
    # 210 bytes: ql[128] low nibbles, qh[64] 2-bit highs, 16 int8 scales, f16 d;
    # x = d * sc * (q - 32), q in 0..63 (layout in quants._dq_q6_k). L (256), scales (16):
    # scratch.
    max_scale = _F(0.0)
    amax = _F(0.0)
    for j in range(16):
        s = _fit_symmetric(x, xo + 16 * j, 32, nstep)
        scales[j] = s
        if abs(s) > amax:
            amax = abs(s)
            max_scale = s
    if amax < _F(1e-15):
        for k in range(210):
            out[_U(oo + k)] = 0
        return
    iscale = _F(-128.0) / max_scale  # the largest scale becomes -128: int8's wider end
    d = _put_half(out, oo + 208, _F(1.0) / iscale)
    for j in range(16):
        ls = min(127, _nearest(iscale * scales[j]))
        out[_U(oo + 192 + j)] = np.uint8(ls & 0xFF)
        dj = d * _F(ls)
        inv = _F(1.0) / dj if dj != _F(0.0) else _F(0.0)  # scale 0: any q decodes to 0
        for i in range(16):
            L[_U(16 * j + i)] = np.uint8(_clamp_round(x[_U(xo + 16 * j + i)] * inv, _F(-32.0), _F(31.0)) + _F(32.0))
    for h in range(2):
        ql = oo + 64 * h
        qh = oo + 128 + 32 * h
        b = 128 * h
        for i in range(32):
            q0 = L[_U(b + i)]
            q1 = L[_U(b + 32 + i)]
            q2 = L[_U(b + 64 + i)]
            q3 = L[_U(b + 96 + i)]
            out[_U(ql + i)] = (q0 & np.uint8(0xF)) | ((q2 & np.uint8(0xF)) << np.uint8(4))
            out[_U(ql + 32 + i)] = (q1 & np.uint8(0xF)) | ((q3 & np.uint8(0xF)) << np.uint8(4))
            out[_U(qh + i)] = ((q0 >> np.uint8(4)) | ((q1 >> np.uint8(4)) << np.uint8(2))
                               | ((q2 >> np.uint8(4)) << np.uint8(4)) | ((q3 >> np.uint8(4)) << np.uint8(6)))


@jit(**_EXACT)
def _f16_row(x, out):
    for i in range(x.shape[0]):
        h = _half_bits(x[_U(i)])
        out[_U(2 * i)] = np.uint8(h & np.uint32(0xFF))
        out[_U(2 * i + 1)] = np.uint8(h >> np.uint32(8))


@jit
def _quantize_row(x, qtype, out, nstep):
    n = x.shape[0]
    if qtype == Q4_K:
        w = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        for b in range(n // 256):
            _q4_k_block(x, 256 * b, out, 144 * b, w, scales, mins, nstep)
    elif qtype == Q6_K:
        L = np.empty(256, np.uint8)
        scales = np.empty(16, np.float32)
        for b in range(n // 256):
            _q6_k_block(x, 256 * b, out, 210 * b, L, scales, nstep)
    elif qtype == Q8_0:
        for b in range(n // 32):
            _q8_0_block(x, 32 * b, out, 34 * b)
    elif qtype == Q5_0:
        for b in range(n // 32):
            _q5_0_block(x, 32 * b, out, 22 * b)
    elif qtype == F16:
        _f16_row(x, out)


@pjit
def _quantize_rows(x, qtype, out, nstep):
    for r in prange(x.shape[0]):
        _quantize_row(x[r], qtype, out[r], nstep)


def row_bytes(qtype, n: int) -> int:
    """Bytes of a row of `n` values of type `qtype` (n must be a whole number of blocks)."""
    block, size = GGML_QUANT_SIZES[_Q(int(qtype))]
    if n % block:
        raise ValueError(f"{_Q(int(qtype)).name} rows hold a multiple of {block} values, not {n}")
    return n // block * size


def quantize_into(x: np.ndarray, qtype, out: np.ndarray, nstep: int | None = None) -> np.ndarray:
    """Quantize float32 rows `x` [rows, n] into `out` (uint8 [rows, row_bytes(qtype, n)]).

    `nstep`: the K-quants' scale search, the number of intervals of the grid of candidate
    scales (None: `NSTEP[qtype]`). llama.cpp searches Q4_K with 20 and Q6_K with 18; the
    defaults here are coarser grids over the same span, several times faster for an error
    under 0.5% larger (measured on Gaussian data: relative RMS error 0.0719 against 0.0717 for
    Q4_K, 0.01750 against 0.01749 for Q6_K)."""
    qtype = int(qtype)
    if qtype not in QUANTIZABLE:
        raise ValueError(f"cannot quantize to {_Q(qtype).name} (supported: "
                         f"{', '.join(_Q(t).name for t in QUANTIZABLE)})")
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError(f"quantize wants C-contiguous float32 rows, got {x.dtype} {x.shape}")
    nb = row_bytes(qtype, x.shape[1])
    if out.dtype != np.uint8 or out.shape != (x.shape[0], nb) or not out.flags.c_contiguous:
        raise ValueError(f"output must be C-contiguous uint8 {(x.shape[0], nb)}, got {out.dtype} {out.shape}")
    if qtype == F32:
        out.view(np.float32)[...] = x
    else:
        _quantize_rows(x, qtype, out, int(NSTEP.get(qtype, 0) if nstep is None else nstep))
    return out


def quantize(x, qtype, nstep: int | None = None) -> np.ndarray:
    """Raw GGUF bytes of float32 `x` (1D: one row; 2D: [rows, n]) as type `qtype`:
    uint8 [rows, row_bytes] (1D in, 1D out)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    out = np.empty((rows.shape[0], row_bytes(qtype, rows.shape[1])), np.uint8)
    quantize_into(rows, qtype, out, nstep)
    return out if x.ndim == 2 else out.reshape(-1)


# ---------------------------------------------------------------------------------------------
# llama.cpp's Q4_K_M recipe.

_LAYER = re.compile(r"blk\.(\d+)\.")
# What llama.cpp substitutes when a row is not a whole number of the chosen type's blocks.
_FALLBACK = {Q4_K: Q5_0, Q6_K: Q8_0, int(_Q.Q5_K): int(_Q.Q5_1)}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of the layers that get a bigger type: the first and last eighth,
    and every third layer in between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def q4_k_m_type(name: str, dims, n_layer: int, tied: bool) -> GGMLQuantizationType:
    """The type llama.cpp's `llama_tensor_get_type` gives tensor `name` (GGUF dims, ne0 first)
    of an `n_layer`-layer llama-like model (no experts) in a Q4_K_M file.

    - 1D tensors, and norms, stay float32 (as the converter wrote them).
    - output.weight, or token_embd.weight when the output is tied to it: Q6_K (Q8_0 when its
      rows are not a multiple of 256).
    - attn_v and ffn_down of the layers `use_more_bits` picks: Q6_K. llama.cpp counts these
      tensors in the order it visits them, which is layer order (its loader sorts tensor
      names by layer number), so the counter is the layer index.
    - Everything else: Q4_K.
    Then where a row (ne0) is not a whole number of blocks: Q4_K -> Q5_0, Q6_K -> Q8_0, and
    F16 if even the fallback's 32 does not divide it.
    """
    dims = tuple(int(d) for d in dims)
    if len(dims) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return _Q.F32
    t = Q4_K
    layer = _LAYER.match(name)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        t = Q8_0 if dims[0] % 256 else Q6_K
    elif layer and ("attn_v.weight" in name or "ffn_down" in name):
        if use_more_bits(int(layer.group(1)), n_layer):
            t = Q6_K
    block = GGML_QUANT_SIZES[_Q(t)][0]
    if dims[0] % block:
        t = _FALLBACK[t]
        if dims[0] % GGML_QUANT_SIZES[_Q(t)][0]:
            t = F16
    return _Q(t)
