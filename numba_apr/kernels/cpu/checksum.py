"""A checksum of a byte buffer at memory speed: how the repacked-weights cache (packing.py)
finds a file damaged after it was written.

checksum(data) = sum over the 8-byte words w[i] of (w[i] ^ i * K1) * K2, modulo 2^64 (the last
partial word zero-padded, the length mixed in). K2 is odd, so changing any one word changes the
sum; the index term makes moved or swapped words count too. A sum is associative, so each thread
sums a contiguous range and the result does not depend on the thread count. Not a defence
against someone who can write the cache (they can write its manifest too): a detector of damage.
"""
import numpy as np

from ..._numba import pjit, prange

K1 = np.uint64(0x9E3779B97F4A7C15)
K2 = np.uint64(0xC2B2AE3D27D4EB4F)


@pjit
def _partial_sums(words, out):
    n, nc = words.shape[0], out.shape[0]
    for c in prange(nc):
        a = np.uint64(0)
        for i in range(c * n // nc, (c + 1) * n // nc):
            a += (words[i] ^ (np.uint64(i) * K1)) * K2
        out[c] = a


def _split(data: np.ndarray):
    """The whole 8-byte words as uint64 (a view) and the last partial word, zero-padded."""
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    n8 = data.size // 8 * 8
    tail = np.zeros(8, np.uint8)
    tail[:data.size - n8] = data[n8:]
    return data[:n8].view(np.uint64), tail.view(np.uint64), data.size


def _finish(total, words, tail, nbytes):
    with np.errstate(over="ignore"):
        if nbytes % 8:
            total += (tail[0] ^ (np.uint64(words.size) * K1)) * K2
        return int(total + np.uint64(nbytes) * K1)


def checksum(data: np.ndarray, chunks: int = 64) -> int:
    words, tail, nbytes = _split(data)
    out = np.zeros(max(1, min(chunks, words.size)), np.uint64)
    _partial_sums(words, out)
    with np.errstate(over="ignore"):
        return _finish(out.sum(dtype=np.uint64), words, tail, nbytes)


def checksum_ref(data: np.ndarray) -> int:
    """The same sum in plain NumPy (wrapping uint64 arithmetic)."""
    words, tail, nbytes = _split(data)
    with np.errstate(over="ignore"):
        terms = (words ^ (np.arange(words.size, dtype=np.uint64) * K1)) * K2
        return _finish(terms.sum(dtype=np.uint64), words, tail, nbytes)
