"""scripts/profile_decode.py: the parts it knocks out of a decode step. Every launch of a step is
left out here (kernels/cuda/launch.py's SKIP) and named by the script's `part_of`, so the step's
Python runs in a moment, under the simulator too; the timing itself needs a GPU."""
import importlib.util

import numpy as np
import pytest
from conftest import ROOT
from numba import cuda
from test_cuda_model import tiny_config, tiny_weights
from test_matmul import rng  # noqa: F401  (fixture)

from numba_apr._numba import cuda_jit
from numba_apr.kernels.cuda import launch
from numba_apr.model.cuda import CudaRunner, forward


@cuda_jit
def _fill(out, v):
    out[cuda.threadIdx.x] = v


def profile_script():
    spec = importlib.util.spec_from_file_location("profile_decode", ROOT / "scripts" / "profile_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def step_parts(c, w, T=1):
    """The part of each launch of a forward pass over T tokens, in order; nothing runs."""
    prof = profile_script()
    r = CudaRunner(c, w, 16, 8)
    names, seen = prof.part_names(r.w), []

    def skip(kernel, args):
        seen.append(prof.part_of(kernel, args, names))
        return True
    launch.SKIP = skip
    try:
        forward(c, r.w, r.s, T, r.stream)
    finally:
        launch.SKIP = None
    return seen


def test_a_fused_decode_step_is_five_parts_a_layer(rng):
    """qwen2 decoding: per layer Q/K/V (RoPE and the cache write in its epilogue), attention, wo,
    gate/up, down; the embedding before, the output head after. Nothing else is launched."""
    c = tiny_config("qwen2")
    parts = step_parts(c, tiny_weights(rng, c))
    layer = ["Q/K/V", "attention", "wo", "gate/up", "down"]
    assert parts == ["embedding"] + layer * c.n_layer + ["output head"]


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_every_launch_has_a_part(rng, arch):
    """Unfused helpers (gemma3's q/k norms + RoPE, post-norms) are parts of their own; no launch
    falls through to an unnamed kernel, and every matrix is read."""
    c = tiny_config(arch)
    parts = step_parts(c, tiny_weights(rng, c))
    known = {"embedding", "Q/K/V", "attention", "wo", "gate/up", "down", "output head",
             "quantize_act", "rope_kv", "rmsnorm_add"}
    assert set(parts) <= known, parts
    for p in ("Q/K/V", "attention", "wo", "gate/up", "down"):
        assert parts.count(p) >= c.n_layer, (p, parts)
    assert parts[0] == "embedding" and parts[-1] == "output head"


def test_skip_leaves_a_launch_out():
    """launch.SKIP answering True leaves the kernel unrun; unset, launches run again."""
    out = cuda.to_device(np.zeros(4, np.float32))
    stream = cuda.stream()
    launch.SKIP = lambda kernel, args: kernel is _fill
    try:
        launch.launch(_fill, 1, 4, stream, out, np.float32(2.0))
    finally:
        launch.SKIP = None
    stream.synchronize()
    assert (out.copy_to_host() == 0).all()
    launch.launch(_fill, 1, 4, stream, out, np.float32(3.0))
    stream.synchronize()
    assert (out.copy_to_host() == 3).all()
