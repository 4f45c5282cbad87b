#!/usr/bin/env python3
"""Write Qwen2.5-shaped GGUF files with random weights, in llama.cpp's Q4_K_M recipe (or F16).

    python scripts/make_model.py 1.5B [-o OUT.gguf] [--seed 0] [--type q4_k_m|f16]

Sizes: 0.5B, 1.5B, 3B, 7B, 14B, 32B (Qwen2.5's shapes). The file is a `qwen2` model that
llama.cpp and numba_apr both load: QKV biases, tied or untied output as the real model has,
rope base 1e6, RMS eps 1e-6, context 32768, and the real Qwen2 vocabulary copied from
../shared/vocab/ggml-vocab-qwen2.gguf (padded with `[PAD<id>]` tokens to the 152064 rows of
the 7B and larger models, as the converter pads the real ones). Weights are N(0, 0.02),
biases N(0, 0.02), norms 1 + N(0, 0.02), all a function of (--seed, tensor name, element
index) only, so a tensor is the same whatever the chunking and thread count.

Tensor types are `numba_apr.model.quantize.q4_k_m_type`: what `llama-quantize ... Q4_K_M` picks
(checked one for one against llama-quantize run on the --type f16 file). With --type f16,
2D weights are F16 and 1D tensors F32: an input for llama-quantize.

The file is streamed: tensor infos are declared first (gguf.GGUFWriter writes the header),
then each tensor is generated, quantized and appended a few MiB of rows at a time, so memory
stays small whatever the model size. It is written to `OUT.part<pid>` and renamed at the end;
an interrupted run leaves nothing behind. Default output:
`numba_apr.packaged.cache_dir() / "bench" / "qwen2.5-<size>-shaped-<type>.gguf"`
(generated models never go into the repository).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from numba_apr._numba import pjit, prange
from numba_apr.model.gguf_file import GGUFFile
from numba_apr.packaged import cache_dir
from numba_apr.model.quantize import q4_k_m_type, quantize_into, row_bytes

VOCAB_FILE = Path(__file__).resolve().parents[2] / "shared" / "vocab" / "ggml-vocab-qwen2.gguf"
CHUNK_ELEMENTS = 1 << 22  # rows generated and quantized per step: 16 MiB of float32
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int  # 0: as many as the vocabulary file has
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    "0.5B": Shape(896, 24, 14, 2, 4864, 151936, True),
    "1.5B": Shape(1536, 28, 12, 2, 8960, 151936, True),
    "3B": Shape(2048, 36, 16, 2, 11008, 151936, True),
    "7B": Shape(3584, 28, 28, 4, 18944, 152064, False),
    "14B": Shape(5120, 48, 40, 8, 13824, 152064, False),
    "32B": Shape(5120, 64, 40, 8, 27648, 152064, False),
}
# Not in --help: small shapes for the tests (fast to write and to load).
HIDDEN_SHAPES = {
    "tiny": Shape(256, 2, 4, 2, 768, 0, True),
}
TYPES = {"q4_k_m": 15, "f16": 1}  # --type -> general.file_type (llama_ftype)


class UsageError(Exception):
    """A bad argument: reported as one `error:` line, exit status 1."""


# ---------------------------------------------------------------------------------------------
# Random values: a counter-based generator, so element i of a tensor is the same however the
# tensor is cut into chunks or rows are spread over threads. A 64-bit hash of (tensor key,
# index) gives 32 uniform bits; they index a table of the normal distribution's quantiles and
# interpolate between neighbours (inverse-CDF sampling, piecewise linear, tails cut at
# 4.4 sigma). That is a gather and a multiply-add per value, where Box-Muller would need a
# log and a sine, which Numba calls per element without SVML.

_GOLD = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@pjit
def fill_normal(out, key, first, mean, std, table):
    """out[r, j] = mean + std * z, z ~ N(0, 1) drawn from (key, first + r * cols + j)."""
    cols = out.shape[1]
    for r in prange(out.shape[0]):
        base = np.uint64(first) + np.uint64(r) * np.uint64(cols)
        for j in range(cols):
            h = np.uint64(key) + (base + np.uint64(j)) * _GOLD  # splitmix64's finalizer
            h = (h ^ (h >> np.uint64(30))) * _M1
            h = (h ^ (h >> np.uint64(27))) * _M2
            h = h ^ (h >> np.uint64(31))
            i = np.int64(h >> np.uint64(48))  # 16 bits pick the table cell, 16 interpolate
            f = np.float32(np.uint32((h >> np.uint64(32)) & np.uint64(0xFFFF))) * np.float32(1.0 / 65536.0)
            lo = table[i]
            out[r, j] = mean + std * (lo + f * (table[i + 1] - lo))


def normal_table() -> np.ndarray:
    """Quantiles of N(0, 1) at (k + 0.5) / 65537, k = 0..65536 (float32)."""
    inv = statistics.NormalDist().inv_cdf
    n = 65537
    return np.array([inv((k + 0.5) / n) for k in range(n)], np.float32)


def _mix64(v: int) -> int:
    v &= (1 << 64) - 1
    v = (v ^ (v >> 30)) * 0xBF58476D1CE4E5B9 & (1 << 64) - 1
    v = (v ^ (v >> 27)) * 0x94D049BB133111EB & (1 << 64) - 1
    return v ^ (v >> 31)


def tensor_key(seed: int, name: str) -> int:
    """The generator key of tensor `name`: depends on the seed and the name only."""
    return _mix64((seed << 32) ^ zlib.crc32(name.encode()) ^ 0x51ED27)


# ---------------------------------------------------------------------------------------------
# The model's tensors.

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # GGUF order: ne0 (the row length) first
    kind: str  # "weight", "bias" or "norm"

    @property
    def rows(self) -> int:
        return int(np.prod(self.dims[1:], dtype=np.int64)) if len(self.dims) > 1 else 1


def _llama_order(name: str):
    """llama.cpp's loader sorts tensors by layer number (-1 outside blocks), then by name; its
    quantizer writes them in that order, and we do the same."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def model_tensors(shape: Shape, n_vocab: int) -> list[TensorSpec]:
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    specs = [TensorSpec("token_embd.weight", (h, n_vocab), "weight"),
             TensorSpec("output_norm.weight", (h,), "norm")]
    if not shape.tied:
        specs.append(TensorSpec("output.weight", (h, n_vocab), "weight"))
    for i in range(shape.layers):
        p = f"blk.{i}."
        specs += [
            TensorSpec(p + "attn_norm.weight", (h,), "norm"),
            TensorSpec(p + "attn_q.weight", (h, h), "weight"),
            TensorSpec(p + "attn_q.bias", (h,), "bias"),
            TensorSpec(p + "attn_k.weight", (h, kv), "weight"),
            TensorSpec(p + "attn_k.bias", (kv,), "bias"),
            TensorSpec(p + "attn_v.weight", (h, kv), "weight"),
            TensorSpec(p + "attn_v.bias", (kv,), "bias"),
            TensorSpec(p + "attn_output.weight", (h, h), "weight"),
            TensorSpec(p + "ffn_norm.weight", (h,), "norm"),
            TensorSpec(p + "ffn_gate.weight", (h, shape.ffn), "weight"),
            TensorSpec(p + "ffn_up.weight", (h, shape.ffn), "weight"),
            TensorSpec(p + "ffn_down.weight", (shape.ffn, h), "weight"),
        ]
    return sorted(specs, key=lambda s: _llama_order(s.name))


def tensor_types(shape: Shape, specs: list[TensorSpec], ftype: str) -> dict[str, int]:
    """GGML type of every tensor for file type `ftype` (q4_k_m: llama.cpp's recipe)."""
    out = {}
    for s in specs:
        if ftype == "f16":
            out[s.name] = int(Q.F16 if len(s.dims) >= 2 else Q.F32)
        else:
            out[s.name] = int(q4_k_m_type(s.name, s.dims, shape.layers, shape.tied))
    return out


# ---------------------------------------------------------------------------------------------
# Vocabulary.

_TOKEN_TYPE_UNUSED = 5  # gguf.TokenType.UNUSED


def read_vocab(path: Path, n_vocab: int) -> dict[str, object]:
    """The `tokenizer.*` metadata of the vocabulary file, as {key: value}, with the token list
    padded to `n_vocab` (0: as it is) by `[PAD<id>]` tokens of the file's own padding type."""
    g = GGUFFile(path)
    meta = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = np.asarray(meta["tokenizer.ggml.token_type"], np.int32)
    if n_vocab and n_vocab < len(tokens):
        raise UsageError(f"the vocabulary has {len(tokens)} tokens, more than the {n_vocab} rows of this shape")
    if n_vocab > len(tokens):
        # Converters pad the token list to the embedding's row count; llama.cpp needs the two
        # to agree. Follow the file's own convention for its existing padding tokens.
        pad_type = int(types[-1]) if tokens[-1].startswith("[PAD") else _TOKEN_TYPE_UNUSED
        tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
        types = np.concatenate([types, np.full(n_vocab - len(types), pad_type, np.int32)])
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = types
    # Qwen2.5's own GGUF files say so (its BOS is only used by the chat template's text).
    meta.setdefault("tokenizer.ggml.add_bos_token", False)
    return meta


def _add_value(writer, key, value):
    V = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        # token ids and counts: GGUF's converters write uint32
        writer.add_uint32(key, int(value)) if value >= 0 else writer.add_int32(key, int(value))
    elif isinstance(value, (float, np.floating)):
        writer.add_float32(key, float(value))
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, np.ndarray):
        sub = {np.dtype(np.int32): V.INT32, np.dtype(np.uint32): V.UINT32,
               np.dtype(np.float32): V.FLOAT32, np.dtype(np.int64): V.INT64}[value.dtype]
        writer.add_key_value(key, value.tolist(), V.ARRAY, sub_type=sub)
    elif isinstance(value, list) and value and isinstance(value[0], str):
        # as bytes: our parser reads bytes that are not UTF-8 with surrogateescape; this
        # gives them back unchanged
        writer.add_key_value(key, [v.encode("utf-8", "surrogateescape") for v in value], V.ARRAY,
                             sub_type=V.STRING)
    else:
        raise ValueError(f"cannot copy metadata {key} ({type(value).__name__})")


# ---------------------------------------------------------------------------------------------
# Writing.

def default_output(size: str, ftype: str) -> Path:
    return cache_dir() / "bench" / f"qwen2.5-{size.lower()}-shaped-{ftype}.gguf"


def write_model(size: str, out: Path, seed: int = 0, ftype: str = "q4_k_m", vocab: Path = VOCAB_FILE,
                log=None) -> dict:
    """Write the model; returns {"seconds", "bytes", "types": {name: type}}."""
    shape = SHAPES.get(size) or HIDDEN_SHAPES.get(size)
    if shape is None:
        raise UsageError(f"unknown size {size!r} (sizes: {', '.join(SHAPES)})")
    if ftype not in TYPES:
        raise UsageError(f"unknown type {ftype!r} (types: {', '.join(TYPES)})")
    if not Path(vocab).is_file():
        raise UsageError(f"vocabulary file not found: {vocab}")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"cannot write {out}: it is a directory")
    tmp = out.with_name(out.name + f".part{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        open(tmp, "wb").close()  # fail now, not after minutes of work, if we cannot write
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        result = _write(shape, size, tmp, seed, ftype, Path(vocab), log or (lambda s: None))
        os.replace(tmp, out)
    except OSError as e:  # e.g. the disk filled up
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return result


def _write(shape: Shape, size: str, path: Path, seed: int, ftype: str, vocab: Path, log) -> dict:
    t0 = time.perf_counter()
    tok = read_vocab(vocab, shape.vocab)
    n_vocab = len(tok["tokenizer.ggml.tokens"])
    specs = model_tensors(shape, n_vocab)
    types = tensor_types(shape, specs, ftype)

    w = gguf.GGUFWriter(path, "qwen2")
    w.add_type("model")
    w.add_name(f"Qwen2.5 {size}-shaped (random weights)")
    w.add_basename("Qwen2.5")
    w.add_size_label(size)
    a = "qwen2"
    w.add_uint32(f"{a}.block_count", shape.layers)
    w.add_uint32(f"{a}.context_length", 32768)
    w.add_uint32(f"{a}.embedding_length", shape.hidden)
    w.add_uint32(f"{a}.feed_forward_length", shape.ffn)
    w.add_uint32(f"{a}.attention.head_count", shape.heads)
    w.add_uint32(f"{a}.attention.head_count_kv", shape.kv_heads)
    w.add_float32(f"{a}.rope.freq_base", 1e6)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_file_type(TYPES[ftype])
    for key, value in tok.items():
        _add_value(w, key, value)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_custom_alignment(32)
    for s in specs:
        nb = row_bytes(types[s.name], s.dims[0])
        w.add_tensor_info(s.name, (*reversed(s.dims[1:]), nb), np.dtype(np.uint8), s.rows * nb,
                          raw_dtype=Q(types[s.name]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())
    log(f"header: {time.perf_counter() - t0:.1f} s ({n_vocab} tokens)")

    table = normal_table()
    t_gen = t_quant = t_write = 0.0
    fbuf = np.empty(0, np.float32)  # one chunk of rows, float32 then quantized; grown as needed
    qbuf = np.empty(0, np.uint8)
    for s in specs:
        n, qtype = s.dims[0], types[s.name]
        nb = row_bytes(qtype, n)
        step = max(1, CHUNK_ELEMENTS // n)
        if step * nb > qbuf.size or step * n > fbuf.size:
            fbuf = np.empty(step * n, np.float32)
            qbuf = np.empty(step * nb, np.uint8)
        mean, std = (1.0, WEIGHT_STD) if s.kind == "norm" else (0.0, WEIGHT_STD)
        key = np.uint64(tensor_key(seed, s.name))
        for r0 in range(0, s.rows, step):
            rows = min(step, s.rows - r0)
            x = fbuf[:rows * n].reshape(rows, n)
            t1 = time.perf_counter()
            fill_normal(x, key, r0 * n, np.float32(mean), np.float32(std), table)
            q = qbuf[:rows * nb].reshape(rows, nb)
            t2 = time.perf_counter()
            quantize_into(x, qtype, q)
            t3 = time.perf_counter()
            fout.write(memoryview(q).cast("B"))
            t_gen, t_quant, t_write = t_gen + t2 - t1, t_quant + t3 - t2, t_write + time.perf_counter() - t3
        w.write_padding(fout, s.rows * nb)
    t3 = time.perf_counter()
    fout.flush()
    os.fsync(fout.fileno())
    w.close()
    t_write += time.perf_counter() - t3
    log(f"tensors: generate {t_gen:.1f} s, quantize {t_quant:.1f} s, write {t_write:.1f} s")
    return {"seconds": time.perf_counter() - t0, "bytes": path.stat().st_size,
            "types": {s.name: types[s.name] for s in specs}}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 1, like every other bad argument
        raise UsageError(message)


def main(argv=None) -> int:
    p = _Parser(description="Write a Qwen2.5-shaped GGUF with random weights "
                            "(llama.cpp's Q4_K_M recipe, or F16).")
    p.add_argument("size", help=f"model shape: {', '.join(SHAPES)}")
    p.add_argument("-o", "--output", help="output file (default: <cache>/bench/qwen2.5-<size>-shaped-<type>.gguf)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--type", default="q4_k_m", choices=list(TYPES), help="tensor types (default q4_k_m)")
    p.add_argument("--vocab", default=str(VOCAB_FILE), help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    try:
        args = p.parse_args(argv)
        if args.seed < 0 or args.seed >= 1 << 32:
            raise UsageError(f"--seed must be in 0..{(1 << 32) - 1}, got {args.seed}")
        if args.size not in SHAPES and args.size not in HIDDEN_SHAPES:
            raise UsageError(f"unknown size {args.size!r} (sizes: {', '.join(SHAPES)})")
        out = Path(args.output) if args.output else default_output(args.size, args.type)
        log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
        res = write_model(args.size, out, args.seed, args.type, Path(args.vocab), log)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{out}: {res['bytes'] / 2**20:.1f} MiB in {res['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
