"""Architectures: a frozen `Config` read from a GGUF's metadata, one short builder each.

A builder says what differs (RoPE style, activation, which optional tensors a layer has, the
per-layer attention window and RoPE base); everything it does not say comes from the shared
reading of `tables.HPARAM_KEYS`. The forward pass (model/cpu.py) reads only the `Config`, so adding
an architecture means adding one builder here and registering it in `ARCHITECTURES`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import NumbaAprError, UnsupportedError
from . import tables


@dataclass(frozen=True)
class LayerPlan:
    rope_base: float
    window: int  # 0: full causal attention; n > 0: each query sees its last n positions (itself included)


@dataclass(frozen=True)
class Config:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int      # per-head width of Q and K
    head_dim_v: int    # per-head width of V
    n_ff: int
    n_ctx_train: int
    norm_eps: float
    rope_neox: bool    # True: rotate (x[i], x[i + d/2]) pairs (GPT-NeoX); False: (x[2i], x[2i+1])
    rope_dim: int      # leading dims of each head that RoPE rotates
    attn_scale: float  # multiplies q.k
    embd_scale: float  # multiplies the token embeddings
    act: str           # "silu" (SwiGLU) or "gelu" (GeGLU, tanh approximation)
    layer_tensors: tuple[str, ...]   # LayerWeights fields present in every layer
    layers: tuple[LayerPlan, ...]


#: Upper bounds on sizes read from a file, far above any real model's: a count in a hostile
#: file must not reach an allocation or a loop before the tensors (whose bytes exist) check it.
MAX_WIDTH = 1 << 20       # n_embd, n_ff, head sizes
MAX_HEADS = 1 << 12
MAX_CTX = 1 << 24


class _Meta:
    """Typed access to `<arch>.<key>` metadata with one-line errors (gguf_file's typed getters)."""

    def __init__(self, gguf, arch):
        self.g, self.arch = gguf, arch

    def key(self, field):
        return f"{self.arch}.{tables.HPARAM_KEYS[field]}"

    def int(self, field, default=None, lo=1, hi=MAX_WIDTH):
        v = self.g.get_int(self.key(field), default, lo, hi)
        if v is None:
            raise NumbaAprError(f"{self.g.path}: metadata key {self.key(field)} is missing")
        return v

    def float(self, field, default=None):
        v = self.g.get_float(self.key(field), default)
        if v is None:
            raise NumbaAprError(f"{self.g.path}: metadata key {self.key(field)} is missing")
        return v


def _common(g, arch, **overrides) -> dict:
    """Hyper-parameters every architecture reads the same way, each checked for its type and range
    and against the others."""
    m = _Meta(g, arch)
    g.get_int("general.file_type", lo=0, hi=1 << 16)  # unused here, but a wrong type is a damaged file
    n_embd, n_head = m.int("n_embd"), m.int("n_head", hi=MAX_HEADS)
    n_head_kv = m.int("n_head_kv", n_head, hi=n_head)
    if n_head % n_head_kv:
        raise NumbaAprError(f"{g.path}: {n_head} attention heads cannot be shared by {n_head_kv} KV heads "
                            f"({m.key('n_head_kv')} must divide {m.key('n_head')})")
    head_dim = m.int("head_dim", max(1, n_embd // n_head))
    n_tokens = len(g.get_array("tokenizer.ggml.tokens", "str", ()))
    n_vocab = m.int("n_vocab", n_tokens, hi=1 << 31)
    if n_tokens and n_vocab != n_tokens:
        raise NumbaAprError(f"{g.path}: {m.key('n_vocab')} is {n_vocab} but the vocabulary has {n_tokens} tokens")
    # Every layer has at least 9 tensors: a count past that is not this file's.
    n_layer = m.int("n_layer", hi=max(1, len(g.tensors) // 9))
    rope_dim = m.int("rope_dim", head_dim, lo=0, hi=head_dim)
    if rope_dim % 2:
        raise NumbaAprError(f"{g.path}: {m.key('rope_dim')} is {rope_dim}, expected an even number")
    cfg = dict(
        arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=m.int("head_dim_v", head_dim), n_ff=m.int("n_ff"),
        n_ctx_train=m.int("n_ctx_train", 4096, hi=MAX_CTX), norm_eps=m.float("norm_eps"),
        rope_neox=True, rope_dim=rope_dim,
        attn_scale=1.0 / math.sqrt(head_dim), embd_scale=1.0, act="silu",
        layer_tensors=tables.BASE_LAYER,
        layers=(LayerPlan(m.float("rope_base", 10000.0), 0),) * n_layer,
    )
    cfg.update(overrides)
    return cfg


def llama(g) -> Config:
    # llama.cpp's converter permutes Q/K so that the original pairs (x[2i], x[2i+1]) rotate.
    return Config(**_common(g, "llama", rope_neox=False))


def qwen2(g) -> Config:
    return Config(**_common(g, "qwen2", layer_tensors=tables.BASE_LAYER + ("bq", "bk", "bv")))


def gemma3(g) -> Config:
    c = _common(g, "gemma3", act="gelu", layer_tensors=tables.BASE_LAYER + (
        "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm"))
    c["embd_scale"] = math.sqrt(c["n_embd"])
    # Five sliding-window layers (local RoPE base 10k) then one global layer, repeating.
    window = _Meta(g, "gemma3").int("sliding_window", 4096, hi=MAX_CTX)
    base = c["layers"][0].rope_base
    c["layers"] = tuple(LayerPlan(10000.0, window) if i % 6 < 5 else LayerPlan(base, 0)
                        for i in range(c["n_layer"]))
    return Config(**c)


ARCHITECTURES = {"llama": llama, "qwen2": qwen2, "gemma3": gemma3}


def build_config(g) -> Config:
    """The Config of a parsed GGUF file, or a one-line error naming the unsupported architecture."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{g.path}: architecture '{arch}' is not supported "
                               f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[arch](g)
