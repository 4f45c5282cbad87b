"""GGUF names as data: the metadata keys of the hyper-parameters and the tensor names.

Keys are written without the `{arch}.` prefix that every architecture puts before them.
Tensor names take the layer index as `{i}`. Adding an architecture reuses these tables; only a
name an architecture spells differently would be added here.
"""

# Config field -> metadata key (after "<arch>.").
HPARAM_KEYS = {
    "n_ctx_train": "context_length",
    "n_embd": "embedding_length",
    "n_layer": "block_count",
    "n_ff": "feed_forward_length",
    "n_head": "attention.head_count",
    "n_head_kv": "attention.head_count_kv",
    "norm_eps": "attention.layer_norm_rms_epsilon",
    "head_dim": "attention.key_length",
    "head_dim_v": "attention.value_length",
    "rope_base": "rope.freq_base",
    "rope_dim": "rope.dimension_count",
    "sliding_window": "attention.sliding_window",
    "n_vocab": "vocab_size",
}

# Model-level tensors.
TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"

# Per-layer tensors: LayerWeights field -> GGUF name.
LAYER_TENSORS = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "wo": "blk.{i}.attn_output.weight",
    "bq": "blk.{i}.attn_q.bias",
    "bk": "blk.{i}.attn_k.bias",
    "bv": "blk.{i}.attn_v.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "post_attn_norm": "blk.{i}.post_attention_norm.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight",
    "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight",
    "post_ffn_norm": "blk.{i}.post_ffw_norm.weight",
}

# Tensors every supported architecture has in each layer; the rest are per-architecture.
BASE_LAYER = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
