"""GPT: the Megatron / GPT-2 architecture of Fugaku-LLM and LLM-jp v1.

Pre-norm LayerNorm, a GELU MLP of two matrices with biases, biases on every projection, learned absolute
positions, and the output head tied to the input embedding.
"""
from __future__ import annotations

from typing import Any

from jpllm_jax.models.config import ModelConfig, make


def gpt(**overrides: Any) -> ModelConfig:
  """LLM-jp v1 13B by default (5120 wide, 40 layers, 40 heads, 2k context, 50k vocabulary)."""
  base = dict(family="gpt", vocab_size=50570, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40,
              d_ff=4 * 5120, max_seq_len=2048, norm="layer", norm_eps=1e-5, mlp="gelu",
              activation="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True, rope_theta=None,
              learned_positions=True, tie_embeddings=True)
  return make(make(**base), **overrides)


PRESETS = {"llm-jp-13b-v1": gpt}
