"""Llama 2 and Llama 3: pre-norm RMSNorm, SwiGLU, RoPE, untied head; Llama 3 adds GQA and llama3 RoPE scaling."""
from __future__ import annotations

from typing import Any

from jpllm_jax.models.config import ModelConfig, make, rope_scaling_tuple


def llama2(**overrides: Any) -> ModelConfig:
  """Llama 2 (7B by default): multi-head attention, rope theta 10000, 4k context."""
  base = dict(family="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
              d_ff=11008, max_seq_len=4096, norm="rms", norm_eps=1e-5, mlp="swiglu", activation="silu",
              rope_theta=10000.0, tie_embeddings=False)
  return make(make(**base), **overrides)


def llama3(**overrides: Any) -> ModelConfig:
  """Llama 3.1 (8B by default): GQA with 8 key/value heads, rope theta 500000, llama3 RoPE scaling."""
  base = dict(family="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
              d_ff=14336, max_seq_len=131072, norm="rms", norm_eps=1e-5, mlp="swiglu", activation="silu",
              rope_theta=500000.0, rope_type="llama3",
              rope_scaling=rope_scaling_tuple({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 8192}),
              tie_embeddings=False)
  return make(make(**base), **overrides)


PRESETS = {"llama2-7b": llama2, "llama3-8b": llama3}
