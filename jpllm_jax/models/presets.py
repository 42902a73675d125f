"""Scaled-down twins of the presets: the same family and features at tiny widths, to train in seconds on CPU."""
from __future__ import annotations

from jpllm_jax.models.config import ModelConfig


def twin(cfg: ModelConfig) -> ModelConfig:
  """`cfg` at 2 layers x 64 wide with 4 heads (its query/key-value grouping kept where it divides), a 256-token
  vocabulary and 64 positions; experts, latent attention, sliding window and MTP are kept, smaller."""
  a, m = cfg.attention, cfg.moe
  group = a.n_heads // a.num_heads_kv
  kv = max(1, 4 // group)
  small = dict(vocab_size=256, d_model=64, n_layers=2, d_ff=128, max_seq_len=64, n_heads=4,
               n_kv_heads=None if a.n_kv_heads is None else kv, head_dim=None, dtype="float32",
               param_dtype="float32")
  if a.sliding_window:
    small["sliding_window"] = 16
  if a.kind == "mla":
    small.update(q_lora_rank=None if a.q_lora_rank is None else 32, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8)
  if m.n_experts:
    grouped = m.n_group > 1
    small.update(n_experts=8 if grouped else 4, n_experts_per_tok=2, moe_d_ff=None if m.moe_d_ff is None else 32,
                 first_k_dense=min(m.first_k_dense, 1), n_group=2 if grouped else 1, topk_group=1)
  if cfg.mtp.depth:
    small["mtp_depth"] = 1
  return cfg.replace(**small)
