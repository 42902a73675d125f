"""The training core's contracts: optimizer transforms by parameter kind (router biases have no Adam moments),
run-config defaults and one-line typo errors, mesh-rule overrides, MFU that is never impossible, and launches
that check everything before they touch a run's workdir."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import numpy as np
import optax
import pytest

from experiments.configs import default
from jpllm_jax import models
from jpllm_jax.models import gpt
from jpllm_jax.models.transformer import param_kinds
from jpllm_jax.parallel import DEFAULT_RULES, data_parallel_size, with_rule_overrides
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.train import config as run_config
from jpllm_jax.train.loop import train
from jpllm_jax.train.metrics import throughput
from jpllm_jax.train.optimizer import decay_mask, make_optimizer

MOE = models.preset("deepseek-v3", vocab_size=64, d_model=16, n_heads=2, d_ff=32, max_seq_len=16, n_layers=2,
                    q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
                    moe_d_ff=8, first_k_dense=1, n_experts=4, n_group=2, topk_group=1, n_experts_per_tok=2,
                    mtp_depth=1, rope_type="default", rope_scaling=())


def _flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


# ------------------------------------------------------------------------------------------- optimizer
def test_router_biases_have_no_adam_moments_and_do_not_move_through_the_optimizer():
  params = models.init(MOE, jax.random.key(0))
  tx, _ = make_optimizer(1e-2, 1, 10, kinds=param_kinds(MOE))
  state = tx.init(params)
  biases = [k for k in _flat(params) if k.endswith("['router']['bias']")]
  assert len(biases) == 2  # the MoE layer's and the MTP block's.
  moments = [m for _, m in optax.tree_utils.tree_get_all_with_path(state, "mu")]
  moments += [m for _, m in optax.tree_utils.tree_get_all_with_path(state, "nu")]
  assert len(moments) == 4  # mu and nu of the decayed and the undecayed group.
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_bias = sum(_flat(params)[k].size for k in biases)
  assert sum(x.size for m in moments for x in jax.tree.leaves(m)) == 2 * (n_params - n_bias)
  for m in moments:  # each router bias is a masked node in every moment tree: no array allocated for it.
    flat = _flat(m)
    assert not any(k.endswith("['router']['bias']") for k in flat)
  grads = jax.tree.map(np.ones_like, params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  flat_updates = _flat(updates)
  assert all(not np.any(flat_updates[k]) for k in biases)
  assert np.any(flat_updates["['layers_moe']['router']['kernel']"])


def test_weight_decay_by_parameter_kind():
  cfg = gpt.gpt(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=16)  # biases
  kinds = _flat(param_kinds(cfg))
  mask = _flat(decay_mask(param_kinds(cfg)))
  assert kinds["['layers']['attn_norm']['scale']"] == "scale" and kinds["['layers']['mlp']['up']['bias']"] == "bias"
  decayed = {k for k, v in mask.items() if v}
  assert decayed == {k for k, v in kinds.items() if v == "weight"}
  assert "['embed']['embedding']" in decayed and "['pos_embed']['embedding']" in decayed
  assert "['layers']['attn']['o']['kernel']" in decayed
  assert not decayed & {k for k, v in kinds.items() if v in ("scale", "bias")}
  moe_kinds = _flat(param_kinds(MOE))
  assert moe_kinds["['layers_moe']['router']['bias']"] == "router_bias"
  assert moe_kinds["['mtp']['proj']['kernel']"] == "weight" and moe_kinds["['mtp']['enorm']['scale']"] == "scale"
  # The decay acts: with zero gradients and lr > 0, matrices shrink and norm scales stay.
  params = models.init(cfg, jax.random.key(0))
  tx, _ = make_optimizer(1e-2, 0, 10, kinds=param_kinds(cfg), weight_decay=0.5)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(np.zeros_like, params), state, params)
  flat = _flat(updates)
  assert np.all(flat["['layers']['attn_norm']['scale']"] == 0)
  w = _flat(params)["['layers']['mlp']['up']['kernel']"]
  np.testing.assert_allclose(flat["['layers']['mlp']['up']['kernel']"], -1e-2 * 0.5 * np.asarray(w), rtol=1e-5)


# ------------------------------------------------------------------------------------------ run config
def test_config_defaults_once_and_typos_in_one_line():
  old = json.loads(default.get_config().to_json())
  del old["optim"]["mtp_loss_coef"], old["mesh"]["rules"]  # a config written before these fields existed.
  c = run_config.with_defaults(old)
  assert c.optim.mtp_loss_coef == 0.3 and c.mesh.rules == "" and c.train.steps == old["train"]["steps"]
  with pytest.raises(run_config.ConfigError, match=r"^unknown field model\.d_modle; did you mean d_model\?$"):
    run_config.with_defaults({"model": {"d_modle": 8}})
  with pytest.raises(run_config.ConfigError, match=r"^unknown field train\.stpes; did you mean steps\?$"):
    run_config.with_defaults({"train": {"stpes": 8}})


def test_launcher_reports_an_unknown_override_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}",
                         "--config.model.d_modle=3"], capture_output=True, text=True, timeout=300,
                        cwd=pathlib.Path(__file__).parents[1],
                        env={**os.environ, "JPLLM_NO_HUGE_PAGES": "1", "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert proc.stderr.strip() == "error: unknown field model.d_modle; did you mean d_model?", proc.stderr
  assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- rules
def test_rules_overridable_and_checked():
  rules = dict(with_rule_overrides("mlp=,batch=data+fsdp,vocab=tensor"))
  assert rules["mlp"] is None and rules["batch"] == ("data", "fsdp") and rules["embed"] == "fsdp"
  assert dict(with_rule_overrides({"embed": None, "heads": ["fsdp", "tensor"]}))["heads"] == ("fsdp", "tensor")
  assert with_rule_overrides("") == DEFAULT_RULES
  with pytest.raises(ValueError, match="unknown logical axis 'mpl'"):
    with_rule_overrides("mpl=tensor")
  with pytest.raises(ValueError, match=r"unknown mesh axes \['tensr'\]"):
    with_rule_overrides("mlp=tensr")
  mesh = types.SimpleNamespace(shape={"data": 2, "stage": 1, "fsdp": 3, "expert": 5, "tensor": 7})
  assert data_parallel_size(mesh) == 30
  assert data_parallel_size(mesh, with_rule_overrides("batch=data")) == 2
  assert data_parallel_size(mesh, with_rule_overrides("batch=")) == 1


# ------------------------------------------------------------------------------------------------ MFU
def test_mfu_only_with_a_peak_and_never_above_one():
  assert "mfu" not in throughput(1000.0, 1e9, None)  # no peak given: tokens/s and TFLOP/s only.
  out = throughput(1000.0, 1e9, 4e12)
  assert out == {"tokens_per_s": 1000.0, "model_tflops": 1.0, "mfu": 0.25}
  assert "mfu" not in throughput(1000.0, 1e9, 0.5e12)  # a peak below the achieved rate is wrong.


# -------------------------------------------------------------------------------------- launch checks
def _config(steps: int):
  c = default.get_config()
  c.data.tokenizer = mistral_v1_path()
  c.data.seq_len = 32
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
  c.train.update(steps=steps, batch_size=2, log_every=1, eval_every=0, checkpoint_every=100, peak_tflops=1.0)
  c.optim.warmup_steps = 1
  return c


def test_a_failed_launch_leaves_the_run_as_it_was(tmp_path):
  train(_config(2), str(tmp_path))
  config_json, model_json = tmp_path / "config.json", tmp_path / "checkpoints" / "model_config.json"
  saved, saved_model = config_json.read_text(), model_json.read_text()
  bad = [("data.tokenizer", "/nonexistent/spm.model", FileNotFoundError),
         ("data.sources", "/nonexistent.jsonl", FileNotFoundError),
         ("eval", {"every": 1, "tasks": "jcommonsenseqa,nosuchtask"}, ValueError),
         ("eval", {"every": 1, "scoring": "logprob"}, ValueError),
         ("mesh", {"data": 3}, ValueError),
         ("mesh", {"rules": "mpl=tensor"}, ValueError),
         ("model", {"d_model": 48}, ValueError)]  # checkpoints of another model in this workdir.
  for field, value, error in bad:
    c = _config(4)
    section, _, name = field.partition(".")
    if name:
      c[section][name] = value
    else:
      c[section].update(value)
    with pytest.raises(error):
      train(c, str(tmp_path))
    assert config_json.read_text() == saved and model_json.read_text() == saved_model, field
  assert sorted(p.name for p in tmp_path.glob("config*.json")) == ["config.json"]
  train(_config(4), str(tmp_path))  # a good relaunch with a change keeps the previous config.
  assert (tmp_path / "config.2.json").read_text() == saved
  assert json.loads(config_json.read_text())["train"]["steps"] == 4
  assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
