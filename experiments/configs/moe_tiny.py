r"""A small DeepSeek-V3-style model trained on CPU: MLA, DeepSeekMoE (64 fine-grained routed experts, top-6 within
2 of 8 groups, 1 shared expert, the first layer dense), auxiliary-loss-free balancing and one MTP module.

  python -m experiments.train --config=experiments/configs/moe_tiny.py --workdir=/tmp/jpllm-moe
  # expert parallelism over 4 devices (e.g. with XLA_FLAGS=--xla_force_host_platform_device_count=4 on CPU):
  python -m experiments.train --config=experiments/configs/moe_tiny.py --workdir=/tmp/jpllm-moe-ep \
      --config.mesh.expert=4 --config.mesh.data=1

Everything else (data, tokenizer, optimizer, logging) is the default config's.
"""
from __future__ import annotations

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model = dict(
      family="deepseek_v3", vocab_size=0, d_model=128, n_layers=3, n_heads=4, n_kv_heads=None, d_ff=384,
      max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-6, init_std=0.02, scaled_out_init=True,
      tie_embeddings=False, dtype="float32", param_dtype="float32", remat="none",
      attention="mla", q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
      n_experts=64, n_experts_per_tok=6, moe_d_ff=64, n_shared_experts=1, first_k_dense=1, router="sigmoid",
      n_group=8, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, moe_aux_loss_coef=1e-4,
      mtp_depth=1)
  c.train.steps = 100
  return c
