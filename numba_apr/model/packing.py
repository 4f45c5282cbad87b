"""Weights repacked for the integer kernels (kernels/cpu/qmatmul.py), and their cache on disk.

Every projection matrix of a type the fast kernels know is repacked once into their interleaved
layout. The repacked bytes of a whole model live in one file,
`<cache>/repacked/<sha256 of the GGUF>-v<layout version>-<instruction-set level>.bin`: the first load writes it, matrix
by matrix, through a memory map; later loads just map it (read-only, shared with the page cache),
so a warm start costs little more than opening the GGUF. The GGUF's hash is computed once and
remembered against its path, size and mtime.

The cache file is input too: a file damaged after it was written (same size, same manifest,
other bytes) must never reach the kernels. Its manifest keeps a checksum per matrix
(kernels/cpu/checksum.py), and a load checks all of them, one pass over the file at memory
speed (what the first decode step reads anyway); a mismatch repacks from the GGUF.

Peak memory stays near one copy of the weights: after a matrix is repacked, the pages of its
source (the GGUF map) and of its output (flushed to the file) are handed back to the kernel.
Without a writable cache folder the repacked weights are kept in memory instead.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

from .gguf_file import GGUFFile, Tensor
from ..kernels.cpu.checksum import checksum
from ..kernels.cpu.isa import LEVEL
from ..kernels.cpu.qmatmul import GROUP, LAYOUT_VERSION, PackedMatrix, packable, repack
from .cpu import Weights
from ..packaged import cache_dir

ALIGN = 4096  # each matrix starts on a page: its pages can be dropped on their own
PAGE = mmap.PAGESIZE


def _matrices(w: Weights):
    """(owner, field name, Tensor) of every matrix that a product reads."""
    for L in w.layers:
        for f in fields(L):
            t = getattr(L, f.name)
            if isinstance(t, Tensor) and len(t.dims) == 2:
                yield L, f.name, t
    yield w, "output", w.output


def _drop_pages(mm: np.memmap, start: int, length: int) -> None:
    """Tell the kernel we are done with mm[start:start+length] (its pages leave our RSS)."""
    m = getattr(mm, "_mmap", None)
    if m is None or not hasattr(mmap, "MADV_DONTNEED") or length <= 0:
        return
    base = mm.ctypes.data - np.frombuffer(m, np.uint8, count=1).ctypes.data  # offset of mm in its map
    lo = (base + start) // PAGE * PAGE
    hi = base + start + length
    try:
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError):
        pass


def _file_sha256(path: str, memo: Path) -> str:
    """sha256 of the file, remembered in `memo` against (path, size, mtime)."""
    st = os.stat(path)
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        known[key] = h.hexdigest()
        try:
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, memo)
        except OSError:
            pass
    return known[key]


def _intact(blob: np.ndarray, manifest, todo, sums) -> bool:
    """Whether every matrix of a cache file still has the checksum it was written with. One
    pass over the file at memory speed (the first decode step reads all of it anyway)."""
    if not isinstance(sums, list) or len(sums) != len(manifest):
        return False
    for (_, _, t), entry, want in zip(todo, manifest, sums):
        off = entry[4]
        if checksum(blob[off:off + PackedMatrix.nbytes_for(t.qtype, t.raw.shape[0], t.dims[0])]) != want:
            return False
    return True


def pack_weights(g: GGUFFile, w: Weights, use_cache: bool = True) -> Weights:
    """Replace every packable matrix of `w` by its PackedMatrix (in place; returns w)."""
    todo = [(owner, name, t) for owner, name, t in _matrices(w) if packable(t.qtype)]
    offsets, total = [], 0
    for _, _, t in todo:
        offsets.append(total)
        total += -(-PackedMatrix.nbytes_for(t.qtype, t.raw.shape[0], t.dims[0]) // ALIGN) * ALIGN
    if not todo:
        return w
    manifest = [[t.name, int(t.qtype), int(t.raw.shape[0]), int(t.dims[0]), off] for (_, _, t), off in zip(todo, offsets)]

    blob, path = None, None
    if use_cache:
        folder = cache_dir() / "repacked"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{_file_sha256(g.path, folder / 'hashes.json')}-v{LAYOUT_VERSION}-{LEVEL}.bin"
            meta = path.with_suffix(".json")
            if path.exists() and path.stat().st_size == total:
                saved = json.loads(meta.read_text())
                if isinstance(saved, dict) and saved.get("matrices") == manifest:
                    blob = np.memmap(path, dtype=np.uint8, mode="r")
                    if not _intact(blob, manifest, todo, saved.get("checksums")):
                        print(f"numba_apr: {path} was damaged since it was written: repacking", file=sys.stderr)
                        del blob
                        blob = None
        except (OSError, ValueError):
            path = None

    if blob is None:
        out, tmp = None, None
        if path is not None:
            try:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    # Reserve the blocks now: a full disk then fails here, with OSError,
                    # not later as SIGBUS on a write through the map.
                    os.posix_fallocate(f.fileno(), 0, total)
                out = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=(total,))
            except OSError:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
                out, tmp = None, None
        if out is None:
            out = np.empty(total, np.uint8)
        sums = []
        for (_, _, t), off in zip(todo, offsets):
            n = PackedMatrix.nbytes_for(t.qtype, t.raw.shape[0], t.dims[0])
            G = -(-t.raw.shape[0] // GROUP)
            repack(t.name, t.raw, t.qtype, t.dims[0], out=out[off:off + n].reshape(G, n // G))
            sums.append(checksum(out[off:off + n]))
            _drop_pages(g._map, t.raw.ctypes.data - g._map.ctypes.data, t.raw.nbytes)
            if tmp is not None:
                out.flush()
                _drop_pages(out, off, n)
        if tmp is not None:
            out.flush()
            del out
            os.replace(tmp, path)
            path.with_suffix(".json").write_text(json.dumps({"matrices": manifest, "checksums": sums}))
            blob = np.memmap(path, dtype=np.uint8, mode="r")
        else:
            blob = out

    for (owner, name, t), off in zip(todo, offsets):
        n = PackedMatrix.nbytes_for(t.qtype, t.raw.shape[0], t.dims[0])
        G = -(-t.raw.shape[0] // GROUP)
        data = blob[off:off + n].view(np.ndarray).reshape(G, n // G)
        setattr(owner, name, PackedMatrix(t.name, t.qtype, t.raw.shape[0], t.dims[0], data))
    w.blob = blob
    return w
