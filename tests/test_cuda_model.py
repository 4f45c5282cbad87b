"""The whole GPU forward pass (model/cuda.py) against the CPU one (model/cpu.py) on a tiny random
model of each architecture's features (QKV biases; gemma3's q/k norms, post-norms, GELU,
sliding window and embedding scale), prompts and decode steps, plus the device-side generation
step. Under numba's CUDA simulator in CI (tiny shapes); on a GPU with NUMBA_ENABLE_CUDASIM=0.
The two backends quantize activations differently (ggml's CPU blocks against llama.cpp CUDA's
q8_1 per 32), so logits agree to a tolerance, not bit for bit."""
import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize as gguf_quantize
from test_matmul import SEED, rng  # noqa: F401  (fixture)

from numba_apr.model.arch import Config, LayerPlan, tables
from numba_apr.model.gguf_file import Tensor
from numba_apr.model.cpu import LayerWeights, RunState, Weights, forward
from numba_apr.model.cuda import CudaRunner
from numba_apr.model.quantize import quantize as numba_apr_quantize

# The simulator runs every GPU thread as a Python thread: a whole forward pass, even of this tiny
# model, takes minutes there (measured > 5 min for one architecture), too slow for CI. CI covers
# each kernel under the simulator (test_cuda_qmatmul/attention/sampling.py); this file runs on a
# GPU (`NUMBA_ENABLE_CUDASIM=0 pytest tests/test_cuda_model.py`: 54 CUDA tests passed on an H100).
pytestmark = pytest.mark.skipif(__import__("numba").config.ENABLE_CUDASIM,
                                reason="whole-model CUDA test: too slow under the simulator, run on a GPU")

# Tiny, because the simulator runs every GPU thread as a Python thread (the K-quants need rows
# of 256 and are covered by test_cuda_qmatmul.py instead).
N_VOCAB, N_EMBD, N_FF, N_HEAD, N_KV, HEAD = 24, 64, 64, 4, 2, 32
TYPES = dict(wq="Q8_0", wk="Q8_0", wv="Q5_1", wo="Q4_0", w_gate="Q5_0", w_up="Q5_0",
             w_down=("Q4_0", "Q8_0"), token_embd="Q8_0", output="Q4_1")  # w_down per layer


def tiny_config(arch: str) -> Config:
    gemma = arch == "gemma3"
    layers = (LayerPlan(10000.0, 3 if gemma else 0), LayerPlan(1e6, 0))
    extra = ("bq", "bk", "bv") if arch == "qwen2" else (
        ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm") if gemma else ())
    return Config(arch=arch, n_vocab=N_VOCAB, n_embd=N_EMBD, n_layer=2, n_head=N_HEAD, n_head_kv=N_KV,
                  head_dim=HEAD, head_dim_v=HEAD, n_ff=N_FF, n_ctx_train=64, norm_eps=1e-6,
                  rope_neox=arch != "llama", rope_dim=HEAD, attn_scale=1 / math.sqrt(HEAD),
                  embd_scale=math.sqrt(N_EMBD) if gemma else 1.0, act="gelu" if gemma else "silu",
                  layer_tensors=tables.BASE_LAYER + extra, layers=layers)


def matrix(rng, name, rows, K, qtype):
    x = (rng.standard_normal((rows, K)) * 0.15).astype(np.float32)
    quant = numba_apr_quantize if qtype.endswith("_K") else gguf_quantize  # gguf-py writes no K-quants
    return Tensor(name, int(Q[qtype]), (K, rows), np.asarray(quant(x, Q[qtype])).reshape(rows, -1))


def tiny_weights(rng, c: Config) -> Weights:
    def vec(n, mean=0.0):
        return (mean + rng.standard_normal(n) * 0.1).astype(np.float32)

    nq, nkv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    layers = []
    for i in range(c.n_layer):
        kw = dict(attn_norm=vec(N_EMBD, 1), ffn_norm=vec(N_EMBD, 1),
                  wq=matrix(rng, "wq", nq, N_EMBD, TYPES["wq"]), wk=matrix(rng, "wk", nkv, N_EMBD, TYPES["wk"]),
                  wv=matrix(rng, "wv", nkv, N_EMBD, TYPES["wv"]), wo=matrix(rng, "wo", N_EMBD, nq, TYPES["wo"]),
                  w_gate=matrix(rng, "g", N_FF, N_EMBD, TYPES["w_gate"]),
                  w_up=matrix(rng, "u", N_FF, N_EMBD, TYPES["w_up"]),
                  w_down=matrix(rng, "d", N_EMBD, N_FF, TYPES["w_down"][i]))
        if "bq" in c.layer_tensors:
            kw.update(bq=vec(nq), bk=vec(nkv), bv=vec(nkv))
        if "q_norm" in c.layer_tensors:
            kw.update(q_norm=vec(HEAD, 1), k_norm=vec(HEAD, 1), post_attn_norm=vec(N_EMBD, 1),
                      post_ffn_norm=vec(N_EMBD, 1))
        layers.append(LayerWeights(**kw))
    embd = matrix(rng, "embd", N_VOCAB, N_EMBD, TYPES["token_embd"])
    out = matrix(rng, "out", N_VOCAB, N_EMBD, TYPES["output"]) if c.arch != "gemma3" else embd
    return Weights(embd, vec(N_EMBD, 1), out, layers)


def cpu_logits(c, w, ids, n_ctx=16):
    s = RunState(c, n_ctx, len(ids))
    out = np.zeros((len(ids), c.n_vocab), np.float32)
    forward(c, w, s, np.asarray(ids, np.int32), 0, out)
    return out


def close(got, want):
    # The CPU quantizes activations per 256 for K-quants and per 32 otherwise, as ggml's CPU
    # backend; the GPU per 32 (q8_1) as llama.cpp's CUDA backend: random tiny models amplify
    # that to a few percent. The real check is the golden suite on a GPU.
    err = np.abs(got - want).max()
    assert err < 0.06 * np.abs(want).max() + 1e-3, f"max diff {err} (seed {SEED})"


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "llama"])
def test_prompt_and_decode_match_cpu(rng, arch):
    c = tiny_config(arch)
    w = tiny_weights(rng, c)
    ids = rng.integers(0, N_VOCAB, 5).astype(np.int32)
    want = cpu_logits(c, w, ids)
    r = CudaRunner(c, w, 16, 8)
    # the whole prompt at once, every position's logits
    r.eval(ids, 0, want_all=True)
    close(r.logits_host(True, len(ids)), want)
    # a prefix, then one token at a time (the decode kernels, position read on the device)
    r.eval(ids[:3], 0)
    for p in range(3, len(ids)):
        r.eval(ids[p:p + 1], p)
        close(r.logits_host(False, 1)[0], want[p])


@pytest.mark.parametrize("qkv_k, ffn_k", [(0, 0), (N_EMBD, 0), (0, N_EMBD)], ids=["no-qin", "qin-qkv", "qin-ffn"])
def test_decode_inputs_quantized_by_either_side(rng, monkeypatch, qkv_k, ffn_k):
    """Decoding, the input of Q/K/V and of gate/up is quantized either by the product that
    reads it (QIN, bounds QIN_QKV_MAX_K / QIN_MAX_K) or by the tail of the product that wrote
    the residual stream (down / wo): every mix gives the CPU's logits (the default at this
    width, both QIN, is test_prompt_and_decode_match_cpu's)."""
    import numba_apr.model.cuda as mc
    monkeypatch.setattr(mc, "QIN_QKV_MAX_K", qkv_k)
    monkeypatch.setattr(mc, "QIN_MAX_K", ffn_k)
    c = tiny_config("qwen2")
    w = tiny_weights(rng, c)
    ids = rng.integers(0, N_VOCAB, 5).astype(np.int32)
    want = cpu_logits(c, w, ids)
    r = CudaRunner(c, w, 16, 8)
    r.eval(ids[:2], 0)
    for p in range(2, len(ids)):
        r.eval(ids[p:p + 1], p)
        close(r.logits_host(False, 1)[0], want[p])


def test_device_generation_step(rng):
    """decode_sample: forward + greedy sampling on the device + position increment; the token
    it returns is the argmax of that step's logits, and the next step uses it from the device.
    A graph runs 3 steps here (runner.steps) whose ids come back together, and each call also
    queues the following graph on the device's token: a caller that feeds another token (here
    at position 8, inside a graph's steps) gets that token's step, the last positions of the
    context (14, 15) run one step a graph and queue nothing past 15, and after a new prompt no
    id read before answers a call."""
    from numba_apr.kernels.cuda.sampling import DeviceSampler
    from numba_apr.sampling import SamplingParams
    c = tiny_config("qwen2")
    w = tiny_weights(rng, c)
    ids = rng.integers(0, N_VOCAB, 4).astype(np.int32)
    r = CudaRunner(c, w, 16, 8)
    r.steps = 3
    sampler = DeviceSampler(c.n_vocab, SamplingParams(temperature=0.0), 16)

    def check(seq, nxt):
        want = cpu_logits(c, w, seq)[-1]
        assert nxt == int(np.argmax(want)) or np.sort(want)[-1] - np.sort(want)[-2] < 0.05, (nxt, seed_msg())

    def prompt(p_ids):
        sampler.set_history(p_ids, r.stream)
        r.eval(p_ids, 0)
        return int(np.argmax(r.logits_host(False, 1)[0]))

    tok = prompt(ids)
    seq = list(ids)
    for p in range(len(ids), 16):
        if p == 8:
            tok = (tok + 1) % N_VOCAB
        nxt = r.decode_sample(tok, p, sampler)
        seq.append(tok)
        check(seq, nxt)
        tok = nxt
    # a graph's ids read (positions 4..6), then a new prompt over those positions
    tok = prompt(ids)
    r.decode_sample(tok, len(ids), sampler)
    ids2 = (ids + 1) % N_VOCAB
    prompt(ids2)
    check(list(ids2) + [tok], r.decode_sample(tok, len(ids), sampler))


def test_decode_graphs_die_with_their_sampler(rng):
    """A captured decode graph replays its sampler's buffers: it is dropped with that sampler, and
    a later sampler (which may get the dead one's id()) captures its own."""
    import gc

    from numba_apr.kernels.cuda.sampling import DeviceSampler
    from numba_apr.sampling import SamplingParams
    c = tiny_config("qwen2")
    w = tiny_weights(rng, c)
    ids = rng.integers(0, N_VOCAB, 4).astype(np.int32)
    r = CudaRunner(c, w, 16, 8)
    r.steps = 2
    for _ in range(3):
        sampler = DeviceSampler(c.n_vocab, SamplingParams(temperature=0.0), 16)
        sampler.set_history(ids, r.stream)
        r.eval(ids, 0)
        tok = int(np.argmax(r.logits_host(False, 1)[0]))
        nxt = r.decode_sample(tok, len(ids), sampler)
        want = cpu_logits(c, w, list(ids) + [tok])[-1]
        assert nxt == int(np.argmax(want)) or np.sort(want)[-1] - np.sort(want)[-2] < 0.05, seed_msg()
        assert list(r.graphs.keys()) == [sampler]
        r.eval(ids, 0)             # (a new prompt: the runner holds no step of the sampler's)
        del sampler
        gc.collect()
        assert len(r.graphs) == 0


def seed_msg():
    return f"seed {SEED}"
