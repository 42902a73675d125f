"""ModelConfig's groups, the flat names that keep loading, and the injected parallel strategy."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from jpllm_jax import checkpoint, models
from jpllm_jax.models import config as model_config, strategy
from jpllm_jax.models.config import AttentionConfig, ModelConfig, MoEConfig
from jpllm_jax.parallel import DEFAULT_RULES, axis_rules, expert

# The 49 flat fields of ModelConfig before the groups, with the values a tiny DeepSeek-V3 run saved.
OLD_FLAT = {
    "family": "deepseek_v3", "vocab_size": 256, "d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": None,
    "head_dim": None, "d_ff": 64, "max_seq_len": 64, "norm": "rms", "norm_eps": 1e-6, "mlp": "swiglu",
    "activation": "silu", "qkv_bias": False, "out_bias": False, "mlp_bias": False, "rope_theta": 10000.0,
    "rope_type": "yarn", "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 16},
    "learned_positions": False, "sliding_window": None, "tie_embeddings": False, "scale_embedding": False,
    "init_std": 0.02, "scaled_out_init": True, "dtype": "bfloat16", "param_dtype": "float32", "remat": "full",
    "attention": "mla", "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
    "v_head_dim": 8, "rope_interleave": True, "n_experts": 8, "n_experts_per_tok": 2, "moe_d_ff": 16,
    "n_shared_experts": 1, "first_k_dense": 1, "router": "sigmoid", "n_group": 2, "topk_group": 1,
    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "moe_aux_loss_coef": 1e-4, "router_z_loss_coef": 0.0,
    "capacity_factor": None, "mtp_depth": 1,
}


def test_old_flat_model_config_json_loads(tmp_path):
  assert len(OLD_FLAT) == 49
  (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(OLD_FLAT))
  cfg = checkpoint.load_config(tmp_path)
  assert cfg.attention.kind == "mla" and cfg.attention.q_lora_rank == 16 and cfg.attention.rope_interleave
  assert cfg.moe.n_experts == 8 and cfg.moe.n_group == 2 and cfg.moe.routed_scaling_factor == 2.5
  assert cfg.mtp.depth == 1 and cfg.numerics.dtype == "bfloat16" and cfg.numerics.remat == "full"
  assert cfg.rope_params == {"factor": 4.0, "original_max_position_embeddings": 16.0}
  assert (cfg.n_dense_layers, cfg.n_moe_layers, cfg.n_routed_layers, cfg.rope_dim) == (1, 2, 3, 4)
  # Every old field went somewhere: the flat names of the new form are the old ones.
  assert set(OLD_FLAT) <= model_config.KEYS
  # Written back nested, and read back equal.
  nested = json.loads(cfg.to_json())
  assert nested["moe"]["n_experts"] == 8 and nested["attention"]["kind"] == "mla" and "n_experts" not in nested
  assert ModelConfig.from_json(cfg.to_json()) == cfg
  assert hash(cfg) == hash(ModelConfig.from_dict(nested))


def test_flat_names_in_replace_presets_and_groups():
  cfg = models.preset("llama2-7b", n_heads=2, n_kv_heads=1, d_model=16, sliding_window=5, dtype="bfloat16")
  assert cfg.attention == AttentionConfig(n_heads=2, n_kv_heads=1, sliding_window=5)
  assert cfg.numerics.dtype == "bfloat16" and cfg.d_model == 16 and cfg.dim_per_head == 8
  ds = models.preset("deepseek-v3")
  small = ds.replace(n_group=1, topk_group=1, mtp_depth=0, dtype="bfloat16")
  assert (small.moe.n_group, small.mtp.depth, small.numerics.dtype) == (1, 0, "bfloat16")
  assert small.moe.n_experts == ds.moe.n_experts and ds.moe.n_group == 8  # the original is unchanged
  # A whole group replaces the preset's; flat names next to it still apply.
  dense = ds.replace(moe=MoEConfig(), mtp_depth=0)
  assert dense.moe == MoEConfig() and dense.n_dense_layers == ds.n_layers
  assert ds.replace(moe={"n_experts": 4, "n_experts_per_tok": 1}, n_group=1, topk_group=1).moe.n_experts == 4
  # Validation lives with each group; cross-group rules with ModelConfig.
  with pytest.raises(ValueError, match="n_experts_per_tok"):
    ds.replace(n_experts_per_tok=0)
  with pytest.raises(ValueError, match="first_k_dense"):
    ds.replace(first_k_dense=ds.n_layers)
  with pytest.raises(ValueError, match="unknown ModelConfig field"):
    ds.replace(n_expert=3)
  with pytest.raises(ValueError, match="unknown moe field"):
    ds.replace(moe={"n_heads": 3})


def test_models_do_not_import_expert_parallelism():
  code = "import sys, jpllm_jax.models; print('jpllm_jax.parallel.expert' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  assert out.strip() == "False"


def test_axis_rules_enter_the_expert_parallel_strategy():
  assert strategy.current().expert_ffn is None
  one = SimpleNamespace(shape={"data": 2, "expert": 1, "tensor": 1}, axis_names=("data", "expert", "tensor"))
  assert expert.strategy(one, DEFAULT_RULES).expert_ffn is None
  ep = SimpleNamespace(shape={"data": 1, "fsdp": 1, "expert": 2, "tensor": 2},
                       axis_names=("data", "fsdp", "expert", "tensor"))
  with axis_rules(ep, DEFAULT_RULES):
    fn = strategy.current().expert_ffn
    assert fn.func is expert.moe_ffn_expert_parallel and fn.keywords["mesh"] is ep
    assert fn.keywords["token_axes"] == ("data", "fsdp", "expert") and fn.keywords["tensor_axis"] == "tensor"
  assert strategy.current().expert_ffn is None
