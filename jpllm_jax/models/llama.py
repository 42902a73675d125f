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


SWALLOW_VOCAB = 43176  # Swallow's Llama 2 vocabulary expanded with Japanese pieces (tokyotech-llm/Swallow-7b-hf).
LLAMA2_13B = dict(d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, d_ff=13824)  # meta-llama/Llama-2-13b-hf
LLAMA_70B = dict(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672)  # Llama-2-70b-hf, Meta-Llama-3-70B


def llm_jp_3_172b(**overrides: Any) -> ModelConfig:
  """LLM-jp-3 172B (llm-jp/llm-jp-3-172b): the Llama 2 block at 96 layers x 12288, 96 heads in 16 key/value
  groups, FFN 38464, vocabulary 99,487, 4k context; the model card lists 2,444,992,512 embedding and
  169,947,181,056 other parameters."""
  return llama2(**{**dict(vocab_size=99487, d_model=12288, n_layers=96, n_heads=96, n_kv_heads=16, d_ff=38464),
                   **overrides})


# Each entry: the published architecture (HF config.json of the named checkpoint).
PRESETS = {
    "llama2-7b": llama2,
    "llama2-13b": lambda **o: llama2(**{**LLAMA2_13B, **o}),
    "llama2-70b": lambda **o: llama2(**{**LLAMA_70B, **o}),
    "swallow-llama2-7b": lambda **o: llama2(**{"vocab_size": SWALLOW_VOCAB, **o}),
    "swallow-llama2-13b": lambda **o: llama2(**{**LLAMA2_13B, "vocab_size": SWALLOW_VOCAB, **o}),
    "swallow-llama2-70b": lambda **o: llama2(**{**LLAMA_70B, "vocab_size": SWALLOW_VOCAB, **o}),
    "llama3-8b": llama3,
    "llama3-70b": lambda **o: llama3(**{**LLAMA_70B, **o}),
    "llm-jp-3-172b": llm_jp_3_172b,
}
