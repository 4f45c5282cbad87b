"""Quantized matrix-vector product: GB/s of weights streamed (higher is faster).

Decoding one token is a chain of matrix-vector products whose weights come from memory, so
the speed of `numba_apr.kernels.cpu.qmatmul.qmatmul` on one activation row ([1, K]) over a
repacked weight matrix, in bytes of repacked weights per second, is the figure that bounds
tg (llama.cpp's decode) speed. Shapes are Qwen2.5-1.5B's (N output rows x K inputs):

    q,o      1536 x 1536     attn_q.weight, attn_output.weight
    k,v       256 x 1536     attn_k.weight, attn_v.weight
    gate,up  8960 x 1536     ffn_gate.weight, ffn_up.weight
    down     1536 x 8960     ffn_down.weight
    output 151936 x 1536     output.weight (the tied token embedding)

Weights are random N(0, 0.02) floats (fixed seed) quantized by `numba_apr.model.quantize.quantize`
(gguf-py's `gguf.quants.quantize` for the types it lacks: Q4_1) and repacked by
`qmatmul.repack`; their values do not change the kernel's speed. Several copies of the matrix
are cycled through, so that the weights come from memory as in a real decode step, not from a
cache that a small matrix would fit in: `WORKING_SET` bytes at least, more than twice the
last-level cache. Threads: Numba's default (every core; set
NUMBA_NUM_THREADS to change it).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

SHAPES = {  # label -> (N, K)
    "q,o 1536x1536": (1536, 1536),
    "k,v 256x1536": (256, 1536),
    "gate,up 8960x1536": (8960, 1536),
    "down 1536x8960": (1536, 8960),
    "output 151936x1536": (151936, 1536),
}
UNIQUE_ROWS = 512  # random rows quantized and repacked; the matrix repeats them


def _llc_bytes() -> int:
    """Size of the largest CPU cache Linux reports (0 if unknown)."""
    sizes = [0]
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes)


#: Bytes of weights cycled through per benchmark: 256 MiB, or 2.5x the last-level cache if larger.
WORKING_SET = max(256 << 20, int(2.5 * _llc_bytes()))


class _Product:
    """`copies` repacked copies of one N x K matrix of `qtype`, an input row and the buffers."""

    def __init__(self, n: int, k: int, qtype: str, seed: int = 0):
        try:
            from gguf import GGMLQuantizationType
            from numba_apr.kernels.cpu.qmatmul import GROUP, PackedMatrix, QScratch, qmatmul, repack
            from numba_apr.model.quantize import quantize
        except ImportError:  # a commit from before the integer kernels
            raise NotImplementedError("no numba_apr.kernels.cpu.qmatmul in this commit")
        qt = int(GGMLQuantizationType[qtype])
        rng = np.random.default_rng(seed)
        rows = min(n, UNIQUE_ROWS)
        x = rng.normal(0.0, 0.02, (rows, k)).astype(np.float32)
        try:
            raw = quantize(x, qt)
        except ValueError:  # a type numba_apr's quantizer lacks (Q4_1): gguf-py's reference one
            from gguf.quants import quantize as gguf_quantize
            raw = gguf_quantize(x, GGMLQuantizationType(qt))
        unique = repack(f"{qtype} {n}x{k}", raw, qt, k).data  # [rows / GROUP, bytes per group]
        groups = -(-n // GROUP)
        self.nbytes = groups * unique.shape[1]  # == repack(...).data.nbytes of the whole matrix
        copies = max(1, WORKING_SET // self.nbytes)
        # Groups of 16 rows are independent in the repacked layout: a matrix that repeats the
        # unique rows is the unique groups repeated. Written in place, no temporary.
        data = np.empty((copies, groups, unique.shape[1]), np.uint8)
        for g0 in range(0, groups, unique.shape[0]):
            g1 = min(groups, g0 + unique.shape[0])
            data[:, g0:g1] = unique[:g1 - g0]
        data.setflags(write=False)  # read-only, as the model's memory-mapped weights are
        self.mats = [PackedMatrix(f"copy {c}", qt, n, k, data[c]) for c in range(copies)]
        self.x = rng.standard_normal((1, k)).astype(np.float32)
        self.out = np.empty((1, n), np.float32)
        self.scratch = QScratch(1, k)
        self.qmatmul = qmatmul
        self.sweep()  # compile (or load from Numba's cache) and fault every page in

    def sweep(self) -> int:
        for m in self.mats:
            self.qmatmul(self.out, self.x, m, self.scratch)
        return len(self.mats)

    def gbps(self, samples: int = 5, min_seconds: float = 0.1) -> float:
        """Median over `samples` of the weight bytes per second of back-to-back products,
        each sample at least `min_seconds` long and whole sweeps over the copies."""
        rates = []
        for _ in range(samples):
            calls, t0 = 0, time.perf_counter()
            while True:
                calls += self.sweep()
                dt = time.perf_counter() - t0
                if dt >= min_seconds:
                    break
            rates.append(calls * self.nbytes / dt / 1e9)
        return statistics.median(rates)


class QMatVec:
    """Q4_K and Q6_K (the Q4_K_M recipe's two main types) at every Qwen2.5-1.5B matrix shape."""

    params = (list(SHAPES), ["Q4_K", "Q6_K"])
    param_names = ["matrix", "type"]
    unit = "GB/s"
    timeout = 300  # the first process of a fresh install compiles the kernels

    def setup(self, matrix, qtype):
        self.product = _Product(*SHAPES[matrix], qtype)

    def track_weights_gbps(self, matrix, qtype):
        """GB/s of repacked weights through `qmatmul(out, x[1, K], W)`: bytes of W over the
        median time of one product, W cycled with copies so that it streams from memory."""
        return self.product.gbps()


class QMatVecByType:
    """Every tensor type that the 32-block and K-quant kernels serve, at one shape
    (ffn_gate/ffn_up, 8960 x 1536): compare the formats' kernels with each other. Q4_K and
    Q6_K here are the same measurement as in QMatVec's "gate,up" row."""

    params = (["Q4_K", "Q6_K", "Q8_0", "Q5_0", "Q4_1"],)
    param_names = ["type"]
    unit = "GB/s"
    timeout = 300

    def setup(self, qtype):
        self.product = _Product(*SHAPES["gate,up 8960x1536"], qtype)

    def track_weights_gbps(self, qtype):
        """GB/s of repacked weights through `qmatmul(out, x[1, 1536], W[8960, 1536])`."""
        return self.product.gbps()
