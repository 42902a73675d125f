"""Mixtral: the Mistral block with a sparse mixture-of-experts MLP in every layer (arXiv:2401.04088).

A softmax router picks the top 2 of 8 SwiGLU experts per token; their gates are renormalised over the two.
The MoE layer lives in moe.py; here is the published configuration.
"""
from __future__ import annotations

from typing import Any

from jpllm_jax.models.config import ModelConfig, make


def mixtral(**overrides: Any) -> ModelConfig:
  """Mixtral 8x7B v0.1: 32 layers of 8 experts (top-2) of width 14336, GQA with 8 key/value heads, rope theta
  1e6, no sliding window (the published config.json sets none), Switch load-balancing loss coefficient 0.02."""
  base = dict(family="mixtral", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
              d_ff=14336, max_seq_len=32768, norm="rms", norm_eps=1e-5, mlp="swiglu", activation="silu",
              rope_theta=1e6, sliding_window=None, tie_embeddings=False, n_experts=8, n_experts_per_tok=2,
              router="softmax", norm_topk_prob=True, moe_aux_loss_coef=0.02)
  return make(make(**base), **overrides)


PRESETS = {"mixtral-8x7b": mixtral}
