"""The CUDA attention (kernels/cuda/attention.py) against its float64 reference, on fresh random
data every run (the seed is printed and named in every failure). In CI the kernels run under
numba's CUDA simulator (conftest.py sets NUMBA_ENABLE_CUDASIM=1 before numba is imported), so
the shapes are tiny; with NUMBA_ENABLE_CUDASIM=0 on a GPU machine they run on the GPU.

Cache rows past the batch's last position are NaN, as unwritten memory may be: a kernel that
lets them into a result fails. Rows of `out` past T are NaN too and must stay so."""
import numpy as np
import pytest
from numba import config, cuda

from numba_apr.kernels.cuda import attention as attention_module
from numba_apr.kernels.cuda.attention import attention, attention_ref, attention_workspace
from numba_apr.kernels.cuda.ops import ActBuffers
from numba_apr.kernels.cuda.qmatmul import quantize_act_ref

if not (config.ENABLE_CUDASIM or cuda.is_available()):
    pytest.skip("no CUDA GPU and the simulator is off (NUMBA_ENABLE_CUDASIM=0)", allow_module_level=True)

SEED = np.random.SeedSequence().entropy


@pytest.fixture
def rng():
    print("seed", SEED)
    return np.random.default_rng(SEED)


def run(rng, *, T, pos0, n_head, n_head_kv, D, DV, window=0, n_ctx=40, n_split=None, workspace=True, quant=False, short=False):
    T_max = T + 2
    # q as the model passes it: a column slice of the wider [q | k | v] buffer (strided rows).
    qkv = rng.standard_normal((T_max, n_head * D + 48)).astype(np.float32)
    k = rng.standard_normal((n_ctx, n_head_kv * D)).astype(np.float16)
    v = rng.standard_normal((n_ctx, n_head_kv * DV)).astype(np.float16)
    k[pos0 + T:] = np.nan
    v[pos0 + T:] = np.nan
    scale = 1.0 / np.sqrt(D)
    want = attention_ref(qkv[:T, :n_head * D], k, v, pos0, n_head, n_head_kv, D, DV, scale, window)

    d_qkv, d_k, d_v = cuda.to_device(qkv), cuda.to_device(k), cuda.to_device(v)
    d_out = cuda.to_device(np.full((T_max, n_head * DV), np.nan, np.float32))
    d_pos = cuda.to_device(np.array([pos0], np.int32))
    ws = attention_workspace(n_ctx, n_head, DV, max_T=T, n_split=n_split) if workspace else None
    stream = cuda.stream()
    dst = ActBuffers.allocate(T, n_head * DV) if quant else None
    q8 = attention(d_out, d_qkv[:, :n_head * D], d_k, d_v, d_pos, T, n_head, n_head_kv, D, DV, scale, window,
                   stream, ws, dst, short)
    stream.synchronize()
    got = d_out.copy_to_host()
    assert np.isnan(got[T:]).all(), f"rows past T written (seed {SEED})"
    if ws is not None:
        assert not ws[2].copy_to_host().any(), "the merging block resets its head group's count"
    np.testing.assert_allclose(got[:T], want, rtol=1e-4, atol=1e-5, err_msg=f"seed {SEED}")
    if quant:   # the epilogue: the q8 of out, as quantize_act would write it
        q, d = quantize_act_ref(got[:T])
        assert np.array_equal(q8.xq8.copy_to_host()[:T], q), f"seed {SEED}"
        np.testing.assert_allclose(q8.xd.copy_to_host()[:T], d, rtol=1e-6)
        assert np.array_equal(q8.xs.copy_to_host()[:T], q.reshape(T, -1, 16).astype(np.int32).sum(2))


@pytest.mark.parametrize("pos0", [0, 1, 17, 39])
def test_decode_positions(rng, pos0):
    # GQA: 4 query heads over 2 kv heads, one block per kv head (both its query heads).
    run(rng, T=1, pos0=pos0, n_head=4, n_head_kv=2, D=64, DV=64)


@pytest.mark.parametrize("window", [0, 200])
def test_decode_split_k(rng, window):
    # 300 visible positions over 4 splits of 128 keys: 3 splits have keys, the 4th exits (with
    # the window: positions 100..299, 2 splits); the last of them merges the partials.
    run(rng, T=1, pos0=299, n_head=2, n_head_kv=1, D=32, DV=32, n_ctx=304, n_split=4, window=window)


def test_decode_short_context_one_head_a_block(rng):
    # 3 query heads a kv head, each in blocks of its own (short=True), split over the positions.
    run(rng, T=1, pos0=130, n_head=6, n_head_kv=2, D=32, DV=32, n_ctx=140, n_split=3, short=True)


def test_decode_short_context_at_its_end(rng):
    # short=True at the last position it promises (SHORT_CTX keys): 8 splits of KEYS keys of the
    # workspace's 12, the other 4 empty; the last of the 8 to finish merges them.
    run(rng, T=1, pos0=attention_module.SHORT_CTX - 1, n_head=2, n_head_kv=1, D=32, DV=32,
        n_ctx=12 * attention_module.KEYS, n_split=12, short=True)


@pytest.mark.parametrize("T,quant,workspace", [(1, True, False), (2, False, False), (2, True, True)])
def test_decode_one_split(rng, T, quant, workspace):
    # One block a query head takes every position: without a workspace (two steps of 128 keys
    # here), or, with one, where the context has no more than KEYS positions; it writes (and
    # quantizes) the output itself.
    run(rng, T=T, pos0=150 if not workspace else 100, n_head=6, n_head_kv=2, D=32, DV=64, n_ctx=160, n_split=3,
        quant=quant, short=True, workspace=workspace)


def test_decode_one_head_a_block_window_several_trips(rng):
    # One query head a block (MHA) loads each trip's K and V rows ahead (AHEAD): 200 windowed
    # keys in one block, two trips, the second partial; DV = 96, so a lane's second V word is
    # partial too.
    run(rng, T=1, pos0=299, n_head=2, n_head_kv=2, D=64, DV=96, n_ctx=304, window=200, workspace=False)


def test_decode_combine_quantizes_for_the_next_product(rng):
    run(rng, T=2, pos0=150, n_head=4, n_head_kv=2, D=64, DV=64, n_ctx=160, n_split=3, quant=True)


def test_decode_window_no_workspace(rng):
    # The visible positions start past 0; no workspace: one block writes out directly.
    run(rng, T=1, pos0=30, n_head=4, n_head_kv=2, D=64, DV=64, window=8, workspace=False)


def test_decode_small_batch(rng):
    # T = 2 <= DECODE_MAX_T: one block per (kv head, token), partials through the workspace.
    run(rng, T=2, pos0=12, n_head=4, n_head_kv=2, D=32, DV=32, n_split=2)


def test_prompt_gqa(rng):
    # T = 9 > DECODE_MAX_T: the tiled kernel, tokens 7..15, 4 query heads over 2 kv heads.
    run(rng, T=9, pos0=7, n_head=4, n_head_kv=2, D=64, DV=64)


def test_head_groups_split_over_blocks(rng, monkeypatch):
    # A group larger than a block's head budget (as a group of 16 at head dim 128) spreads over
    # several blocks: here one query head a block, 4 heads over 2 kv heads.
    monkeypatch.setattr(attention_module, "HB_MAX", 1)
    run(rng, T=1, pos0=9, n_head=4, n_head_kv=2, D=32, DV=32)
    run(rng, T=5, pos0=9, n_head=4, n_head_kv=2, D=32, DV=32)


def test_prompt_window_tiles(rng):
    # 40 keys in two tiles for the late tokens, and a window of 5 that cuts most of them.
    run(rng, T=6, pos0=33, n_head=2, n_head_kv=2, D=64, DV=64, window=5)


def test_prompt_group3_head_dim_32(rng):
    # Group of 3 (SmolLM2-135M's 9/3): a block serves 3 heads x 5 tokens (15 of its 16 rows).
    run(rng, T=7, pos0=3, n_head=3, n_head_kv=1, D=32, DV=32)


def test_head_dim_128(rng):
    # The common head size, decoding and a prompt; MHA (no grouping).
    run(rng, T=1, pos0=21, n_head=2, n_head_kv=2, D=128, DV=128)
    run(rng, T=5, pos0=2, n_head=2, n_head_kv=2, D=128, DV=128)


def test_head_dims_differ(rng):
    # head_dim_v != head_dim (and not a multiple of 64: a lane's second V word is partial).
    run(rng, T=1, pos0=11, n_head=2, n_head_kv=1, D=64, DV=96)
    run(rng, T=5, pos0=11, n_head=2, n_head_kv=1, D=64, DV=96)


def test_reference_matches_cpu_kernel_reference():
    # The oracle itself against the CPU module's reference (same definition, written twice).
    from numba_apr.kernels.cpu.attention import attention_ref as cpu_ref
    r = np.random.default_rng(0)
    q = r.standard_normal((3, 4 * 16)).astype(np.float32)
    k = r.standard_normal((12, 2 * 16)).astype(np.float16)
    v = r.standard_normal((12, 2 * 8)).astype(np.float16)
    for window in (0, 4):
        np.testing.assert_allclose(attention_ref(q, k, v, 5, 4, 2, 16, 8, 0.25, window),
                                   cpu_ref(q, k, v, 5, 4, 2, 16, 8, 0.25, window), rtol=1e-12)
