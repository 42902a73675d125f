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


def _shape(d: int, layers: int, heads: int, **extra):
  return lambda **o: gpt(**{**dict(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=heads, d_ff=4 * d),
                            **extra, **o})


# LLM-jp v1 (llm-jp/llm-jp-13b-v1.0 and -1.3b-v1.0 model cards: layers, hidden, heads, 2k context, 50,570
# vocabulary); LLM-jp 175B v1 at the GPT-3 175B shape (Brown et al. 2020, table 2.1: 96 x 12288, 96 heads);
# Fugaku-LLM 13B (DeepSpeedFugaku launch script: 40 layers, hidden 5184, 36 heads, seq 2048; its tokenizer
# llm-jp-tokenizer v2.2 code10k_en20k_ja30k, the 50,570 vocabulary here is an assumption).
PRESETS = {"llm-jp-13b-v1": gpt, "llm-jp-1.3b-v1": _shape(2048, 24, 16), "llm-jp-175b-v1": _shape(12288, 96, 96),
           "fugaku-llm-13b": _shape(5184, 40, 36)}
