"""GGUF files: header, metadata and tensor table parsed once; tensor data memory-mapped, never copied.

The format (llama.cpp's `gguf.md`): magic `GGUF`, version, tensor count, metadata count, the
metadata key/value pairs, the tensor infos (name, dims, type, offset), padding to
`general.alignment`, then the tensor data. We parse the header ourselves with `struct` over the
memory map, using the `gguf` package's enums and block-size table, because `gguf.GGUFReader`
builds a NumPy view per array element and takes ~25 s on a 262,144-token vocabulary; this
parser takes a fraction of a second. Every malformed byte ends in a one-line `NumbaAprError`.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import NumbaAprError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Scalar value types: struct format and size.
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
# The same, as NumPy dtypes, for arrays read in one go.
_NUMPY = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16, GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.UINT64: np.uint64, GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.FLOAT64: np.float64,
    GGUFValueType.BOOL: np.bool_,
}


@dataclass(frozen=True)
class Tensor:
    """One tensor of the file. `dims` are GGUF's order (ne0 = the contiguous row length first);
    `raw` is the memory-mapped bytes as [rows, bytes per row] (uint8), a view into the file."""

    name: str
    qtype: int
    dims: tuple[int, ...]
    raw: np.ndarray

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.qtype).name
        except ValueError:
            return f"type {self.qtype}"

    @property
    def n_rows(self) -> int:
        return self.raw.shape[0]

    @property
    def row_len(self) -> int:
        return self.dims[0]


_INTEGER = frozenset({GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                      GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64})
MAX_NAME = 63          # ggml's GGML_MAX_NAME (64) less its terminating NUL
MAX_DIMS = 4           # ggml's GGML_MAX_DIMS
_INT64_MAX = (1 << 63) - 1


class _Cursor:
    """Reads little-endian values from a buffer, turning overruns into one-line errors."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what):
        raise NumbaAprError(f"{self.path}: corrupt or truncated GGUF file ({what} at byte {self.pos})")

    def left(self):
        return len(self.buf) - self.pos

    def scalar(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            self.fail("unexpected end of header")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, strict=False):
        """A string; `strict` (keys, tensor names): it must be UTF-8."""
        n = self.scalar("<Q")
        if n > self.left():
            self.fail(f"string of {n} bytes runs past the end")
        raw = bytes(self.buf[self.pos:self.pos + n])
        try:
            text = raw.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            self.fail("name that is not UTF-8")
        self.pos += n
        return text

    def value(self, vtype):
        """(value, element type): the element type of an array, else None."""
        if vtype == GGUFValueType.STRING:
            return self.string(), None
        if vtype == GGUFValueType.ARRAY:
            return self.array()
        fmt = _SCALAR.get(vtype)
        if fmt is None:
            self.fail(f"unknown value type {vtype}")
        return self.scalar(fmt), None

    def array(self):
        etype = self.scalar("<I")
        n = self.scalar("<Q")
        if etype == GGUFValueType.ARRAY:
            self.fail("array of arrays (nested arrays are not allowed)")
        if etype in _NUMPY:
            dt = np.dtype(_NUMPY[etype])
            if n > self.left() // dt.itemsize:
                self.fail(f"array of {n} items runs past the end")
            out = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
            self.pos += n * dt.itemsize
            return out, etype
        if etype == GGUFValueType.STRING:
            if n > self.left() // 8:
                self.fail(f"array of {n} strings runs past the end")
            return self._string_array(n), etype
        self.fail(f"array of unknown value type {etype}")

    def _string_array(self, n):
        # The token list of a big vocabulary: hot enough to unroll by hand.
        buf, pos, size, out = self.buf, self.pos, len(self.buf), [None] * n
        unpack = struct.Struct("<Q").unpack_from
        for i in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.fail("unexpected end of string array")
            (ln,) = unpack(buf, pos)
            pos += 8
            if ln > size - pos:
                self.pos = pos
                self.fail(f"string of {ln} bytes runs past the end")
            # surrogateescape keeps a token's bytes that are not UTF-8 recoverable.
            out[i] = bytes(buf[pos:pos + ln]).decode("utf-8", errors="surrogateescape")
            pos += ln
        self.pos = pos
        return out


class GGUFFile:
    """A parsed GGUF file: `metadata` (key -> value), `types` (key -> (value type, element type of
    an array or None)), `tensors` (name -> Tensor, memory-mapped).

    Parsing checks what llama.cpp's gguf.cpp checks: counts and lengths against the bytes left,
    known value types, no nested arrays, unique keys and tensor names, names of at most 63 bytes,
    1-4 dims without overflow, known tensor types and whole blocks per row, an alignment that is a
    power of two, and tensor offsets that follow each other in order, aligned, inside the file.
    The typed getters (`get_int`, `get_float`, `get_str`, `get_array`) check a key's type and
    range where it is used."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise NumbaAprError(f"model file not found: {self.path}")
        if os.path.isdir(self.path):
            raise NumbaAprError(f"{self.path} is a directory, not a GGUF file")
        size = os.path.getsize(self.path)
        if size < 24:
            raise NumbaAprError(f"{self.path} is not a GGUF file (only {size} bytes)")
        with open(self.path, "rb") as f:
            if f.read(4) != MAGIC:
                raise NumbaAprError(f"{self.path} is not a GGUF file (bad magic bytes)")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.metadata: dict[str, object] = {}
        self.types: dict[str, tuple[int, int | None]] = {}
        self.tensors: dict[str, Tensor] = {}
        self._parse(size)

    def _parse(self, size):
        cur = _Cursor(memoryview(self._map), self.path)
        cur.pos = 4
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise NumbaAprError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3 are)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        # Smallest encodings: a key/value 8 + 1 + 4 + 1 bytes, a tensor info 8 + 1 + 4 + 8 + 4 + 8.
        if n_kv > cur.left() // 14 or n_tensors > cur.left() // 33:
            cur.fail(f"impossible counts ({n_tensors} tensors, {n_kv} metadata keys)")
        for _ in range(n_kv):
            key = cur.string(strict=True)
            if not key:
                cur.fail("empty metadata key")
            if key in self.metadata:
                cur.fail(f"duplicate metadata key {key}")
            vtype = cur.scalar("<I")
            self.metadata[key], etype = cur.value(vtype)
            self.types[key] = (vtype, etype)
        infos = []
        for _ in range(n_tensors):
            name = cur.string(strict=True)
            if not name or len(name.encode()) > MAX_NAME:
                cur.fail(f"tensor name {name[:80]!r} is empty or longer than {MAX_NAME} bytes")
            if name in self.tensors:
                cur.fail(f"duplicate tensor {name}")
            n_dims = cur.scalar("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                cur.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
            self.tensors[name] = None  # (names seen so far, for the duplicate check)
        align = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            align = self.metadata["general.alignment"]
            vtype = self.types["general.alignment"][0]
            if vtype != GGUFValueType.UINT32:
                cur.fail(f"general.alignment is of type {GGUFValueType(vtype).name}, expected UINT32")
            if align == 0 or align & (align - 1):
                cur.fail(f"general.alignment {align} is not a power of two")
        data_start = (cur.pos + align - 1) // align * align
        expected = 0  # tensors follow each other, each padded to the alignment (as llama.cpp requires)
        for name, dims, qtype, offset in infos:
            if offset != expected:
                raise NumbaAprError(f"{self.path}: tensor {name} is at offset {offset}, expected {expected} "
                                    f"(tensors must follow each other in order, aligned to {align})")
            t = self._tensor(name, dims, qtype, data_start + offset, size)
            expected += -(-t.raw.nbytes // align) * align
            self.tensors[name] = t

    def _tensor(self, name, dims, qtype, start, size):
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise NumbaAprError(f"{self.path}: tensor {name} has unknown type id {qtype}") from None
        n = 1
        for d in dims:
            n *= d
        if any(d > _INT64_MAX for d in dims) or n > _INT64_MAX // type_size:
            raise NumbaAprError(f"{self.path}: tensor {name} has impossible dimensions {list(dims)}")
        row_len = dims[0]
        n_rows = n // row_len if row_len else 0
        if row_len % block:
            raise NumbaAprError(f"{self.path}: tensor {name} has rows of {row_len}, not a multiple of {block}")
        row_bytes = row_len // block * type_size
        end = start + n_rows * row_bytes
        if end > size:
            raise NumbaAprError(f"{self.path}: corrupt or truncated GGUF file (tensor {name} ends at byte {end} "
                                f"of {size})")
        raw = self._map[start:end].view(np.ndarray).reshape(n_rows, row_bytes)
        return Tensor(name, qtype, tuple(int(d) for d in dims), raw)

    # -- metadata, type-checked ------------------------------------------------------------
    def _bad(self, key, want):
        v = self.metadata[key]
        shown = f"an array of {len(v)}" if self.types[key][0] == GGUFValueType.ARRAY else repr(v)[:60]
        return NumbaAprError(f"{self.path}: metadata key {key} is {shown}, expected {want}")

    def get_int(self, key: str, default=None, lo: int = 0, hi: int = _INT64_MAX):
        """An integer-typed key in [lo, hi] (the default when absent; None if that is None)."""
        if key not in self.metadata:
            return default
        v = self.metadata[key]
        if self.types[key][0] not in _INTEGER or not lo <= v <= hi:
            raise self._bad(key, f"an integer from {lo} to {hi}")
        return int(v)

    def get_float(self, key: str, default=None, positive: bool = True):
        """A finite FLOAT32 number (llama.cpp's loader takes no other type), > 0 when `positive`."""
        if key not in self.metadata:
            return default
        v = self.metadata[key]
        if self.types[key][0] != GGUFValueType.FLOAT32 or not math.isfinite(v) or (positive and not v > 0):
            raise self._bad(key, "a finite FLOAT32" + (" > 0" if positive else ""))
        return float(v)

    def get_str(self, key: str, default=None):
        if key not in self.metadata:
            return default
        if self.types[key][0] != GGUFValueType.STRING:
            raise self._bad(key, "a string")
        return self.metadata[key]

    def get_bool(self, key: str, default=None):
        if key not in self.metadata:
            return default
        if self.types[key][0] != GGUFValueType.BOOL:
            raise self._bad(key, "a bool")
        return bool(self.metadata[key])

    def get_array(self, key: str, kind: str, default=None):
        """An array whose elements are of `kind`: "str", "int" (any integer type), "i32" or "float"."""
        if key not in self.metadata:
            return default
        vtype, etype = self.types[key]
        allowed = {"str": {GGUFValueType.STRING}, "int": _INTEGER, "i32": {GGUFValueType.INT32},
                   "float": {GGUFValueType.FLOAT32}}[kind]
        if vtype != GGUFValueType.ARRAY or etype not in allowed:
            raise self._bad(key, f"an array of {kind}")
        return self.metadata[key]

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise NumbaAprError(f"{self.path}: metadata key {key} is missing")
        return self.metadata[key]

    @property
    def architecture(self) -> str:
        arch = self.get_str("general.architecture")
        if arch is None:
            raise NumbaAprError(f"{self.path}: metadata key general.architecture is missing")
        return arch
