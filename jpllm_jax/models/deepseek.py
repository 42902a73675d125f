"""DeepSeek-V3 (arXiv:2412.19437): multi-head latent attention (mla.py) and DeepSeekMoE (moe.py).

The first `first_k_dense` layers keep a dense SwiGLU; the others route each token to 8 of 256 fine-grained
experts by sigmoid affinity with group-limited routing and an auxiliary-loss-free balancing bias, plus one
shared expert. Optional multi-token prediction (`mtp_depth`) adds a block predicting the token after next.
"""
from __future__ import annotations

from typing import Any

from jpllm_jax.models.config import ModelConfig, make, rope_scaling_tuple


def deepseek_v3(**overrides: Any) -> ModelConfig:
  """DeepSeek-V3 (671B total, 37B active): 61 layers (3 dense), 128 heads, q/kv latent ranks 1536/512,
  256 routed experts of width 2048 in 8 groups (top-8 within 4 groups), 1 shared expert, routed scaling 2.5,
  YaRN RoPE (factor 40 over a 4k original context) on 64 dims, interleaved RoPE layout, one MTP module,
  sequence-wise balance loss alpha 1e-4 (the bias update speed gamma 0.001 is the trainer's)."""
  base = dict(family="deepseek_v3", vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, n_kv_heads=None,
              d_ff=18432, max_seq_len=163840, norm="rms", norm_eps=1e-6, mlp="swiglu", activation="silu",
              rope_theta=10000.0, rope_type="yarn",
              rope_scaling=rope_scaling_tuple({"factor": 40.0, "original_max_position_embeddings": 4096,
                                               "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                                               "mscale_all_dim": 1.0}),
              tie_embeddings=False, attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
              qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True, n_experts=256, n_experts_per_tok=8,
              moe_d_ff=2048, n_shared_experts=1, first_k_dense=3, router="sigmoid", n_group=8, topk_group=4,
              norm_topk_prob=True, routed_scaling_factor=2.5, moe_aux_loss_coef=1e-4, mtp_depth=1)
  return make(make(**base), **overrides)


PRESETS = {"deepseek-v3": deepseek_v3}
