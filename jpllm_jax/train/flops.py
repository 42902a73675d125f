"""FLOP accounting: the one model-FLOP count used by logs and benchmarks, and the machine's matmul peak."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jpllm_jax.models.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls: every projection plus the output head (not the embedding lookup)."""
  d, h, k, e, f = cfg.d_model, cfg.n_heads, cfg.num_heads_kv, cfg.dim_per_head, cfg.d_ff
  attn = d * h * e * 2 + d * k * e * 2  # q and o; k and v.
  mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
  return cfg.n_layers * (attn + mlp) + d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token: 6 * matmul params + 12 * layers * heads * head_dim * seq_len.

  The attention term is PaLM's (appendix B), counting the full T x T score matrix; recomputation from
  activation checkpointing is not counted (this is model FLOPs, the numerator of MFU).
  """
  return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * seq_len


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
  """Sustained FLOP/s of a jitted square matmul on the default device (the MFU denominator when no peak
  is configured). Measured in the same process as the step it is compared with: these machines are noisy."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  mm(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best
