"""FLOP accounting: the one model-FLOP count used by logs and benchmarks, and the machine's matmul peak."""
from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from jpllm_jax.models import stacks
from jpllm_jax.models.config import ModelConfig


def _attention_params(cfg: ModelConfig) -> int:
  a = cfg.attention
  d, h = cfg.d_model, a.n_heads
  if a.kind == "mla":
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = d * h * qk if a.q_lora_rank is None else d * a.q_lora_rank + a.q_lora_rank * h * qk
    kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + h * a.v_head_dim * d
  k, e = a.num_heads_kv, cfg.dim_per_head
  return d * h * e * 2 + d * k * e * 2  # q and o; k and v.


def _ffn_params(cfg: ModelConfig, moe_layer: bool) -> int:
  """Matmul parameters one token passes through in a feed-forward block (MoE: the router, its k routed experts
  and the shared experts — the active parameters, not all E experts)."""
  d = cfg.d_model
  per_ff = d * (3 if cfg.mlp == "swiglu" else 2)
  if not moe_layer:
    return per_ff * cfg.d_ff
  return d * cfg.moe.n_experts + per_ff * cfg.expert_d_ff * (cfg.moe.n_experts_per_tok + cfg.moe.n_shared_experts)


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a token's matmuls: every projection (for MoE layers the router and the
  selected and shared experts only), the output head, and the MTP modules; not the embedding lookup."""
  attn = _attention_params(cfg)
  head = cfg.d_model * cfg.vocab_size
  total = head
  for s in stacks.stacks(cfg):  # each MTP module adds its projection and a pass of the shared head
    extra = 2 * cfg.d_model * cfg.d_model + head if s.name == "mtp" else 0
    total += s.n * (attn + _ffn_params(cfg, s.moe) + extra)
  return total


def _score_dims(cfg: ModelConfig) -> int:
  """Per head: the query-key dimension plus the value dimension (2 x head_dim for standard attention)."""
  if cfg.attention.kind == "mla":
    return cfg.attention.qk_nope_head_dim + cfg.attention.qk_rope_head_dim + cfg.attention.v_head_dim
  return 2 * cfg.dim_per_head


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token: 6 * matmul params + 6 * layers * heads * (qk + v dims) * seq_len.

  The attention term is PaLM's (appendix B: 12 * L * H * head_dim * T when qk and v dims are equal), counting
  the full T x T score matrix; recomputation from activation checkpointing is not counted (this is model
  FLOPs, the numerator of MFU). MoE layers count the active experts only.
  """
  layers = cfg.n_layers + cfg.mtp.depth
  return 6.0 * matmul_params(cfg) + 6.0 * layers * cfg.attention.n_heads * _score_dims(cfg) * seq_len


@functools.lru_cache(maxsize=4)
def _matmul_inputs(n: int, dtype) -> tuple[jax.Array, jax.Array]:
  return (jax.random.normal(jax.random.key(0), (n, n), dtype), jax.random.normal(jax.random.key(1), (n, n), dtype))


_matmul = jax.jit(lambda a, b: a @ b)


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
  """Sustained FLOP/s of a jitted square matmul on the default device, the best of `repeats` runs (the MFU
  denominator when no peak is configured). Measured in the same process as the step it is compared with: these
  machines are noisy. Inputs and the compiled matmul are cached, so calls between training steps are cheap."""
  a, b = _matmul_inputs(n, jnp.dtype(dtype))
  _matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    _matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def measure_matmul_peaks(samples: list[float] | None = None, n: int = 2048, dtype=jnp.float32,
                         repeats: int = 3) -> float:
  """Appends one `measure_matmul_peak` sample to `samples` and returns their median: call it between timed steps,
  so that the peak and the steps see the same load (one peak measured before and after a run differed 1.5x
  on a shared machine)."""
  samples = [] if samples is None else samples
  samples.append(measure_matmul_peak(n, dtype, repeats))
  return float(statistics.median(samples))
