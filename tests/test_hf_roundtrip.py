"""HF -> ours -> HF is bit-exact; what we save loads in transformers; unsupported input fails clearly."""
from __future__ import annotations

import json
import tracemalloc

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from conftest import tiny_configs
from hf_helpers import (VARIANTS, hf_logits, make_hf_model, max_diff, our_logits, padded_batch, safetensors_contents,
                        save_hf_model)
from jpllm_jax import hf, models

CASES = [(v, torch.float32, None) for v in VARIANTS] + [
    ("llama3", torch.bfloat16, None), ("gpt2", torch.bfloat16, "20KB"), ("qwen2_tied", torch.float32, "30KB")]


@pytest.mark.parametrize("variant,dtype,shard", CASES, ids=[f"{v}-{str(d)[6:]}{'-sharded' if s else ''}"
                                                            for v, d, s in CASES])
def test_roundtrip_is_bit_exact(variant, dtype, shard, tmp_path):
  save_hf_model(variant, tmp_path / "hf", dtype, **({"max_shard_size": shard} if shard else {}))
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == bool(shard)
  cfg, params = hf.load_pretrained(tmp_path / "hf")
  assert cfg.numerics.param_dtype == str(dtype)[6:]
  assert all(x.dtype == np.dtype(cfg.numerics.param_dtype) for x in jax.tree.leaves(params))
  hf.save_pretrained(cfg, params, tmp_path / "ours", max_shard_size=shard or "5GB")
  assert (tmp_path / "ours" / "model.safetensors.index.json").exists() == bool(shard)
  want, got = safetensors_contents(tmp_path / "hf"), safetensors_contents(tmp_path / "ours")
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name] == want[name], f"{name} differs"


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_checkpoint_gives_identical_transformers_logits(variant, tmp_path):
  model = save_hf_model(variant, tmp_path / "hf")
  hf.save_pretrained(*hf.load_pretrained(tmp_path / "hf"), tmp_path / "ours")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
  tokens, mask = padded_batch(model.config.vocab_size)
  np.testing.assert_array_equal(hf_logits(reloaded.eval(), tokens, mask), hf_logits(model, tokens, mask))


@pytest.mark.parametrize("name", sorted(tiny_configs()))
def test_our_init_matches_transformers(name, tmp_path):
  """The other direction: our presets' configs and random weights, run by transformers."""
  cfg = tiny_configs()[name]
  params = models.init(cfg, jax.random.key(0))
  hf.save_pretrained(cfg, params, tmp_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  tokens, mask = padded_batch(cfg.vocab_size)
  diff = max_diff(our_logits(cfg, params, tokens, mask), hf_logits(model, tokens, mask), mask)
  print(f"\n[hf parity, ours -> transformers] {name}: max |logit diff| = {diff:.3g}")
  assert diff <= 1e-4, f"{name}: max abs logit diff {diff:.3g}"


@pytest.mark.parametrize("name", sorted(tiny_configs()))
def test_config_translation_round_trips(name):
  cfg = tiny_configs()[name]
  assert hf.config_from_hf(hf.config_to_hf(cfg, "float32")) == cfg


def test_legacy_rope_config():
  """Checkpoints written before transformers 5 keep `rope_theta` and `rope_scaling` ({"type": ...})."""
  config = make_hf_model("llama2").config.to_dict()
  del config["rope_parameters"]
  config.update(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
  cfg = hf.config_from_hf(config)
  assert (cfg.rope_theta, cfg.rope_type, cfg.rope_params) == (1e6, "linear", {"factor": 2.0})


# ------------------------------------------------------------------------------------------- errors
def _llama_dict(**changes):
  return {**make_hf_model("llama2").config.to_dict(), **changes}


@pytest.mark.parametrize("config,match", [
    (_llama_dict(architectures=["BertModel"]), "BertModel"),
    (_llama_dict(hidden_act="gelu"), "hidden_act"),
    (_llama_dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "yarn"),
    (_llama_dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=4,
                 max_window_layers=1, layer_types=None), "max_window_layers"),
    ({**make_hf_model("gpt2").config.to_dict(), "scale_attn_by_inverse_layer_idx": True},
     "scale_attn_by_inverse_layer_idx"),
])
def test_unsupported_configs_raise(config, match):
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(config)


def test_qwen2_window_in_all_layers_is_supported():
  config = _llama_dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=4,
                       max_window_layers=0, layer_types=None)
  assert hf.config_from_hf(config).attention.sliding_window == 4


def test_unsupported_architecture_checkpoint(tmp_path):
  save_hf_model("llama2", tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
  with pytest.raises(ValueError, match="BertModel"):
    hf.load_pretrained(tmp_path)


def _edit_tensors(path, edit):
  tensors = safetensors.numpy.load_file(path / "model.safetensors")
  edit(tensors)
  safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((95, 64), np.float32)}),
     "model.layers.1.mlp.up_proj.weight.*shape"),
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"), "missing tensor 'model.layers.1.self_attn.k_proj"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
     "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
])
def test_bad_tensors_raise_naming_the_tensor(edit, match, tmp_path):
  save_hf_model("llama2", tmp_path)
  _edit_tensors(tmp_path, edit)
  with pytest.raises(ValueError, match=match):
    hf.load_pretrained(tmp_path)


def test_save_rejects_options_hf_cannot_represent(tmp_path):
  cfg = tiny_configs()["llama2"].replace(scale_embedding=True)
  with pytest.raises(ValueError, match="scale_embedding"):
    hf.save_pretrained(cfg, models.init(cfg, jax.random.key(0)), tmp_path)
  cfg = tiny_configs()["mistral"].replace(qkv_bias=True)
  with pytest.raises(ValueError, match="qkv_bias"):
    hf.save_pretrained(cfg, models.init(cfg, jax.random.key(0)), tmp_path)


def test_load_holds_one_copy_of_the_weights(tmp_path):
  """Tensor-by-tensor conversion: peak memory is the weights plus a few tensors, never two copies."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
  hf.load_pretrained(tmp_path)  # Imports and caches outside the measurement.
  tracemalloc.start()
  try:
    _, params = hf.load_pretrained(tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  sizes = [x.nbytes for x in jax.tree.leaves(params)]
  largest_tensor = 1024 * 256 * 4  # The embedding and the head.
  assert peak < sum(sizes) + 3 * largest_tensor, (peak, sum(sizes))


def test_load_casts_to_the_requested_dtype(tmp_path):
  save_hf_model("qwen2", tmp_path)
  cfg, params = hf.load_pretrained(tmp_path, dtype="bfloat16")
  assert cfg.numerics.param_dtype == "bfloat16"
  assert {x.dtype.name for x in jax.tree.leaves(params)} == {"bfloat16"}
