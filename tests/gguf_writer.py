"""A GGUF writer for tests: files from a structure (metadata with value types, tensor infos,
data), valid by llama.cpp's layout rules unless told otherwise, and the tiny model as one."""
import struct

from gguf import GGUFValueType as V

from numba_apr.model.gguf_file import GGUFFile

from conftest import SHARED

TINY = SHARED / "models" / "tiny-qwen2-q4km.gguf"
_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
        V.UINT64: "<Q", V.INT64: "<q", V.FLOAT32: "<f", V.FLOAT64: "<d", V.BOOL: "<?"}


def _str(s) -> bytes:
    b = s if isinstance(s, bytes) else s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(vtype, v, etype=None) -> bytes:
    if vtype == V.STRING:
        return _str(v)
    if vtype == V.ARRAY:
        out = struct.pack("<IQ", etype, len(v))
        return out + b"".join(_value(etype, x, V.UINT32) for x in v)  # (inner arrays: of u32)
    return struct.pack(_FMT.get(vtype, "<I"), v)  # (an unknown type: 4 bytes)


def write_gguf(path, kvs, tensors, version=3, align=32, n_kv=None, n_tensors=None):
    """kvs: [(key, vtype, value, etype)]; tensors: [(name, dims, qtype, offset or None, bytes)]:
    offset None lays the tensors out in order, aligned (the valid layout)."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(_str(k) + struct.pack("<I", t) + _value(t, v, e) for k, t, v, e in kvs)
    offsets, pos = [], 0
    for name, dims, qtype, off, data in tensors:
        offsets.append(pos if off is None else off)
        pos += -(-len(data) // align) * align
    for (name, dims, qtype, _, _), off in zip(tensors, offsets):
        head += _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        head += struct.pack("<IQ", qtype, off)
    body = bytearray(head + bytes(-len(head) % align))
    for _, _, _, _, data in tensors:
        body += data + bytes(-len(data) % align)
    path.write_bytes(bytes(body))
    return path


def tiny_structure():
    """The tiny model as (kvs, tensors) for write_gguf."""
    g = GGUFFile(TINY)
    kvs = []
    for k, v in g.metadata.items():
        t, e = g.types[k]
        if t == V.ARRAY:
            v = list(v) if e == V.STRING else v.tolist()
        kvs.append([k, t, v, e])
    tensors = [[t.name, list(t.dims), t.qtype, None, t.raw.tobytes()] for t in g.tensors.values()]
    return kvs, tensors




def set_key(kvs, key, vtype, value, etype=None):
    """kvs with `key` (re)set as the last entry."""
    kvs = [list(kv) for kv in kvs if kv[0] != key]
    return kvs + [[key, vtype, value, etype]]
