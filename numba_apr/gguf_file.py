"""GGUF files: header, metadata and tensor table parsed once; tensor data memory-mapped, never copied.

The format (llama.cpp's `gguf.md`): magic `GGUF`, version, tensor count, metadata count, the
metadata key/value pairs, the tensor infos (name, dims, type, offset), padding to
`general.alignment`, then the tensor data. We parse the header ourselves with `struct` over the
memory map, using the `gguf` package's enums and block-size table, because `gguf.GGUFReader`
builds a NumPy view per array element and takes ~25 s on a 262,144-token vocabulary; this
parser takes a fraction of a second. Every malformed byte ends in a one-line `NumbaAprError`.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import NumbaAprError

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


class _Cursor:
    """Reads little-endian values from a buffer, turning overruns into one-line errors."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what):
        raise NumbaAprError(f"{self.path}: corrupt or truncated GGUF file ({what} at byte {self.pos})")

    def scalar(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            self.fail("unexpected end of header")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self):
        n = self.scalar("<Q")
        if n > len(self.buf) - self.pos:
            self.fail(f"string of {n} bytes runs past the end")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            return self.array()
        fmt = _SCALAR.get(vtype)
        if fmt is None:
            self.fail(f"unknown value type {vtype}")
        return self.scalar(fmt)

    def array(self):
        etype = self.scalar("<I")
        n = self.scalar("<Q")
        if n > len(self.buf) - self.pos:
            self.fail(f"array of {n} items runs past the end")
        if etype in _NUMPY:
            dt = np.dtype(_NUMPY[etype])
            end = self.pos + n * dt.itemsize
            if end > len(self.buf):
                self.fail("array runs past the end")
            out = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
            self.pos = end
            return out
        if etype == GGUFValueType.STRING:
            return self._string_array(n)
        return [self.value(etype) for _ in range(n)]

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
    """A parsed GGUF file: `metadata` (key -> value), `tensors` (name -> Tensor, memory-mapped)."""

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
        self.tensors: dict[str, Tensor] = {}
        self._parse(size)

    def _parse(self, size):
        cur = _Cursor(memoryview(self._map), self.path)
        cur.pos = 4
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise NumbaAprError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3 are)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > size or n_kv > size:
            cur.fail("impossible tensor or metadata count")
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > 4:
                cur.fail(f"tensor {name} has {n_dims} dimensions")
            dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if align <= 0 or align & (align - 1):
            cur.fail(f"bad alignment {align}")
        data_start = (cur.pos + align - 1) // align * align
        for name, dims, qtype, offset in infos:
            self.tensors[name] = self._tensor(name, dims, qtype, data_start + offset, size)

    def _tensor(self, name, dims, qtype, start, size):
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            # Unknown type id: keep a placeholder so the error names the tensor when it is used.
            return Tensor(name, qtype, dims, np.empty((0, 0), np.uint8))
        row_len = dims[0] if dims else 1
        n_rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        if row_len % block:
            raise NumbaAprError(f"{self.path}: tensor {name} has rows of {row_len}, not a multiple of {block}")
        row_bytes = row_len // block * type_size
        end = start + n_rows * row_bytes
        if end > size:
            raise NumbaAprError(f"{self.path}: corrupt or truncated GGUF file (tensor {name} ends at byte {end} "
                                f"of {size})")
        raw = self._map[start:end].view(np.ndarray).reshape(n_rows, row_bytes)
        return Tensor(name, qtype, tuple(int(d) for d in dims), raw)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise NumbaAprError(f"{self.path}: metadata key {key} is missing")
        return self.metadata[key]

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))
