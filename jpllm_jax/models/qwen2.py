"""Qwen2: the Llama block with biases on the q/k/v projections and optionally tied embeddings."""
from __future__ import annotations

from typing import Any

from jpllm_jax.models.config import ModelConfig, make


def qwen2(**overrides: Any) -> ModelConfig:
  """Qwen2-7B by default; the small Qwen2 models tie the embeddings (`tie_embeddings=True`)."""
  base = dict(family="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
              d_ff=18944, max_seq_len=32768, norm="rms", norm_eps=1e-6, mlp="swiglu", activation="silu",
              rope_theta=1000000.0, qkv_bias=True, tie_embeddings=False)
  return make(make(**base), **overrides)


# Qwen2-72B (Qwen/Qwen2-72B config.json): 80 layers x 8192, 64 heads in 8 key/value groups, FFN 29568, untied.
PRESETS = {"qwen2-7b": qwen2,
           "qwen2-72b": lambda **o: qwen2(**{**dict(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                                    d_ff=29568), **o})}
