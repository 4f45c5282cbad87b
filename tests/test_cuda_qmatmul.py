"""The CUDA quantized products (kernels/cuda/qmatmul.py) and activation kernels (ops.py) against
their float64 references, on fresh random data every run. In CI they run under numba's CUDA
simulator (tiny shapes); with NUMBA_ENABLE_CUDASIM=0 on a GPU machine, on the GPU."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from numba import cuda
from test_matmul import SEED, rng  # noqa: F401  (fixture)
from test_quants import random_rows

from numba_apr.kernels.cuda import ops, ptx
from numba_apr.kernels.cuda import qmatmul as qm

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F32", "F16", "BF16"]


def case(rng, name, N, K):
    bs = 256 if name.endswith("_K") else 32
    raw = random_rows(rng, name, N, K // bs if bs > 1 and name[0] == "Q" else K, scale=0.05)
    return raw


def run_product(raw, name, K, x, accumulate_into=None, bias=None, col=0):
    """The product through qmatmul, written to columns col.. of an output 3 columns wider."""
    T, N = x.shape[0], raw.shape[0]
    m = qm.upload(raw, Q[name], K)
    act = ops.ActBuffers.allocate(T, K)
    src = cuda.to_device(x)
    ops.quantize_act(act, src, T, 0)
    init = np.zeros((T, N), np.float32) if accumulate_into is None else accumulate_into
    wide = np.full((T, N + 3), np.float32(7.0))
    wide[:, col:col + N] = init
    out = cuda.to_device(wide)
    if bias is not None:
        bias = np.concatenate([np.full(col, np.float32(np.nan)), bias]).astype(np.float32)
    qm.qmatmul(out, m, act, T, 0, bias=None if bias is None else cuda.to_device(bias),
               accumulate=accumulate_into is not None, col=col)
    got = out.copy_to_host()
    outside = np.delete(got, np.s_[col:col + N], axis=1)
    assert np.all(outside == 7.0), "wrote outside its columns"
    return got[:, col:col + N]


def check_bias_and_accumulate(rng, name, N, K, T):
    """An N x K product of T tokens with a bias, added into a residual, into columns 2.. of a
    wider output, against the reference."""
    raw = case(rng, name, N, K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    res = rng.standard_normal((T, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    want = qm.qmatmul_ref(raw, Q[name], K, x) + bias + res
    check(run_product(raw, name, K, x, accumulate_into=res.copy(), bias=bias, col=2), want, K)


def check(got, want, K):
    # float32 sums of exact integer dots: error ~ sqrt(K) ulps of the terms
    scale = np.abs(want).max() + 1e-30
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale * np.sqrt(K / 32),
                               err_msg=f"seed {SEED}")


@pytest.mark.parametrize("name", TYPES)
def test_decode_product_every_type(rng, name):
    K = 512 if name.endswith("_K") else 96
    raw = case(rng, name, 6, K)
    x = rng.standard_normal((1, K)).astype(np.float32)
    check(run_product(raw, name, K, x), qm.qmatmul_ref(raw, Q[name], K, x), K)


@pytest.mark.parametrize("plan,T", [((1, 1, 1, False, 0), 1), ((2, 1, 1, True, 0), 1), ((2, 2, 1, True, 0), 2),
                                    ((1, 4, 1, False, 0), 2)])
def test_decode_rows_of_several_trips(rng, monkeypatch, plan, T):
    """A row longer than a warp's first trip (80 units: 32 or 64 a trip, the last partial): the
    first trip's units are loaded before the wait, the rest in the loop after it; rows split
    over 2 or 4 warps, for one token or several (a batched decode step)."""
    monkeypatch.setattr(qm, "_plan", lambda n_units, rows, epi, nbytes: plan)
    K = 2560
    raw = case(rng, "Q4_K", 5, K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    check(run_product(raw, "Q4_K", K, x), qm.qmatmul_ref(raw, Q.Q4_K, K, x), K)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q5_0"])
def test_prompt_tile_bias_and_accumulate(rng, monkeypatch, name):
    """1 < T < FEW_MIN_T goes through the decode kernel in groups of MAX_NT tokens (a partial one
    too: FEW_MIN_T raised for it); bias and residual add."""
    T = qm.MAX_NT + 2
    monkeypatch.setattr(qm, "FEW_MIN_T", T + 1)
    assert T < qm.MMA_MIN_T
    check_bias_and_accumulate(rng, name, 5, 256 if name.endswith("_K") else 64, T)


@pytest.mark.parametrize("name,T,plan", [("Q4_K", 3, None), ("Q6_K", 8, (2, 2)), ("Q5_0", 11, (4, 1))])
def test_few_tokens_tensor_cores(rng, monkeypatch, name, T, plan):
    """FEW_MIN_T <= T < MMA_MIN_T goes to the few-token tensor-core kernel: two row tiles (the
    second partial), K over three or four steps (a partial one for the 32-value types), a token
    group of 8 (and a partial second one at T = 11), K split over 2 and 4 warps; bias and
    residual add, into columns `col` onwards."""
    monkeypatch.setattr(qm, "FEW_MIN_T", 3)   # (off by default until timed on a GPU)
    assert qm.FEW_MIN_T <= T < qm.MMA_MIN_T
    monkeypatch.setattr(qm, "_KERNELS", {})
    if plan:
        monkeypatch.setattr(qm, "_few_plan", lambda n_units, rows: plan)
    K = 4 * qm.MMA_K if name.endswith("_K") else 2 * qm.MMA_K + 32   # (Q5_0: 9 units, the 3rd step partial)
    N = 16 + 5
    check_bias_and_accumulate(rng, name, N, K, T)
    assert [key[-1] for key in qm._KERNELS] == [(*(plan or qm._few_plan(K // 32, N)), False)]


@pytest.mark.parametrize("name,mode,T", [("Q4_K", ops.MODE_SILU, 3), ("Q6_K", ops.MODE_GELU, 8),
                                         ("Q5_0", ops.MODE_SILU, 10)])
def test_few_tokens_gated(rng, monkeypatch, name, mode, T):
    """A batched decode step's [gate; up] product of a few tokens (qmatmul_gated with T > 1): the
    float act(gate . x) * (up . x) and its q8 (a scale per 32), made by the block whose 32 rows
    are the q8 block; two blocks, a partial second token group at T = 10."""
    from numba_apr.kernels.cpu.ops import gated_act_ref
    monkeypatch.setattr(qm, "FEW_MIN_T", 3)
    K, half = (256, 64) if name.endswith("_K") else (160, 64)
    raw = case(rng, name, 2 * half, K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    act = ops.ActBuffers.allocate(T, K)
    ops.quantize_act(act, cuda.to_device(x), T, 0)
    m = qm.upload(raw, Q[name], K)
    assert qm.gated_takes(m, T)
    nxt = qm.qmatmul_gated(m, act, 0, ops.ActBuffers.allocate(T + 1, half), mode, T)
    gu = qm.qmatmul_ref(raw, Q[name], K, x)
    want = gated_act_ref(gu[:, :half], gu[:, half:], mode == ops.MODE_GELU)
    got = nxt.xf.copy_to_host()[:T]
    tol = 1e-4 * np.abs(want).max() * np.sqrt(K / 32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol, err_msg=f"seed {SEED}")
    assert not nxt.x16
    q, d = qm.quantize_act_ref(got)
    assert np.array_equal(nxt.xq8.copy_to_host()[:T], q), f"seed {SEED}"
    np.testing.assert_allclose(nxt.xd.copy_to_host()[:T], d, rtol=1e-6)
    assert np.array_equal(nxt.xs.copy_to_host()[:T], q.reshape(T, -1, 16).astype(np.int32).sum(2))


@pytest.mark.skipif(ptx.SIM, reason="every type: minutes under the simulator (its three are above)")
@pytest.mark.parametrize("name", TYPES[:8])
def test_few_tokens_tensor_cores_every_type(rng, monkeypatch, name):
    monkeypatch.setattr(qm, "FEW_MIN_T", 3)
    K = 512 if name.endswith("_K") else 96
    raw = case(rng, name, 40, K)
    x = rng.standard_normal((8, K)).astype(np.float32)
    check(run_product(raw, name, K, x), qm.qmatmul_ref(raw, Q[name], K, x), K)


def dequantized_q8(act, K):
    """The values an ActBuffers' q8 holds (row 0), and its quantization step per value."""
    g = 16 if act.x16 else 32
    q = act.xq8.copy_to_host()[0, :K].astype(np.float64)
    d = np.repeat(act.xd.copy_to_host()[0, :K // g].astype(np.float64), g)
    assert np.array_equal(act.xs.copy_to_host()[0, :K // 16], q.reshape(-1, 16).sum(1)), "sums per 16"
    return q * d, d


# The epilogue does not depend on the weights' type (each type's units: the tests above); the
# simulator takes ~50 s a K-quant here (256 x 256), so CI runs the 32-value type, a GPU all three.
@pytest.mark.parametrize("name", ["Q5_0"] if ptx.SIM else ["Q4_K", "Q6_K", "Q5_0"])
def test_decode_epilogue_quantizes_the_next_input(rng, name):
    """Decoding, x += W1 . a then a' = q8(x * w) with x's sums of squares per 32 (qmatmul_quant),
    and W2 . a' scaled by 1 / rms(x) (the norm the consumer finishes) = W2 . rmsnorm(x) * w."""
    K, N = (256, 256) if name.endswith("_K") else (64, 64)
    raw1, raw2 = case(rng, name, N, K), case(rng, name, 5, N)
    x = rng.standard_normal((1, K)).astype(np.float32)
    res = rng.standard_normal((1, N)).astype(np.float32)
    w = rng.standard_normal(N).astype(np.float32)
    m1, m2 = qm.upload(raw1, Q[name], K), qm.upload(raw2, Q[name], N)
    act = ops.ActBuffers.allocate(1, K)
    ops.quantize_act(act, cuda.to_device(x), 1, 0)
    d_res, ss = cuda.to_device(res), cuda.device_array(N // 32, np.float32)
    nxt = qm.qmatmul_quant(d_res, m1, act, 0, ops.ActBuffers.allocate(1, N), cuda.to_device(w), ss, 1e-6)
    new = d_res.copy_to_host()
    check(new, res + qm.qmatmul_ref(raw1, Q[name], K, x), K)
    q, d = qm.quantize_act_ref(new * w)
    assert np.array_equal(nxt.xq8.copy_to_host()[:, :N], q), f"seed {SEED}"
    np.testing.assert_allclose(nxt.xd.copy_to_host(), d, rtol=1e-6)
    np.testing.assert_allclose(ss.copy_to_host(), (new.astype(np.float64) ** 2).reshape(-1, 32).sum(1), rtol=1e-5)
    out = cuda.to_device(np.zeros((1, 5), np.float32))
    qm.qmatmul(out, m2, nxt, 1, 0)
    new64 = new.astype(np.float64)
    normed = (new64 / np.sqrt((new64 ** 2).mean() + 1e-6) * w).astype(np.float32)
    check(out.copy_to_host(), qm.qmatmul_ref(raw2, Q[name], N, normed), N)


@pytest.mark.parametrize("name,mode", [("Q4_K", ops.MODE_SILU), ("Q8_0", ops.MODE_GELU)])
def test_decode_gated_epilogue(rng, name, mode):
    """Decoding, [gate; up] in one matrix: the q8 of act(gate . x) * (up . x) (qmatmul_gated)."""
    from numba_apr.kernels.cpu.ops import gated_act_ref
    K, half = (256, 64) if name.endswith("_K") else (96, 64)
    raw = case(rng, name, 2 * half, K)
    x = rng.standard_normal((1, K)).astype(np.float32)
    act = ops.ActBuffers.allocate(1, K)
    ops.quantize_act(act, cuda.to_device(x), 1, 0)
    nxt = qm.qmatmul_gated(qm.upload(raw, Q[name], K), act, 0, ops.ActBuffers.allocate(1, half), mode)
    gu = qm.qmatmul_ref(raw, Q[name], K, x)
    want = gated_act_ref(gu[:, :half], gu[:, half:], mode == ops.MODE_GELU)[0]
    got, step = dequantized_q8(nxt, half)
    tol = 1e-4 * np.abs(want).max() * np.sqrt(K / 32)
    assert np.all(np.abs(got - want) <= step / 2 * 1.001 + tol), f"seed {SEED}"
    np.testing.assert_allclose(nxt.xf.copy_to_host()[0], want, rtol=1e-4, atol=tol)
    assert not nxt.count.copy_to_host().any(), "the last block of each group resets its counter"


@pytest.mark.parametrize("plan", [None, (1, 2, 1, False, 512)])
def test_decode_product_reads_scales_per_16(rng, monkeypatch, plan):
    """Decoding, an input whose q8 has a scale per 16 values (an ActBuffers view with x16, as the
    gated epilogue writes it), read from global memory or staged in shared memory first (SK)."""
    if plan is not None:
        monkeypatch.setattr(qm, "_plan", lambda n_units, rows, epi, nbytes: plan)
    K, N = 512, 8
    raw = case(rng, "Q6_K", N, K)
    x = rng.standard_normal((1, K)).astype(np.float32)
    x[0, :16] *= 100.0        # one block of 16 much larger: per-32 scales would lose its neighbours
    q, d = qm.quantize_act_ref(x, 16)
    act = ops.ActBuffers.allocate(1, K).cols(K, x16=True)
    act.xq8.copy_to_device(q)
    act.xd.copy_to_device(d)
    act.xs.copy_to_device(q.reshape(1, -1, 16).sum(2, dtype=np.int32))
    out = cuda.to_device(np.zeros((1, N), np.float32))
    qm.qmatmul(out, qm.upload(raw, Q.Q6_K, K), act, 1, 0)
    from gguf.quants import dequantize
    W = dequantize(raw, Q.Q6_K).reshape(N, K).astype(np.float64)
    want = (q.astype(np.float64) * np.repeat(d.astype(np.float64), 16, axis=1)) @ W.T
    check(out.copy_to_host(), want, K)


@pytest.mark.parametrize("plan,gated,group_blocks", [
    ((2, 4, 1, True, 0), False, 3), ((1, 2, 1, False, 256), False, 3), ((1, 1, 2, True, 0), True, 3),
    ((2, 1, 2, False, 256), True, 3), ((2, 1, 1, True, 0), True, 3), ((2, 1, 1, False, 0), False, 3),
    ((2, 1, 1, True, 0), True, 0), ((2, 1, 1, True, 0), False, 0)])
def test_decode_plans(rng, monkeypatch, plan, gated, group_blocks):
    """Every decode plan (units a lane a trip, warps a row, rows a warp, weights sent to L2
    first or not, activations staged in shared memory or not: qmatmul._plan picks one by shape,
    which shapes small enough for the simulator would not reach) gives the same results through
    both quantizing epilogues: split rows and two rows a warp (a q8 block of the output over
    several blocks: the counter), one warp a row in blocks of 32 (a q8 block a block, LOCAL), and
    the latter with GROUP_BLOCKS off (the counter again)."""
    monkeypatch.setattr(qm, "_plan", lambda n_units, rows, epi, nbytes: plan)
    monkeypatch.setattr(qm, "GROUP_BLOCKS", group_blocks)
    K, N = 256, 64
    raw = case(rng, "Q4_K", 2 * N if gated else N, K)
    x = rng.standard_normal((1, K)).astype(np.float32)
    act = ops.ActBuffers.allocate(1, K)
    ops.quantize_act(act, cuda.to_device(x), 1, 0)
    want = qm.qmatmul_ref(raw, Q.Q4_K, K, x)
    if gated:
        from numba_apr.kernels.cpu.ops import gated_act_ref
        nxt = qm.qmatmul_gated(qm.upload(raw, Q.Q4_K, K), act, 0, ops.ActBuffers.allocate(1, N), ops.MODE_SILU)
        got = nxt.xf.copy_to_host()[:, :N]
        check(got, gated_act_ref(want[:, :N], want[:, N:], False), K)
        assert nxt.x16 == (qm.GATED_GROUP == 16)
        q, d = qm.quantize_act_ref(got, qm.GATED_GROUP)
        assert np.array_equal(nxt.xq8.copy_to_host()[:, :N], q), f"seed {SEED}"
        np.testing.assert_allclose(nxt.xd.copy_to_host()[:, :N // qm.GATED_GROUP], d, rtol=1e-6)
    else:
        res = rng.standard_normal((1, N)).astype(np.float32)
        d_res = cuda.to_device(res)
        nxt = qm.qmatmul_quant(d_res, qm.upload(raw, Q.Q4_K, K), act, 0, ops.ActBuffers.allocate(1, N))
        new = d_res.copy_to_host()
        check(new, res + want, K)
        assert np.array_equal(nxt.xq8.copy_to_host()[:, :N], qm.quantize_act_ref(new)[0]), f"seed {SEED}"
    assert not nxt.count.copy_to_host().any(), "the last block of each group resets its counter"


@pytest.mark.parametrize("plan,K,gated", [((1, 1, 1, True, 0), 2048, False), ((2, 4, 1, False, 0), 512, False),
                                           ((1, 1, 2, True, 0), 256, True)])
def test_decode_product_quantizes_its_input(rng, monkeypatch, plan, K, gated):
    """Decoding, the input left as rmsnorm(x) * w unquantized (ActBuffers.normed): the product
    quantizes it into shared memory itself (QIN), 8 values a thread, in two passes of the
    block's 128 threads (K = 2048) or one of 512 (rows split over 4 warps), and through the
    gated epilogue (two rows a warp) = the product of q8(x * w), scaled by 1 / rms(x)."""
    from numba_apr.kernels.cpu.ops import gated_act_ref
    monkeypatch.setattr(qm, "_plan", lambda n_units, rows, epi, nbytes: plan)
    N, eps = 8, 1e-6
    raw = case(rng, "Q4_K", 2 * N if gated else N, K)
    x = rng.standard_normal((1, K)).astype(np.float32)
    nw = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    act = ops.ActBuffers.allocate(1, K).normed(cuda.to_device(x), cuda.to_device(nw), eps)
    rms = np.sqrt((x.astype(np.float64) ** 2).mean() + eps)
    want = qm.qmatmul_ref(raw, Q.Q4_K, K, x * nw) / rms
    m = qm.upload(raw, Q.Q4_K, K)
    if gated:
        nxt = qm.qmatmul_gated(m, act, 0, ops.ActBuffers.allocate(1, N), ops.MODE_SILU)
        check(nxt.xf.copy_to_host(), gated_act_ref(want[:, :N], want[:, N:], False), K)
    else:
        out = cuda.to_device(np.zeros((1, N), np.float32))
        qm.qmatmul(out, m, act, 1, 0)
        check(out.copy_to_host(), want, K)


@pytest.mark.parametrize("name,K", [("Q6_K", 1280), ("Q8_0", 256), ("Q4_K", 1536)])
def test_decode_output_head(rng, monkeypatch, name, K):
    """The output heads' kernel (HEAD_ROWS lowered so that a small matrix takes it): 4 rows a
    warp, the rows ending inside the last block, a second unit a lane (Q6_K: 40 units a row) or
    two rows a half-warp (Q4_K: 48 units, 3 a lane), and the input as the last layer's product
    leaves it: the q8 of x * norm weight, 1 / rms(x) still to apply (ActBuffers.pending)."""
    monkeypatch.setattr(qm, "HEAD_ROWS", 1)
    N, eps = 37, 1e-6
    raw = case(rng, name, N, K)
    x = rng.standard_normal((1, K)).astype(np.float32)
    nw = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    act = ops.ActBuffers.allocate(1, K)
    ops.quantize_act(act, cuda.to_device(x * nw), 1, 0)
    ss = (x.astype(np.float64).reshape(-1, 32) ** 2).sum(axis=1).astype(np.float32)
    act = act.pending(cuda.to_device(ss), eps)
    out = cuda.to_device(np.full((1, N + 3), 7.0, np.float32))
    qm.qmatmul(out, qm.upload(raw, Q[name], K), act, 1, 0, col=2)
    got = out.copy_to_host()
    rms = np.sqrt((x.astype(np.float64) ** 2).mean() + eps)
    check(got[:, 2:2 + N], qm.qmatmul_ref(raw, Q[name], K, x * nw) / rms, K)
    assert np.all(got[:, :2] == 7.0) and np.all(got[:, 2 + N:] == 7.0), "wrote outside its columns"


@pytest.mark.parametrize("neox,together", [(True, True), (False, False)])
def test_decode_rope_epilogue(rng, neox, together):
    """Decoding, the Q/K/V product that rotates q and k itself and writes the cache
    (qmatmul_rope) = the product, then ops.rope_kv; here with [q | k] and v as two matrices of
    different types (in one launch, or one each), and a bias."""
    from types import SimpleNamespace
    K, n_head, n_kv, hd, n_ctx, p = 64, 2, 1, 32, 8, 5
    nq, nk = n_head * hd, n_kv * hd
    c = SimpleNamespace(n_head=n_head, n_head_kv=n_kv, head_dim=hd, head_dim_v=hd, rope_dim=hd,
                        rope_neox=neox, norm_eps=1e-6)
    mats = [(case(rng, "Q8_0", nq + nk, K), "Q8_0", 0), (case(rng, "Q5_0", nk, K), "Q5_0", nq + nk)]
    dm = [(qm.upload(raw, Q[t], K), col) for raw, t, col in mats]
    x = rng.standard_normal((1, K)).astype(np.float32)
    act = ops.ActBuffers.allocate(1, K)
    ops.quantize_act(act, cuda.to_device(x), 1, 0)
    bias = cuda.to_device(rng.standard_normal(nq + 2 * nk).astype(np.float32))
    pos = cuda.to_device(np.array([p], np.int32))
    table = ops.rope_table(n_ctx, hd, 10000.0)
    noise = rng.standard_normal((n_ctx, nk)).astype(np.float16)
    results = []
    for fused in (False, True):
        qkv = cuda.to_device(np.zeros((1, nq + 2 * nk), np.float32))
        kc, vc = cuda.to_device(noise), cuda.to_device(noise)
        for i, (m, col) in enumerate(dm):
            if fused and (i == 0 or not together):
                qm.qmatmul_rope(qkv, dm if together else [(m, col)], act, 0, bias, pos, table, kc, vc,
                                nq + nk, nq, hd, neox)
            elif not fused:
                qm.qmatmul(qkv, m, act, 1, 0, bias=bias, col=col)
        if not fused:
            ops.rope_kv(qkv, pos, 1, c, table, None, None, kc, vc, 0, act.empty)
        results.append((qkv.copy_to_host()[:, :nq], kc.copy_to_host(), vc.copy_to_host()))
    (q0, k0, v0), (q1, k1, v1) = results
    np.testing.assert_allclose(q1, q0, rtol=1e-5, atol=1e-5, err_msg=f"seed {SEED}")
    np.testing.assert_allclose(k1.astype(np.float32), k0.astype(np.float32), rtol=2e-3, atol=1e-4)
    np.testing.assert_array_equal(v1, v0)
    assert np.array_equal(np.delete(k1, p, 0), np.delete(noise, p, 0)), "only row pos[0] of the cache is written"


@cuda.jit
def _mma_probe(a, b, d):
    lane = cuda.threadIdx.x
    g, q = lane >> 2, lane & 3
    c = ptx.mma_s8(a[g, q], a[g + 8, q], b[g, q])
    d[g, 2 * q], d[g, 2 * q + 1], d[g + 8, 2 * q], d[g + 8, 2 * q + 1] = c[0], c[1], c[2], c[3]


@cuda.jit
def _mma_k32_probe(a, b, d):
    lane = cuda.threadIdx.x
    g, q = lane >> 2, lane & 3
    c = ptx.mma_s8_k32(a[g, q], a[g + 8, q], a[g, 4 + q], a[g + 8, 4 + q], b[g, q], b[g, 4 + q])
    d[g, 2 * q], d[g, 2 * q + 1], d[g + 8, 2 * q], d[g + 8, 2 * q + 1] = c[0], c[1], c[2], c[3]


@pytest.mark.parametrize("k", [16, 32])
def test_mma_fragment_layout(rng, k):
    """ptx.mma_s8 / mma_s8_k32 are D = A @ B with the fragment layout the docstring gives (on a
    GPU: the tensor-core instructions themselves, so a wrong layout assumption fails here)."""
    A = rng.integers(-128, 128, (16, k)).astype(np.int8)
    B = rng.integers(-128, 128, (k, 8)).astype(np.int8)
    d = cuda.to_device(np.zeros((16, 8), np.int32))
    probe = _mma_probe if k == 16 else _mma_k32_probe
    probe[1, 32](cuda.to_device(A.view(np.int32)), cuda.to_device(np.ascontiguousarray(B.T).view(np.int32)), d)
    np.testing.assert_array_equal(d.copy_to_host(), A.astype(np.int64) @ B.astype(np.int64))


# The simulator takes ~60 s a type here (CI): there, two of the three ways a unit's halves lie in
# the tile (32 and 64 values apart; Q6_K also the k16 path), the third (16: Q4_0) being
# test_prompt_product_gpu_tiles's; on a GPU, every type.
TC_TYPES = ["Q4_K", "Q6_K"] if ptx.SIM else TYPES[:8]


@pytest.mark.parametrize("name", TC_TYPES)
def test_prompt_product_tensor_cores(rng, name):
    """T >= MMA_MIN_T goes to the tensor-core kernel: two row blocks and two tiles of tokens
    (the second partial), K over two steps (a partial one for the 32-value types), bias and
    residual add, into columns `col` onwards of a wider output."""
    K = 2 * qm.MMA_K if name.endswith("_K") else qm.MMA_K + 32
    WR, WT = qm.mma_tiles()
    check_bias_and_accumulate(rng, name, 16 * WR + 6, K, 8 * qm.MMA_NTILE * WT + 4)


def test_prompt_product_gpu_tiles(rng):
    """The GPU's tile configuration (the simulator's qmatmul uses smaller blocks): one partial
    block of 8 x 2 warps, K over a full and a partial step."""
    name, K, N, T = "Q4_0", qm.MMA_K + 32, 20, 20
    raw = case(rng, name, N, K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    m = qm.upload(raw, Q[name], K)
    act = ops.ActBuffers.allocate(T, K)
    ops.quantize_act(act, cuda.to_device(x), T, 0)
    out = cuda.to_device(np.zeros((T, N), np.float32))
    k = qm._make_mma_kernel(qm.UNITS[Q[name]], True, WR=8, WT=2)
    k[(1, 1), 512, 0](out, 0, m.w, m.o_qh, m.o_sc, m.s_qs, m.s_qh, m.s_sc, N, K // 32, act.xq, act.xd, act.xs, T,
                      act.empty, False)
    check(out.copy_to_host(), qm.qmatmul_ref(raw, Q[name], K, x), K)


def test_quantize_act_matches_reference(rng):
    T, K = 2, 64
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[1, :32] = 0.0  # an all-zero block: scale 0, quants 0
    act = ops.ActBuffers.allocate(T, K)
    ops.quantize_act(act, cuda.to_device(x), T, 0)
    q, d = qm.quantize_act_ref(x)
    assert np.array_equal(act.xq.copy_to_host().view(np.int8).reshape(T, K), q)
    np.testing.assert_allclose(act.cols(K).xd.copy_to_host(), d, rtol=1e-6)
    assert np.array_equal(act.xs.copy_to_host(), q.reshape(T, K // 16, 16).astype(np.int32).sum(2))
    np.testing.assert_array_equal(act.xf.copy_to_host(), x)


@pytest.mark.parametrize("mode", [ops.MODE_NORM, ops.MODE_SILU, ops.MODE_GELU])
def test_fused_norm_and_gated_activation(rng, mode, monkeypatch):
    """Each CUDA block walks three groups of the row's q8 blocks (the last partial), as long
    prompts do."""
    from numba_apr.kernels.cpu.ops import gated_act_ref
    monkeypatch.setattr(ops, "PROMPT_BLOCKS", 2)
    T, K = 2, 64 * ops.QB + 64
    x = rng.standard_normal((T, K)).astype(np.float32)
    y = rng.standard_normal((T, K)).astype(np.float32)
    w = rng.standard_normal(K).astype(np.float32)
    act = ops.ActBuffers.allocate(T, K)
    ops.quantize_act(act, cuda.to_device(x), T, 0, mode, w=cuda.to_device(w), eps=1e-6,
                     src2=cuda.to_device(y))
    if mode == ops.MODE_NORM:
        x64 = x.astype(np.float64)
        want = x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-6) * w
    else:
        want = gated_act_ref(x, y, mode == ops.MODE_GELU)
    xf = act.xf.copy_to_host()
    np.testing.assert_allclose(xf, want, rtol=2e-5, atol=2e-6)
    q, d = qm.quantize_act_ref(xf)
    assert np.array_equal(act.xq.copy_to_host().view(np.int8).reshape(T, K), q)
    np.testing.assert_allclose(act.cols(K).xd.copy_to_host(), d, rtol=1e-6)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0", "Q5_1", "F16"])
def test_embedding_rows(rng, name):
    from gguf.quants import dequantize
    K = 256 if name.endswith("_K") else 64
    raw = case(rng, name, 7, K)
    m = qm.upload(raw, Q[name], K)
    ids = np.array([3, 0, 6], np.int32)
    x = cuda.to_device(np.zeros((3, K), np.float32))
    ops.embed(x, cuda.to_device(ids), m, 3, 2.0, 0)
    want = dequantize(raw, Q[name]).reshape(7, K)[ids] * 2.0
    np.testing.assert_allclose(x.copy_to_host(), want, rtol=1e-6, atol=1e-7 * np.abs(want).max())


def test_repeated_launches_on_a_stream(rng):
    """launch.py: a call site's first launch goes through numba, the next ones straight to
    cuda.core with the recorded arguments (on a GPU; numba's path under the simulator). New
    inputs in the same buffers and a new token count must show in the results."""
    K, N = 256, 6
    raw = case(rng, "Q4_K", N, K)
    m = qm.upload(raw, Q.Q4_K, K)
    act = ops.ActBuffers.allocate(4, K)
    src, out = cuda.device_array((4, K), np.float32), cuda.device_array((4, N), np.float32)
    stream = cuda.stream()
    for T in (4, 4, 3):
        x = rng.standard_normal((4, K)).astype(np.float32)
        src.copy_to_device(x, stream=stream)
        ops.quantize_act(act, src, T, stream)
        qm.qmatmul(out, m, act, T, stream)
        got = out.copy_to_host(stream=stream)
        stream.synchronize()
        check(got[:T], qm.qmatmul_ref(raw, Q.Q4_K, K, x[:T]), K)
