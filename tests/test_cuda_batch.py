"""Decode steps of several sequences on the GPU: each token at its own position of its own KV
slot. The kernels that take per-token positions and cache rows (ops.rope_kv, the decode
attention) against the one-sequence launches and the float64 reference, under numba's CUDA
simulator in CI (tiny shapes); and, on a GPU only, CudaRunner.eval_batch (the server's step)
against each sequence evaluated alone."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
from numba import config, cuda
from test_cuda_attention import SEED, rng  # noqa: F401  (fixture; skips this module where that one is)

from numba_apr.kernels.cuda import ops
from numba_apr.kernels.cuda.attention import attention, attention_ref, attention_workspace
from numba_apr.kernels.cuda.qmatmul import quantize_act_ref


def test_rope_kv_several_sequences(rng):
    """rope_kv with rows: token t rotated at position pos[t], its k and v written to cache row
    rows[t] + pos[t]; the same as one launch a token on its slot's rows, and no other row
    touched."""
    n_head, n_kv, hd, n_ctx, n_slots = 2, 1, 32, 8, 3
    c = SimpleNamespace(n_head=n_head, n_head_kv=n_kv, head_dim=hd, head_dim_v=hd, rope_dim=hd,
                        rope_neox=True, norm_eps=1e-6)
    width = (n_head + 2 * n_kv) * hd
    slots, pos = np.array([2, 0, 1], np.int32), np.array([5, 0, 7], np.int32)
    T = len(slots)
    qkv = rng.standard_normal((T, width)).astype(np.float32)
    table = ops.rope_table(n_ctx, hd, 10000.0)
    noise = rng.standard_normal((n_slots * n_ctx, n_kv * hd)).astype(np.float16)
    empty = cuda.to_device(np.zeros(0, np.float32))

    d_qkv, kc, vc = cuda.to_device(qkv), cuda.to_device(noise), cuda.to_device(noise)
    ops.rope_kv(d_qkv, cuda.to_device(pos), T, c, table, None, None, kc, vc, 0, empty,
                rows=cuda.to_device(slots * n_ctx))
    want_k, want_v = noise.copy(), noise.copy()
    for t in range(T):   # one token, one sequence: the slot's rows as the cache
        one = cuda.to_device(qkv[t:t + 1])
        k1, v1 = cuda.to_device(noise[slots[t] * n_ctx:][:n_ctx]), cuda.to_device(noise[slots[t] * n_ctx:][:n_ctx])
        ops.rope_kv(one, cuda.to_device(pos[t:t + 1]), 1, c, table, None, None, k1, v1, 0, empty)
        np.testing.assert_array_equal(d_qkv.copy_to_host()[t], one.copy_to_host()[0], err_msg=f"seed {SEED}")
        want_k[slots[t] * n_ctx + pos[t]] = k1.copy_to_host()[pos[t]]
        want_v[slots[t] * n_ctx + pos[t]] = v1.copy_to_host()[pos[t]]
    np.testing.assert_array_equal(kc.copy_to_host(), want_k)
    np.testing.assert_array_equal(vc.copy_to_host(), want_v)


@pytest.mark.parametrize("window,short", [(0, False), (0, True), (6, False)])
def test_decode_attention_several_sequences(rng, window, short):
    """attention with rows: each token over its own slot's rows 0..pos[t] (a window: the last
    `window` of them), positions from 0 to past one split, with the split workspace of T rows;
    the rows past each sequence's position are NaN (unwritten) and must not be read."""
    n_head, n_kv, D, n_ctx = 4, 2, 32, 300
    slots = np.array([1, 3, 0, 2], np.int32)
    pos = np.array([0, 9, 299, 130], np.int32)
    T, n_slots = len(slots), 4
    k = rng.standard_normal((n_slots * n_ctx, n_kv * D)).astype(np.float16)
    v = rng.standard_normal((n_slots * n_ctx, n_kv * D)).astype(np.float16)
    for s, p in zip(slots, pos):
        k[s * n_ctx + p + 1:(s + 1) * n_ctx] = np.nan
        v[s * n_ctx + p + 1:(s + 1) * n_ctx] = np.nan
    q = rng.standard_normal((T, n_head * D)).astype(np.float32)
    scale = 1 / math.sqrt(D)
    if short:
        pos[2] = 200   # the promise: no token sees SHORT_CTX positions (still two splits)
    want = np.concatenate([attention_ref(q[t:t + 1], k[slots[t] * n_ctx:][:n_ctx], v[slots[t] * n_ctx:][:n_ctx],
                                         int(pos[t]), n_head, n_kv, D, D, scale, window) for t in range(T)])
    out = cuda.to_device(np.full((T + 1, n_head * D), np.nan, np.float32))
    ws = attention_workspace(n_ctx, n_head, D, max_T=T, n_split=3)
    stream = cuda.stream()
    dst = ops.ActBuffers.allocate(T, n_head * D)
    a = attention(out, cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), cuda.to_device(pos), T, n_head,
                  n_kv, D, D, scale, window, stream, ws, dst, short, rows=cuda.to_device(slots * n_ctx))
    stream.synchronize()
    got = out.copy_to_host()
    assert np.isnan(got[T:]).all(), "rows past T written"
    assert not ws[2].copy_to_host().any(), "the merging block resets its head group's count"
    np.testing.assert_allclose(got[:T], want, rtol=1e-4, atol=1e-5, err_msg=f"seed {SEED}")
    # the next product's input, quantized by the merging blocks: each token's row
    q8, d8 = quantize_act_ref(got[:T])
    assert np.array_equal(a.xq8.copy_to_host()[:T, :n_head * D], q8), f"seed {SEED}"
    np.testing.assert_allclose(a.xd.copy_to_host()[:T], d8, rtol=1e-6)


def test_rows_argmax_is_the_hosts_greedy_choice(rng):
    """ops.rows_argmax (a greedy batch's ids from the device) against sampling._argmax: the
    first index on ties, in rows longer than a block's threads."""
    from numba_apr.sampling import _argmax
    R, n = 3, 2500
    x = rng.standard_normal((R, n)).astype(np.float32)
    x[1, [700, 1900]] = x[1].max() + 1          # a tie: the first wins
    x[2, 5] = np.float32(np.nan)                # NaN never wins
    ids = cuda.device_array(R, np.int32)
    ops.rows_argmax(cuda.to_device(x), ids, R, 0)
    assert ids.copy_to_host().tolist() == [_argmax(x[i]) for i in range(R)], f"seed {SEED}"


@pytest.mark.skipif(config.ENABLE_CUDASIM, reason="whole-model CUDA test: too slow under the simulator")
@pytest.mark.parametrize("arch,few", [("qwen2", False), ("gemma3", False), ("qwen2", True), ("gemma3", True)])
def test_eval_batch_matches_each_sequence_alone(rng, monkeypatch, arch, few):
    """The server's step on the GPU: prompt chunks of three sequences and then decode steps of
    1, 2 and 3 of them at once (graphs of batch sizes 1 (fused), 2 and 4 (padded)), each row's
    logits against that sequence evaluated alone from position 0; `few`: the B = 4 step's
    products (and its gated product) on the few-token tensor-core kernel."""
    from test_cuda_model import close, tiny_config, tiny_weights

    from numba_apr.kernels.cuda import qmatmul as qm
    from numba_apr.model.cuda import CudaRunner
    monkeypatch.setattr(qm, "FEW_MIN_T", 3 if few else qm.MMA_MIN_T)
    c = tiny_config(arch)
    w = tiny_weights(rng, c)
    n_ctx, n_seq = 16, 3
    ids = [rng.integers(0, c.n_vocab, 9).astype(np.int32) for _ in range(n_seq)]
    alone = CudaRunner(c, w, n_ctx, 16)
    want = []
    for seq in ids:
        alone.eval(seq, 0, want_all=True)
        want.append(alone.logits_host(True, len(seq)))
    r = CudaRunner(c, w, n_ctx, 8, n_seq)
    n_past = [0] * n_seq

    def step(entries):   # entries: (sequence, number of its next tokens)
        tokens, slots, positions, rows, who = [], [], [], [], []
        for q, n in entries:
            tokens += list(ids[q][n_past[q]:n_past[q] + n])
            slots += [q] * n
            positions += range(n_past[q], n_past[q] + n)
            rows.append(len(tokens) - 1)
            who.append(q)
            n_past[q] += n
        greedy = np.arange(len(rows)) % 2 == 1      # every other row: its argmax only
        got = np.full(len(rows), -1, np.int32)
        out = r.eval_batch(np.array(tokens, np.int32), np.array(slots), np.array(positions), np.array(rows),
                           greedy, got)
        for k, q in enumerate(who):
            ref = want[q][n_past[q] - 1]
            if not greedy[k]:
                close(out[k], ref)
            elif np.sort(ref)[-1] - np.sort(ref)[-2] > 1e-3:   # (a clear winner: else either may win)
                assert got[k] == np.argmax(ref)

    step([(0, 3), (1, 4), (2, 2)])           # prompt chunks of three slots in one call
    step([(1, 1)])                           # one sequence decoding: its slot's fused graph
    step([(0, 1), (2, 1)])                   # two: the graph of 2
    step([(2, 1), (0, 1), (1, 1)])           # three (padded to 4), in another order than slots
    step([(0, 1), (1, 2)])                   # decoding beside a prompt chunk
    step([(2, 1), (1, 1), (0, 1)])


@pytest.mark.skipif(config.ENABLE_CUDASIM, reason="whole-model CUDA test: too slow under the simulator")
@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_eval_batch_queued_ahead_changes_no_id(rng, monkeypatch, arch):
    """A step of greedy decoding only queues the step after it (CudaRunner._queue_next): a
    scheduler's run of calls (steps asked for as queued, sequences ending, one fed another
    token, prompt chunks joining, the end of the context) gives each call the ids it gives with
    nothing queued, and the queued steps were the ones asked for where they could be."""
    from test_cuda_model import tiny_config, tiny_weights

    from numba_apr.model import cuda as mc
    c = tiny_config(arch)
    w = tiny_weights(rng, c)
    n_ctx, n_seq = 16, 3
    runners = [mc.CudaRunner(c, w, n_ctx, 8, n_seq) for _ in range(2)]
    runners[0].batch_ahead, runners[1].batch_ahead = False, True
    hits = []
    asked = mc._Queued.asked
    monkeypatch.setattr(mc._Queued, "asked", lambda q, *a: hits.append(asked(q, *a)) or hits[-1])
    prompts = [rng.integers(0, c.n_vocab, 5).astype(np.int32) for _ in range(n_seq)]
    n_past, last = [0] * n_seq, [0] * n_seq

    def step(entries):   # (sequence, prompt tokens to read, or 0: decode its last id)
        tokens, slots, positions, rows = [], [], [], []
        for q, n in entries:
            chunk = list(prompts[q][n_past[q]:n_past[q] + n]) if n else [last[q]]
            tokens += chunk
            slots += [q] * len(chunk)
            positions += range(n_past[q], n_past[q] + len(chunk))
            rows.append(len(tokens) - 1)
            n_past[q] += len(chunk)
        got = [np.full(len(rows), -1, np.int32) for _ in runners]
        for r, ids in zip(runners, got):
            r.eval_batch(np.array(tokens, np.int32), np.array(slots), np.array(positions), np.array(rows),
                         np.ones(len(rows), bool), ids)
        assert np.array_equal(got[0], got[1]), f"{entries}: {got[0]} alone, {got[1]} queued (seed {SEED})"
        for (q, _), t in zip(entries, got[1]):
            last[q] = int(t)

    step([(0, 5), (1, 3), (2, 5)])
    step([(0, 0), (2, 0)])                  # decoding: queues the next
    step([(0, 0), (2, 0)])                  # asked for as queued
    step([(0, 0), (2, 0)])
    step([(0, 0)])                          # sequence 2 ended: one sequence now (slot graph)
    step([(0, 0)])
    last[0] = (last[0] + 1) % c.n_vocab     # fed another token than its id (a sampled one)
    step([(0, 0)])
    step([(0, 0), (1, 2)])                  # a prompt chunk joins
    step([(0, 0), (1, 0), (2, 0)])          # three, padded to 4
    to_end = n_ctx - n_past[0]
    for _ in range(to_end):                 # on to the end of sequence 0's context
        step([(0, 0), (1, 0), (2, 0)])
    assert hits == [True, True, False, True, False, False] + [True] * to_end, hits
    assert runners[1]._bnext is None        # (nothing queued past the context)


@pytest.mark.skipif(config.ENABLE_CUDASIM, reason="whole-model CUDA test: too slow under the simulator")
@pytest.mark.parametrize("ahead", [False, True])
def test_server_greedy_streams_on_the_gpu_match_alone(monkeypatch, ahead):
    """The scheduler on the GPU (tiny real model): four greedy requests at once, decoding in
    steps of 4 (and 3, 2, 1 as they end), each give the tokens they give alone; `ahead`: each
    step of greedy decoding queues the one after it (CudaRunner._queue_next)."""
    import threading

    from conftest import SHARED

    from numba_apr import load
    from numba_apr.model import cuda as mc
    from numba_apr.sampling import SamplingParams
    from numba_apr.server.scheduler import Request, Scheduler
    monkeypatch.setattr(mc, "BATCH_AHEAD", ahead)
    model = load(SHARED / "models" / "tiny-qwen2-q4km.gguf", device="cuda", n_ctx=256, n_seq=4)
    sched = Scheduler(model)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]

    def run(batch):
        done, toks = threading.Semaphore(0), {i: [] for i in batch}
        for i in batch:
            def sink(ev, i=i):
                if "token" in ev:
                    toks[i].append(ev["token"])
                if ev.get("done") or "error" in ev:
                    assert "error" not in ev, ev
                    done.release()
            sched.submit(Request(model.tokenize(prompts[i]), SamplingParams(temperature=0.0), 12 + 4 * i, sink,
                                 ignore_eos=True))
        for _ in batch:
            assert done.acquire(timeout=120)
        return toks

    try:
        alone = {i: run([i])[i] for i in range(4)}
        together = run(range(4))
    finally:
        sched.close()
    assert together == alone
