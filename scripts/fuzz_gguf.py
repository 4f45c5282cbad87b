#!/usr/bin/env python3
"""Fuzz numba_apr's GGUF loading with structure-aware mutants of a real model file.

    python scripts/fuzz_gguf.py --cases 10000 --seed 1 [--workers N] [--timeout S] [--json OUT]

The base file (../shared/models/tiny-qwen2-q4km.gguf) is parsed into a structure (header,
key/values, tensor infos, data section) that a writer turns back into bytes. A case applies one
or two mutations (families: header, keys, value types, lengths, alignment, hyper-parameters,
token ids, tokenizer, tensor infos, truncation, byte flips), on the structure or on bytes at
field offsets the writer recorded, and says whether the file must be refused: True when it
breaks llama.cpp's rules (gguf.cpp, the loader's strict key types, the model's shapes), False
for a legal change, None when either answer is fine (random flips; an out-of-range special token
id, which llama.cpp ignores). Cases depend only on --seed and their number (rerun one: --case N).

Long-lived worker processes (RLIMIT_AS --mem-limit, a private NUMBA_APR_CACHE emptied after each
case) first load the unmodified model, then per case: load(path, n_ctx=64), tokenize, two greedy
tokens; --cli-fraction of the cases run scripts/generate.py instead. Outcomes: error (a one-line
NumbaAprError; CLI: one stderr line "error: ..."), accepted, and the defects: multiline (the error
is not one line), traceback (any other exception; its kind is its type and innermost numba_apr
frame), memory (MemoryError), crash (killed by a signal), hang (no answer within --timeout s),
plus "accepted" when must_refuse is True. Exit status 1 when there is any defect, else 0.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import pickle
import random
import re
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType as VT

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT.parent / "shared" / "models" / "tiny-qwen2-q4km.gguf"
PKG = str(ROOT / "numba_apr")
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
NAN, INF = float("nan"), float("inf")
_FMT = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
        VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT32: "f", VT.FLOAT64: "d", VT.BOOL: "?"}
DEFECTS = ("multiline", "traceback", "memory", "crash", "hang")


# -- the structure, its parser and writer ------------------------------------------------------
# (eq=False: objects compare by identity, as values hold NumPy arrays and the same key may repeat)
@dataclass(eq=False)
class Arr:
    etype: int
    items: object  # np.ndarray of numbers, or a list (strings as bytes)


@dataclass(eq=False)
class KV:
    key: bytes
    vtype: int
    value: object
    raw: bytes | None = None  # type + value bytes as read; None once changed (then re-encoded)


@dataclass(eq=False)
class TensorInfo:
    name: bytes
    dims: tuple
    qtype: int
    offset: int


@dataclass(eq=False)
class GGUF:
    version: int
    kvs: list
    tensors: list
    data_offset: int  # where the data section starts in the base file
    data_size: int
    alignment: int

    def kv(self, key: str):
        return next((kv for kv in self.kvs if kv.key == key.encode()), None)

    def nbytes(self, t: TensorInfo) -> int:
        block, size = GGML_QUANT_SIZES[QT(t.qtype)]
        return math.prod(t.dims) // block * size


def parse(buf: bytes) -> GGUF:
    """The base file's structure (the base is trusted: no checks)."""
    pos = 4

    def take(fmt):
        nonlocal pos
        (v,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n:pos]

    def value(vt):
        nonlocal pos
        if vt == VT.STRING:
            return string()
        if vt != VT.ARRAY:
            return take(_FMT[vt])
        et, n = take("I"), take("Q")
        if et in _FMT:
            a = np.frombuffer(buf, "<" + _FMT[et], n, pos).copy()
            pos += a.nbytes
            return Arr(et, a)
        return Arr(et, [value(et) for _ in range(n)])

    assert buf[:4] == b"GGUF"
    version, n_t, n_kv = take("I"), take("Q"), take("Q")
    kvs = []
    for _ in range(n_kv):
        key, start = string(), pos
        vt = take("I")
        kvs.append(KV(key, vt, value(vt)))
        kvs[-1].raw = buf[start:pos]
    tensors = []
    for _ in range(n_t):
        name = string()
        dims = tuple(take("Q") for _ in range(take("I")))
        tensors.append(TensorInfo(name, dims, take("I"), take("Q")))
    align = next((kv.value for kv in kvs if kv.key == b"general.alignment"), 32)
    start = -(-pos // align) * align
    return GGUF(version, kvs, tensors, start, len(buf) - start, align)


def _enc(vt, v) -> bytes:
    if vt == VT.STRING:
        return struct.pack("<Q", len(v)) + v
    if vt != VT.ARRAY:
        return struct.pack("<" + _FMT[vt], v)
    head = struct.pack("<IQ", v.etype, len(v.items))
    if isinstance(v.items, np.ndarray):
        return head + v.items.astype("<" + _FMT[v.etype]).tobytes()
    return head + b"".join(_enc(v.etype, x) for x in v.items)


def write(g: GGUF, reuse: bool = True):
    """(the bytes before the data section, {(id(obj), part): byte offset of that field});
    reuse=False re-encodes every value instead of reusing the bytes read."""
    parts, fields, pos = [], {}, 0

    def put(b, obj=None, part=None):
        nonlocal pos
        if obj is not None:
            fields[id(obj), part] = pos
        parts.append(b)
        pos += len(b)

    put(b"GGUF" + struct.pack("<IQQ", g.version, len(g.tensors), len(g.kvs)))
    for kv in g.kvs:
        put(struct.pack("<Q", len(kv.key)) + kv.key, kv, "key")
        put(kv.raw if reuse and kv.raw is not None else struct.pack("<I", kv.vtype) + _enc(kv.vtype, kv.value),
            kv, "type")
    for t in g.tensors:
        put(struct.pack("<Q", len(t.name)) + t.name, t, "name")
        put(struct.pack(f"<I{len(t.dims)}QIQ", len(t.dims), *(d & U64 for d in t.dims), t.qtype, t.offset & U64),
            t, "ndims")
    # Pad to the alignment the file declares where a reader could honour it, else the base's.
    a = g.kv("general.alignment")
    a = a.value if a is not None and a.vtype in _FMT and type(a.value) is int else 0
    put(bytes(-pos % (a if 0 < a <= 4096 and not a & (a - 1) else g.alignment)))
    return b"".join(parts), fields


# -- mutations ----------------------------------------------------------------------------------
class Draft:
    """A mutant in the making: a copy of the structure (objects are replaced, never changed in
    place) plus operations on the written bytes (pokes at recorded fields, flips, a truncation)."""

    def __init__(self, base: GGUF):
        self.base, self.g = base, replace(base, kvs=list(base.kvs), tensors=list(base.tensors))
        self.ops, self.cut = [], None
        self.arch = base.kv("general.architecture").value.decode()

    def set(self, key: str, vtype, value, raw=None):
        """Replace key's value where it stands, or append the key; returns the old KV."""
        old = self.g.kv(key)
        kv = KV(key.encode(), vtype, value, raw)
        if old is None:
            self.g.kvs.append(kv)
        else:
            self.g.kvs[self.g.kvs.index(old)] = kv
        return old

    def poke(self, obj, part, delta, fmt, new):
        """At build time, write new(old value, position, file size) at obj's field + delta (at
        byte delta for obj None)."""
        def op(head, fields, size):
            pos = (0 if obj is None else fields[id(obj), part]) + delta
            (old,) = struct.unpack_from(fmt, head, pos)
            struct.pack_into(fmt, head, pos, new(old, pos, size) & (U64 if fmt == "<Q" else U32))
        self.ops.append(op)

    def build(self):
        head, fields = write(self.g)
        head, size = bytearray(head), len(head) + self.g.data_size
        for op in self.ops:
            op(head, fields, size)
        return bytes(head), (size if self.cut is None else self.cut(head, fields, size))


def _name(b: bytes) -> str:
    return b.decode(errors="replace")


def _show(vt, v) -> str:
    name = VT(vt).name.lower() if vt in list(VT) else f"type {vt}"
    if isinstance(v, Arr):
        return f"{name} of {len(v.items)} {VT(v.etype).name.lower()}"
    return f"{name} {v!r}"[:60]


def m_header(rng, d):
    if rng.random() < 0.2:
        magic = rng.choice([b"GGUE", b"FUGG", b"\0\0\0\0"])
        d.poke(None, None, 0, "<I", lambda *_: int.from_bytes(magic, "little"))
        return f"magic {magic!r}", True
    name, off, n = rng.choice([("version", 4, d.g.version), ("n_tensors", 8, len(d.g.tensors)),
                               ("n_kv", 16, len(d.g.kvs))])
    if name == "version":
        v = rng.choice([0, 1, 2, 4, 0x30000000, U32])  # 0x30000000: 3 read with the wrong endianness
        d.poke(None, None, off, "<I", lambda *_: v)
        return f"version {n} -> {v}", v != 2  # a v2 file is laid out as a v3 one
    v = rng.choice([0, n - 1, n + 1, 1 << 63, U64])
    d.poke(None, None, off, "<Q", lambda *_: v)
    return f"{name} {n} -> {v}", True


# Keys the loader needs, "<arch>." ones after it (head_count_kv's default, head_count, does
# not fit the base's K/V tensors).
REQUIRED = ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges")
REQUIRED_ARCH = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                 "attention.head_count_kv", "attention.layer_norm_rms_epsilon")


def m_keys(rng, d):
    kvs, c = d.g.kvs, rng.choice(["duplicate", "empty", "non-UTF-8", "renamed"])
    if c == "duplicate":
        i = rng.randrange(len(kvs))
        how = rng.choice(["same value", "first copy differs", "last copy differs"])
        copy = replace(kvs[i]) if how == "same value" else KV(kvs[i].key, VT.STRING, b"fuzz")
        if how == "first copy differs":
            kvs[i], copy = copy, kvs[i]
        kvs.insert(rng.randint(i + 1, len(kvs)), copy)
        return f"key {_name(kvs[i].key)} twice ({how})", True
    if c == "renamed":  # one corrupt byte: the key is then missing, and an unknown one present
        i = rng.randrange(len(kvs))
        k = kvs[i].key
        j = rng.randrange(len(k))
        kvs[i] = replace(kvs[i], key=k[:j] + b"\xff" + k[j + 1:])
        needed = _name(k) in REQUIRED or _name(k).removeprefix(d.arch + ".") in REQUIRED_ARCH
        return f"key {_name(k)} renamed with a non-UTF-8 byte", needed
    key = b"" if c == "empty" else b"fuzz.\xff\xfe" + bytes([rng.randrange(128, 256)])
    kvs.insert(rng.randint(0, len(kvs)), KV(key, VT.UINT32, 1))
    return f"extra key {key!r} added", False  # gguf.cpp checks neither emptiness nor UTF-8


def _retypes(kv):
    """(type, value, raw bytes or None) for kv's value under other types."""
    v, vt = kv.value, kv.vtype
    out = [(t, None, struct.pack("<I", t) + kv.raw[4:]) for t in (13, U32)]  # unknown type ids
    if vt == VT.STRING:
        return out + [(VT.UINT32, 7, None), (VT.BOOL, True, None), (VT.ARRAY, Arr(VT.STRING, [v]), None)]
    if vt == VT.BOOL:
        return out + [(VT.UINT8, int(v), None), (VT.UINT32, int(v), None), (VT.STRING, b"true", None)]
    if vt == VT.ARRAY:
        first = v.items[0].item() if isinstance(v.items, np.ndarray) else v.items[0]
        return out + [(VT.UINT32, len(v.items), None), (v.etype, first, None)]  # a scalar of its first item
    out += [(VT.STRING, str(v).encode(), None), (VT.BOOL, True, None), (VT.FLOAT32, NAN, None),
            (VT.FLOAT32, INF, None), (VT.FLOAT32, -INF, None), (VT.ARRAY, Arr(vt, np.array([v])), None)]
    if vt == VT.FLOAT32:
        return out + [(VT.FLOAT64, v, None), (VT.UINT32, int(v), None)]
    return out + [(VT.FLOAT32, float(v), None), (VT.INT32, -max(v, 1), None), (VT.UINT64, (1 << 32) + v, None)]


def m_vtypes(rng, d):
    # Keys the loader reads; llama.cpp checks each one's type strictly, so any retype is refused.
    keys = [_name(kv.key) for kv in d.base.kvs if kv.key != b"general.quantization_version"
            and _name(kv.key).startswith((d.arch + ".", "general.", "tokenizer.ggml."))]
    old = d.base.kv(rng.choice(keys))
    vt, v, raw = rng.choice(_retypes(old))
    d.set(_name(old.key), vt, v, raw)
    new = _show(vt, v) if raw is None else f"type id {vt}"
    return f"{_name(old.key)}: {_show(old.vtype, old.value)} -> {new}", True


# Hyper-parameters after "<arch>.": (malformed values, legal values); a (type, value) pair for
# a type other than the key's own (rope.dimension_count, absent from the base, is a u32).
I32, U64T = VT.INT32, VT.UINT64
HPARAMS = {
    "block_count": ([0, 5, 2**31 - 1, U32, (I32, -1), (U64T, 2**32 + 1)], []),
    "embedding_length": ([0, 255, 512, 2**31 - 1, (I32, -4), (U64T, 1 << 40)], []),
    "feed_forward_length": ([0, 767, 2**31 - 1, (I32, -1), (U64T, 2**32 + 768)], []),
    "attention.head_count": ([0, 3, 8, 2**31 - 1, (I32, -4)], []),
    "attention.head_count_kv": ([0, 3, 8, (I32, -1), (U64T, 2**32 + 2)], []),
    "attention.layer_norm_rms_epsilon": ([NAN, INF, -INF, -1e-6], [1e-5]),
    "rope.freq_base": ([NAN, INF, -INF, 0.0, -1e4], [1e4]),
    "rope.dimension_count": ([63, 128, U32, (I32, -4)], [64, 32]),  # (0: no rotation, which llama.cpp allows)
    "context_length": ([0, (I32, -1)], [64, 2048, U32]),
}


def m_hparams(rng, d):
    name = rng.choice(sorted(HPARAMS))
    bad, legal = HPARAMS[name]
    pick = rng.choice(bad + legal)
    own = d.base.kv(f"{d.arch}.{name}")
    vt, v = pick if isinstance(pick, tuple) else (VT.UINT32 if own is None else own.vtype, pick)
    old = d.set(f"{d.arch}.{name}", vt, v)
    was = "absent" if old is None else _show(old.vtype, old.value)
    return f"{d.arch}.{name}: {was} -> {_show(vt, v)}", pick in bad


def m_token_ids(rng, d):
    key = "tokenizer.ggml." + rng.choice(["bos_token_id", "eos_token_id", "padding_token_id",
                                          "unknown_token_id", "eot_token_id", "seperator_token_id"])
    n = len(d.base.kv("tokenizer.ggml.tokens").value.items)
    # llama.cpp refuses a wrong type, ignores (with a warning) an id out of range.
    vt, v, bad = rng.choice([(VT.INT32, -1, True), (VT.STRING, b"151643", True), (VT.UINT32, n, None),
                             (VT.UINT32, U32, None), (VT.UINT32, rng.randrange(n), False)])
    d.set(key, vt, v)
    return f"{key} -> {_show(vt, v)} (vocabulary of {n})", bad


def m_tokenizer(rng, d):
    K = "tokenizer.ggml."
    tokens, types, merges = (d.base.kv(K + k).value.items for k in ("tokens", "token_type", "merges"))
    n = len(tokens)
    c = rng.choice(["tokens", "token_type shortened", "token_type retyped", "merge", "merges retyped", "model", "pre"])
    if c == "tokens":
        keep = rng.choice([0, 1, n // 2, n - 1])
        d.set(K + "tokens", VT.ARRAY, Arr(VT.STRING, tokens[:keep]))
        return f"tokens shortened to {keep} of {n} (token_type and merges unchanged)", True
    if c == "token_type shortened":
        keep = rng.choice([0, n // 2, n - 1])
        d.set(K + "token_type", VT.ARRAY, Arr(VT.INT32, types[:keep]))
        return f"token_type shortened to {keep} of {n}", True
    if c == "token_type retyped":
        et = rng.choice([VT.FLOAT32, VT.UINT8, VT.INT64, VT.STRING])
        items = [str(x).encode() for x in types.tolist()] if et == VT.STRING else types
        d.set(K + "token_type", VT.ARRAY, Arr(et, items))
        return f"token_type retyped to an array of {VT(et).name.lower()}", True
    if c == "merge":
        # Not a pair, or a pair of texts that are no tokens: llama.cpp keeps an unusable rank,
        # and so does numba_apr (its BPE never indexes by a merge, and falls back to bytes for a
        # symbol without a token, as llama.cpp does). Refusing is fine too: either answer.
        i = rng.randrange(len(merges))
        new = rng.choice([b"abc", merges[i].replace(b" ", b""), "\u2603q \u2603z".encode()])
        d.set(K + "merges", VT.ARRAY, Arr(VT.STRING, merges[:i] + [new] + merges[i + 1:]))
        return f"merge {i} {merges[i]!r} -> {new!r}", None
    if c == "merges retyped":
        d.set(K + "merges", VT.ARRAY, Arr(VT.INT32, np.arange(len(merges))))
        return "merges retyped to an array of int32", True
    v = rng.choice([b"fuzz", b"", b"GPT2", b"bert"] if c == "model" else [b"fuzz", b"", b"qwen3"])
    d.set(K + c, VT.STRING, v)
    return f"tokenizer.ggml.{c} -> {v!r}", True


def m_lengths(rng, d):
    c = rng.choice(["length", "length", "length", "nested", "array of arrays"])
    if c == "nested":  # ARRAY is no valid element type for gguf.cpp
        depth = rng.choice([2, 1000, 5000])
        raw = (struct.pack("<I", VT.ARRAY) + struct.pack("<IQ", VT.ARRAY, 1) * (depth - 1)
               + struct.pack("<IQB", VT.UINT8, 1, 7))
        d.g.kvs.insert(rng.randint(0, len(d.g.kvs)), KV(b"fuzz.nested", VT.ARRAY, None, raw))
        return f"extra key with arrays nested {depth} deep", True
    if c == "array of arrays":
        kv = rng.choice([kv for kv in d.g.kvs if kv.vtype == VT.ARRAY])
        d.poke(kv, "type", 4, "<I", lambda *_: VT.ARRAY)
        return f"{_name(kv.key)}: element type -> ARRAY", True
    # A key's length, a string value's length or an array's count, a tensor name's length.
    targets = [(kv, "key", 0, f"length of key {_name(kv.key)}") for kv in d.g.kvs]
    targets += [(kv, "type", 4, f"length of {_name(kv.key)}") for kv in d.g.kvs if kv.vtype == VT.STRING]
    targets += [(kv, "type", 8, f"count of {_name(kv.key)}") for kv in d.g.kvs if kv.vtype == VT.ARRAY]
    targets += [(t, "name", 0, f"length of tensor name {_name(t.name)}") for t in d.g.tensors]
    obj, part, delta, what = rng.choice(targets)
    how, new = rng.choice([("2^63", lambda *_: 1 << 63), ("2^64-1", lambda *_: U64),
                           ("past the end", lambda old, pos, size: size - pos - 7),
                           ("+1", lambda old, *_: old + 1), ("-1", lambda old, *_: old - 1)])
    d.poke(obj, part, delta, "<Q", new)
    return f"{what}: {how}", True


def m_alignment(rng, d):
    # A larger alignment is legal when every tensor's offset and size already honour it.
    legal = [a for a in (64, 128, 256, 512)
             if all(t.offset % a == 0 and d.base.nbytes(t) % a == 0 for t in d.base.tensors)]
    vt, v, bad = rng.choice([(VT.UINT32, 0, True), (VT.UINT32, 3, True), (VT.UINT64, 1 << 40, True),
                             (VT.UINT64, 32, True), (VT.STRING, b"32", True), (VT.FLOAT32, NAN, True),
                             (VT.ARRAY, Arr(VT.UINT32, np.array([32])), True), (VT.UINT32, 32, False)]
                            + [(VT.UINT32, a, False) for a in legal])
    d.set("general.alignment", vt, v)
    return f"general.alignment -> {_show(vt, v)}", bad


def m_tensors(rng, d):
    ts, g = d.g.tensors, d.g
    c = rng.choice(["dims", "n_dims", "type", "offset", "duplicate name", "long name", "removed"])
    if c == "type":  # of another size, and not the last tensor: the layout breaks (gguf.cpp)
        last = max(ts, key=lambda t: t.offset)
        t = rng.choice([t for t in ts if t is not last])
        new = rng.choice([q for q in (QT.Q4_1, QT.BF16, QT.F16, QT.Q8_0, QT.Q5_K, QT.Q6_K, 4, 99, U32)
                          if q not in list(QT) or g.nbytes(replace(t, qtype=q)) != g.nbytes(t)])
        ts[ts.index(t)] = replace(t, qtype=new)
        return f"tensor {_name(t.name)} type {QT(t.qtype).name} -> {QT(new).name if new in list(QT) else new}", True
    if c == "dims" and rng.random() < 0.25:
        t = rng.choice([t for t in ts if len(t.dims) == 2 and t.dims[0] != t.dims[1]])
        ts[ts.index(t)] = replace(t, dims=t.dims[::-1])
        return f"tensor {_name(t.name)} dims {t.dims} swapped", True
    i = rng.randrange(len(ts))
    t, name = ts[i], _name(ts[i].name)
    if c == "dims":
        k = rng.randrange(len(t.dims))
        how, v = rng.choice([("zero", 0), ("negative", -t.dims[k]), ("huge", 1 << 40), ("overflow", 1 << 62)])
        ts[i] = replace(t, dims=(t.dims[0], v) if how == "overflow" else t.dims[:k] + (v,) + t.dims[k + 1:])
        return f"tensor {name} dims {t.dims} -> {ts[i].dims} ({how})", True
    if c == "n_dims":
        v = rng.choice([0, 5, 1 << 31, U32])
        if v <= 5:
            ts[i] = replace(t, dims=(t.dims + (1,) * 4)[:v])
        else:
            d.poke(t, "ndims", 0, "<I", lambda *_: v)
        return f"tensor {name} n_dims {len(t.dims)} -> {v}", True
    if c == "offset":
        j = rng.choice([j for j in range(len(ts)) if j != i])
        how, v = rng.choice([("misaligned", t.offset + rng.choice([1, 2, 16])), ("past the end", g.data_size),
                             ("past the end", 1 << 62), ("overlapping " + _name(ts[j].name), ts[j].offset),
                             ("swapped with " + _name(ts[j].name), ts[j].offset)])
        if how.startswith("swapped"):
            ts[j] = replace(ts[j], offset=t.offset)
        ts[i] = replace(t, offset=v)
        return f"tensor {name} offset {t.offset} -> {v} ({how})", True
    if c == "duplicate name":
        ts[i] = replace(t, name=rng.choice([u for u in ts if u is not t]).name)
        return f"tensor {name} renamed {_name(ts[i].name)} (twice in the table)", True
    if c == "long name":
        ts[i] = replace(t, name=t.name + b"." + b"x" * (64 - len(t.name)))
        return f"tensor {name} renamed to {len(ts[i].name)} bytes (limit 63)", True
    del ts[i]
    return f"tensor {name} removed", True


def m_truncate(rng, d):
    region, u = rng.choice(["header", "tensor table", "data"]), rng.random()

    def cut(head, fields, size):
        table = min(fields[id(t), "name"] for t in d.g.tensors)
        data_end = len(head) + max(t.offset + d.base.nbytes(t) for t in d.base.tensors)
        lo, hi = {"header": (0, table), "tensor table": (table, len(head)), "data": (len(head), data_end)}[region]
        return lo + int(u * (hi - lo))
    d.cut = cut
    return f"file truncated in the {region} ({u:.3f} of the way)", True


def m_flips(rng, d):
    flips = [(rng.random() < 0.5, rng.random(), rng.randrange(8), rng.randrange(1, 256))
             for _ in range(rng.randint(1, 4))]

    def op(head, fields, size):
        starts = sorted(fields.values())
        for at_field, u, k, mask in flips:  # half at a recorded field, half anywhere past the magic
            head[starts[int(u * len(starts))] + k if at_field else 4 + int(u * (len(head) - 4))] ^= mask
    d.ops.append(op)
    return f"{len(flips)} byte(s) flipped in the header region", None


# name -> (mutation, stage): byte-level families run after the structural ones, so that the
# field offsets they use are those of the final structure.
FAMILIES = {"header": (m_header, 2), "keys": (m_keys, 0), "value types": (m_vtypes, 0), "lengths": (m_lengths, 1),
            "alignment": (m_alignment, 0), "hyper-parameters": (m_hparams, 0), "token ids": (m_token_ids, 0),
            "tokenizer": (m_tokenizer, 0), "tensor infos": (m_tensors, 0), "truncation": (m_truncate, 3),
            "byte flips": (m_flips, 2)}


@dataclass(eq=False)
class Case:
    index: int
    family: str
    description: str
    must_refuse: bool | None
    cli: bool
    head: bytes = field(repr=False)
    length: int = 0  # of the whole file: head[:length] + base data up to length


def make_case(base: GGUF, seed: int, index: int, cli_fraction: float = 0.0, families=None) -> Case:
    """Case `index` of `seed`: the same mutant whatever the other cases and --cli-fraction."""
    rng = random.Random(f"{seed}-{index}")
    names = families or rng.sample(sorted(FAMILIES), 1 if rng.random() < 0.75 else 2)
    d, tags = Draft(base), []
    for name in sorted(names, key=lambda n: (FAMILIES[n][1], n)):
        tags.append((name, *FAMILIES[name][0](rng, d)))
    bad = [t[2] for t in tags]
    must = True if True in bad else None if None in bad else False
    head, length = d.build()
    cli = random.Random(f"{seed}-{index}-cli").random() < cli_fraction
    return Case(index, "+".join(t[0] for t in tags), "; ".join(t[1] for t in tags), must, cli, head, length)


# -- the worker (a separate process) ------------------------------------------------------------
def _send(f, obj):
    b = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(b)) + b)
    f.flush()


def _recv(f):
    """The next message, or None at the end of the stream (the other side died)."""
    h = f.read(8)
    b = f.read(struct.unpack("<Q", h)[0]) if len(h) == 8 else b""
    return pickle.loads(b) if b and len(b) == struct.unpack("<Q", h)[0] else None


def _where(frames) -> str:
    """file:line of the innermost numba_apr frame of [(file, line, function)], innermost last."""
    inner = [f for f in frames if f[0].startswith(PKG)] or frames or [("?", 0, "?")]
    file, line, func = inner[-1]
    return f"{os.path.relpath(file, ROOT) if file.startswith(PKG) else file}:{line} in {func}"


def _frames_in(text: str, dump: bool = False):
    """The frames of a printed traceback, innermost last; dump: of a faulthandler dump, whose
    threads list their frames innermost first (the thread in numba_apr, else the current one)."""
    parts = [text]
    if dump:  # (thread header, stack) pairs, the current thread's first
        split = re.split(r"(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):", text)
        parts = [st for h, st in sorted(zip(split[1::2], split[2::2]), key=lambda p: p[0] != "Current thread")]
    stacks = [[(f, int(n), fn) for f, n, fn in re.findall(r'File "([^"]+)", line (\d+),? in (\S+)', p)] for p in parts]
    stacks = [st[::-1] if dump else st for st in stacks]
    return next((st for st in stacks if any(f[0].startswith(PKG) for f in st)), next((st for st in stacks if st), []))


def _run_api(path, NumbaAprError):
    import traceback

    import numba_apr
    m = None
    try:
        m = numba_apr.load(path, n_ctx=64)
        m.tokenize("Hello world")
        list(m.generate("Hello", max_tokens=2, temperature=0))
        return "accepted", "", ""
    except NumbaAprError as e:
        return ("multiline", str(e), "NumbaAprError of several lines") if "\n" in str(e) else ("error", str(e), "")
    except Exception as e:
        frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(e.__traceback__)]
        message = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        outcome = "memory" if isinstance(e, MemoryError) else "traceback"
        return outcome, message, f"{type(e).__name__} at {_where(frames)}"
    finally:
        del m
        gc.collect()  # the previous mutant's arrays go before the next one is loaded


def _run_cli(path, timeout):
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "-m", path, "-p", "hi", "-n", "2",
           "--temp", "0", "-c", "64"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang", f"CLI: no exit within {timeout} s", "CLI hang"
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    if r.returncode < 0:
        sig = signal.Signals(-r.returncode).name
        return "crash", f"CLI killed by {sig}", f"{sig} at {_where(_frames_in(r.stderr, dump=True))}"
    if "Traceback (most recent call last)" in r.stderr:
        # The exception's first line: the first unindented line after the last frame.
        exc = next((x for x in r.stderr.rsplit('  File "', 1)[-1].splitlines()[1:] if x[:1].strip()), lines[-1])
        return "traceback", exc[:300], f"{exc.split(':')[0]} at {_where(_frames_in(r.stderr))}"
    if r.returncode == 0:
        return "accepted", "", ""
    if lines and lines[0].startswith("error: MemoryError"):
        return "memory", lines[0], "MemoryError (CLI)"
    if len(lines) == 1 and lines[0].startswith("error: "):
        return "error", lines[0][len("error: "):], ""
    return "multiline", "\n".join(lines)[:300], (lines or [""])[0].removeprefix("error: ")[:60]


def worker_main(cfg):
    """Serve cases from stdin until its end. Messages go out on a copy of stdout; fd 1 itself
    then points at stderr (the log), so that nothing the engine prints can corrupt them."""
    import faulthandler
    resource.setrlimit(resource.RLIMIT_AS, (cfg["mem"], cfg["mem"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks where a hang is
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    cache = Path(os.environ["NUMBA_APR_CACHE"])
    data = np.memmap(cfg["base"], np.uint8, "r")[cfg["data_offset"]:]
    from numba_apr.errors import NumbaAprError
    outcome = _run_api(cfg["base"], NumbaAprError)  # the unmodified model, under the same limits
    shutil.rmtree(cache, ignore_errors=True)
    _send(out, {"ready": outcome[0] == "accepted", "message": outcome[1]})
    while (case := _recv(sys.stdin.buffer)) is not None:
        path = os.path.join(cfg["dir"], f"case{case['index']}.gguf")
        with open(path, "wb") as f:
            f.write(case["head"][:case["length"]])
            f.write(data[:max(0, case["length"] - len(case["head"]))])
        t0 = time.perf_counter()
        outcome, message, kind = _run_cli(path, cfg["timeout"]) if case["cli"] else _run_api(path, NumbaAprError)
        os.unlink(path)
        shutil.rmtree(cache, ignore_errors=True)  # one repacked-weights file per mutant otherwise
        _send(out, dict(outcome=outcome, message=message.replace(path, "FILE")[:500],
                        kind=kind.replace(path, "FILE"), seconds=time.perf_counter() - t0))


# -- the parent ----------------------------------------------------------------------------------
class Worker:
    def __init__(self, n, cfg, root):
        self.dir = tempfile.mkdtemp(prefix=f"w{n}-", dir=root)
        self.log = open(os.path.join(self.dir, "stderr.log"), "a+b")
        env = dict(os.environ, NUMBA_APR_CACHE=os.path.join(self.dir, "cache"), PYTHONFAULTHANDLER="1",
                   NUMBA_NUM_THREADS=str(cfg["threads"]))  # workers x threads = cores: no oversubscription
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(dict(cfg, dir=self.dir))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                     cwd=ROOT, start_new_session=True)
        self.case, self.ready, self.deadline = None, False, time.monotonic() + 600

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: a CLI child goes too
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def fuzz(base_path=BASE, cases=200, seed=1, workers=None, timeout=60, cli_fraction=0.05, mem_gib=8.0,
         only=None, progress=None):
    """Run cases range(cases) (or those in `only`) of `seed`; returns one dict per case."""
    base = parse(Path(base_path).read_bytes())
    todo = deque(only if only is not None else range(cases))
    workers = max(1, min(workers or os.cpu_count(), len(todo)))
    cfg = dict(base=str(base_path), data_offset=base.data_offset, timeout=timeout, mem=int(mem_gib * 2**30),
               threads=max(1, (os.cpu_count() or 1) // workers))
    # Mutants go to /dev/shm where there is one: 38 MB per case need not touch a disk.
    root = tempfile.mkdtemp(prefix="fuzz_gguf-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    sel, results, pool = selectors.DefaultSelector(), [], []

    def spawn(i):
        w = Worker(i, cfg, root)
        sel.register(w.proc.stdout, selectors.EVENT_READ, i)
        return w

    def finish(w, outcome, message, kind, seconds=None):
        c, w.case = w.case, None
        results.append(dict(case=c.index, seed=seed, family=c.family, description=c.description,
                            must_refuse=c.must_refuse, mode="cli" if c.cli else "api", outcome=outcome,
                            message=message, kind=kind, seconds=seconds))
        if progress:
            progress(results)

    def restart(i, outcome, message, kind):
        last = (pool[i].log_text().strip().splitlines() or ["(nothing)"])[-1]
        sel.unregister(pool[i].proc.stdout)
        pool[i].kill()
        if pool[i].case is None:
            raise RuntimeError(f"a fuzz worker failed outside a case: {message}; its last words: {last}")
        finish(pool[i], outcome, message, kind)
        pool[i] = spawn(i)

    try:
        pool.extend(spawn(i) for i in range(workers))
        while todo or any(w.case for w in pool):
            for w in pool:
                if w.ready and w.case is None and todo:
                    w.case = make_case(base, seed, todo.popleft(), cli_fraction)
                    w.deadline = time.monotonic() + timeout + (30 if w.case.cli else 0)
                    w.log.truncate(0)
                    with contextlib.suppress(BrokenPipeError):  # if it died, its stdout says so below
                        _send(w.proc.stdin, dict(index=w.case.index, head=w.case.head, length=w.case.length,
                                                 cli=w.case.cli))
            busy = [w.deadline for w in pool if w.case or not w.ready]
            for key, _ in sel.select(max(0.0, min(busy) - time.monotonic()) if busy else None):
                w = pool[key.data]
                msg = _recv(w.proc.stdout)
                if msg is None:
                    rc = w.proc.wait()
                    sig = signal.Signals(-rc).name if rc < 0 else f"exit status {rc}"
                    restart(key.data, "crash", f"worker ended by {sig}",
                            f"{sig} at {_where(_frames_in(w.log_text(), dump=True))}")
                elif "ready" in msg:
                    if not msg["ready"]:
                        raise RuntimeError(f"the unmodified model fails in a worker (too low a --mem-limit?): "
                                           f"{msg['message']}")
                    w.ready = True
                else:
                    finish(w, **msg)
            for i, w in enumerate(pool):
                if time.monotonic() > w.deadline and (w.case or not w.ready):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.proc.pid, signal.SIGUSR1)  # a faulthandler dump: where it hangs
                        time.sleep(1.0)
                    restart(i, "hang", f"no answer within {timeout} s",
                            f"hang at {_where(_frames_in(w.log_text(), dump=True))}")
    finally:
        for w in pool:
            w.kill()
        shutil.rmtree(root, ignore_errors=True)
    return sorted(results, key=lambda r: r["case"])


def is_defect(r) -> bool:
    return r["outcome"] in DEFECTS or (r["outcome"] == "accepted" and r["must_refuse"] is True)


def report(results, seed) -> str:
    n = Counter(r["outcome"] for r in results)
    kinds = {o: Counter(r["kind"] for r in results if r["outcome"] == o) for o in DEFECTS}
    bad_ok = [r for r in results if r["outcome"] == "accepted" and r["must_refuse"] is True]
    out = [f"{len(results)} cases, seed {seed}", "", "| outcome | files |", "|---|---|"]
    out += [f"| {a} | {b} |" for a, b in [
        ("one clear error", n["error"]), ("accepted", f"{n['accepted']} ({len(bad_ok)} of which malformed)"),
        ("error on several lines", n["multiline"]),
        ("Python traceback", f"{n['traceback']} ({len(kinds['traceback'])} distinct kinds)"),
        ("killed by a signal", n["crash"]), ("hang", n["hang"]), ("MemoryError", n["memory"])]]
    for o in DEFECTS:
        for kind, count in kinds[o].most_common():
            r = next(r for r in results if r["outcome"] == o and r["kind"] == kind)
            out += ["", f"{o}: {kind} ({count} cases), e.g. case {r['case']} [{r['family']}, {r['mode']}] "
                        f"{r['description']}", "    " + r["message"].replace("\n", " | ")]
    if bad_ok:
        out += ["", "accepted although malformed, by family: "
                + ", ".join(f"{f} {c}" for f, c in Counter(r["family"] for r in bad_ok).most_common())]
        out += [f"    case {r['case']} [{r['family']}] {r['description']}" for r in bad_ok[:12]]
    errors = list({r["message"][:70]: r for r in results if r["outcome"] == "error"}.values())
    if errors:
        out += ["", "sample error messages:"]
        out += [f"    [{r['family']}] {r['message'][:160]}"
                for r in random.Random(0).sample(errors, min(8, len(errors)))]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--timeout", type=float, default=60, help="seconds per case, a first compile included")
    p.add_argument("--cli-fraction", type=float, default=0.05, help="share of cases run through generate.py")
    p.add_argument("--mem-limit", type=float, default=8, help="GiB of address space per worker (RLIMIT_AS)")
    p.add_argument("--base", type=Path, default=BASE,
                   help="the GGUF file to mutate (the bad values chosen assume the default's shapes)")
    p.add_argument("--case", type=int, action="append", help="run only this case (repeatable)")
    p.add_argument("--json", type=Path, help="write every case's record here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker_main(json.loads(a.worker))
        return 0
    seed = a.seed if a.seed is not None else random.randrange(1 << 31)
    t0, shown = time.monotonic(), [0.0]

    def progress(results):
        if time.monotonic() - shown[0] > 10:
            shown[0] = time.monotonic()
            print(f"[{len(results)}/{len(a.case or range(a.cases))}] {time.monotonic() - t0:.0f} s, "
                  f"{sum(map(is_defect, results))} defects", file=sys.stderr, flush=True)
    try:
        results = fuzz(a.base, a.cases, seed, a.workers, a.timeout, a.cli_fraction, a.mem_limit, a.case, progress)
    except RuntimeError as e:  # the set-up failed, not a case
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(results, seed))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 1 if any(map(is_defect, results)) else 0


if __name__ == "__main__":
    sys.exit(main())
