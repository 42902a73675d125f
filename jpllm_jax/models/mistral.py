"""Mistral: the Llama block with GQA and sliding-window attention (query i sees keys j with i - j < window)."""
from __future__ import annotations

from typing import Any

from jpllm_jax.models.config import ModelConfig, make


def mistral(**overrides: Any) -> ModelConfig:
  """Mistral 7B v0.1: 8 key/value heads, a 4096-token sliding window."""
  base = dict(family="mistral", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
              d_ff=14336, max_seq_len=32768, norm="rms", norm_eps=1e-5, mlp="swiglu", activation="silu",
              rope_theta=10000.0, sliding_window=4096, tie_embeddings=False)
  return make(make(**base), **overrides)


# Swallow-MS 7B (tokyotech-llm/Swallow-MS-7b-v0.1): Mistral 7B with the vocabulary expanded to 42,800 pieces.
PRESETS = {"mistral-7b": mistral,
           "swallow-mistral-7b": lambda **o: mistral(**{"vocab_size": 42800, **o})}
