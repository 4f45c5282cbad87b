"""Element-wise and row-wise CPU kernels of the transformer: RMSNorm, RoPE, bias, gated
activations, residual add, embedding scale, rounding to float16. Each has a float64 NumPy reference `<name>_ref`
beside it (the tests' oracle).

All kernels write into buffers the caller owns (the RunState), so the decode loop allocates
nothing. Shapes are [rows, width] float32, C-contiguous; a row is one token (or one head of one
token, for the per-head norms).
"""
import math

import numpy as np

from ..._numba import jit, pjit, prange
from ...model.quants import _bits_f32, _to_f16

GELU_C = math.sqrt(2.0 / math.pi)


@jit
def rmsnorm_row(out, x, w, eps):
    """One row (1-D): out = x / sqrt(mean(x^2) + eps) * w. `out` may be `x`."""
    n = x.shape[0]
    ss = np.float32(0.0)
    for i in range(n):
        ss += x[i] * x[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
    for i in range(n):
        out[i] = x[i] * inv * w[i]


@pjit
def rmsnorm(out, x, w, eps):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w. `out` may be `x` (in place)."""
    for r in prange(x.shape[0]):
        rmsnorm_row(out[r], x[r], w, eps)


def rmsnorm_ref(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w.astype(np.float64)


@jit
def rope_row(x, p, n_heads, head_dim, rope_dim, base, neox):
    """`rope` on one token's row x[n_heads * head_dim] at position p."""
    half = rope_dim // 2
    for i in range(half):
        theta = p * base ** (-2.0 * i / rope_dim)
        c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
        for h in range(n_heads):
            o = h * head_dim
            a, b = (o + i, o + i + half) if neox else (o + 2 * i, o + 2 * i + 1)
            x0, x1 = x[a], x[b]
            x[a] = x0 * c - x1 * s
            x[b] = x0 * s + x1 * c


@jit
def rope(x, positions, n_heads, head_dim, rope_dim, base, neox):
    """Rotary position embedding, in place, on x[T, n_heads * head_dim] at the given positions.

    The first `rope_dim` dims of each head rotate by angle pos * base^(-2i/rope_dim). NeoX style
    pairs dim i with i + rope_dim/2; the original (GPT-J / llama) style pairs 2i with 2i+1.
    Angles are computed in float64 once per (token, pair) and shared by all heads.
    """
    for t in range(x.shape[0]):
        rope_row(x[t], positions[t], n_heads, head_dim, rope_dim, base, neox)


def rope_ref(x, positions, n_heads, head_dim, rope_dim, base, neox):
    x = x.astype(np.float64).reshape(x.shape[0], n_heads, head_dim).copy()
    half = rope_dim // 2
    inv = base ** (-2.0 * np.arange(half) / rope_dim)
    ang = np.asarray(positions, np.float64)[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        a, b = x[..., :half].copy(), x[..., half:rope_dim].copy()
        x[..., :half], x[..., half:rope_dim] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., 0:rope_dim:2].copy(), x[..., 1:rope_dim:2].copy()
        x[..., 0:rope_dim:2], x[..., 1:rope_dim:2] = a * c - b * s, a * s + b * c
    return x.reshape(x.shape[0], -1)


@jit
def add_bias(x, b):
    """x[r] += b, in place."""
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[r, i] += b[i]


@pjit
def add(x, y):
    """x += y, in place (the residual connection)."""
    for r in prange(x.shape[0]):
        for i in range(x.shape[1]):
            x[r, i] += y[r, i]


@jit
def take_rows(out, x, rows):
    """out[i] = x[rows[i]]."""
    for i in range(rows.shape[0]):
        out[i] = x[rows[i]]


@jit
def scale(x, s):
    """x *= s, in place."""
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[r, i] *= np.float32(s)


@jit(inline="always")
def _expf(x):
    """exp(x) for float32 x, within 2 ulp, in plain arithmetic that LLVM vectorises (a libm
    call per element does not): exp(x) = 2^k exp(r), r = x - k ln2 in [-ln2/2, ln2/2], exp(r)
    by its degree-6 Taylor polynomial, 2^k put in the exponent bits. Below -87.3 it flushes to 0
    (where exp underflows float32 anyway)."""
    x = min(max(x, np.float32(-87.3)), np.float32(88.7))
    k = np.floor(x * np.float32(1.44269504) + np.float32(0.5))
    r = x - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)  # ln2 in two parts
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _bits_f32(np.uint32(np.int32(k) + np.int32(127)) << np.uint32(23))


@jit
def gated_span(g_row, u_row, gelu):
    """`gated_act` on a 1-D span: g_row = act(g_row) * u_row."""
    if gelu:
        for i in range(g_row.shape[0]):
            g = g_row[i]
            a = np.float32(0.5) * g * (np.float32(1.0) + np.tanh(
                np.float32(GELU_C) * g * (np.float32(1.0) + np.float32(0.044715) * g * g)))
            g_row[i] = a * u_row[i]
    else:
        for i in range(g_row.shape[0]):
            g = g_row[i]
            g_row[i] = g / (np.float32(1.0) + _expf(-g)) * u_row[i]


@pjit
def gated_act(gate, up, gelu):
    """gate = act(gate) * up, in place: SwiGLU (SiLU) or GeGLU (GELU, tanh approximation).
    Split over rows and column blocks, so one decoding token uses every thread too."""
    rows, n = gate.shape
    nb = (n + 1023) // 1024
    for rb in prange(rows * nb):
        r, b = rb // nb, rb % nb
        gated_span(gate[r, b * 1024:min(n, b * 1024 + 1024)], up[r, b * 1024:min(n, b * 1024 + 1024)], gelu)


def gated_act_ref(gate, up, gelu):
    g, u = gate.astype(np.float64), up.astype(np.float64)
    if gelu:
        a = 0.5 * g * (1.0 + np.tanh(GELU_C * (g + 0.044715 * g ** 3)))
    else:
        a = g / (1.0 + np.exp(-g))
    return a * u


@jit
def round_f16(x):
    """x rounded to the nearest float16 values, in place (kept as float32). llama.cpp stores the
    KV cache in f16; rounding what we store the same way keeps our attention on its inputs."""
    rows, n = x.shape
    for r in range(rows):
        for i in range(n):
            x[r, i] = _to_f16(x[r, i])


def round_f16_ref(x):
    with np.errstate(over="ignore"):  # beyond the f16 range: inf, as the kernel gives
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)
