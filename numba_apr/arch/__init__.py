"""Architectures: a frozen `Config` read from a GGUF's metadata, one short builder each.

A builder says what differs (RoPE style, activation, which optional tensors a layer has, the
per-layer attention window and RoPE base); everything it does not say comes from the shared
reading of `tables.HPARAM_KEYS`. The forward pass (model.py) reads only the `Config`, so adding
an architecture means adding one builder here and registering it in `ARCHITECTURES`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import NumbaAprError, UnsupportedError
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


class _Meta:
    """Typed access to `<arch>.<key>` metadata with one-line errors."""

    def __init__(self, gguf, arch):
        self.g, self.arch = gguf, arch

    def get(self, field, default=None):
        return self.g.get(f"{self.arch}.{tables.HPARAM_KEYS[field]}", default)

    def need(self, field):
        v = self.get(field)
        if v is None:
            raise NumbaAprError(f"{self.g.path}: metadata key {self.arch}.{tables.HPARAM_KEYS[field]} is missing")
        return v


def _common(g, arch, **overrides) -> dict:
    """Hyper-parameters every architecture reads the same way."""
    m = _Meta(g, arch)
    n_embd, n_head = int(m.need("n_embd")), int(m.need("n_head"))
    head_dim = int(m.get("head_dim", n_embd // n_head))
    n_vocab = m.get("n_vocab")
    if n_vocab is None:
        n_vocab = len(g.require("tokenizer.ggml.tokens"))
    n_layer = int(m.need("n_layer"))
    cfg = dict(
        arch=arch, n_vocab=int(n_vocab), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_head_kv=int(m.get("n_head_kv", n_head)), head_dim=head_dim,
        head_dim_v=int(m.get("head_dim_v", head_dim)), n_ff=int(m.need("n_ff")),
        n_ctx_train=int(m.get("n_ctx_train", 4096)), norm_eps=float(m.need("norm_eps")),
        rope_neox=True, rope_dim=int(m.get("rope_dim", head_dim)),
        attn_scale=1.0 / math.sqrt(head_dim), embd_scale=1.0, act="silu",
        layer_tensors=tables.BASE_LAYER,
        layers=(LayerPlan(float(m.get("rope_base", 10000.0)), 0),) * n_layer,
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
    window = int(_Meta(g, "gemma3").get("sliding_window", 4096))
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
