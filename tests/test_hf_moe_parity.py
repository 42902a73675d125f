"""HF interop of the mixture-of-experts families: Mixtral and DeepSeek-V3 (MLA, group-limited sigmoid routing,
shared experts, dense first layers, YaRN) match transformers' float32 logits and round-trip bit-exactly."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from hf_helpers import (MOE_VARIANTS, hf_logits, make_hf_model, max_diff, our_logits, padded_batch, random_params,
                        safetensors_contents, save_hf_model)
from jpllm_jax import hf, models

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=MOE_VARIANTS)
def converted(request, tmp_path_factory):
  """(variant, HF model, its checkpoint directory, our config and params loaded from it)."""
  path = tmp_path_factory.mktemp(request.param)
  model = save_hf_model(request.param, path)
  return request.param, model, path, *hf.load_pretrained(path)


def test_logits_match_transformers(converted):
  variant, model, _, cfg, params = converted
  tokens, mask = padded_batch(cfg.vocab_size)
  ref = hf_logits(model, tokens, mask)
  diff = max_diff(our_logits(cfg, params, tokens, mask), ref, mask)
  print(f"\n[hf parity] {variant}: max |logit diff| = {diff:.3g} (logits up to {np.abs(ref).max():.3g})")
  assert diff <= TOLERANCE, f"{variant}: max abs logit diff {diff:.3g} > {TOLERANCE}"


def test_routing_details_matter(converted):
  """Each DeepSeek routing detail changes the logits at this size, so the parity above tests its mapping."""
  variant, model, _, cfg, params = converted
  if cfg.family != "deepseek_v3":
    pytest.skip("DeepSeek-V3 routing")
  tokens, mask = padded_batch(cfg.vocab_size)
  ref = hf_logits(model, tokens, mask)
  no_bias = jax.tree.map(lambda x: x, params)
  no_bias["layers_moe"]["router"]["bias"] = np.zeros_like(params["layers_moe"]["router"]["bias"])
  if cfg.rope_type == "yarn":  # positions up to 15 pass the original context of 8.
    changes = {"yarn": (cfg.replace(rope_type="default", rope_scaling=()), params)}
  else:
    changes = {"router bias": (cfg, no_bias), "group limit": (cfg.replace(n_group=1, topk_group=1), params),
               "routed scaling": (cfg.replace(routed_scaling_factor=1.0), params)}
  for name, (c, p) in changes.items():
    assert max_diff(our_logits(c, p, tokens, mask), ref, mask) > 1e-2, name


def test_roundtrip_is_bit_exact(converted, tmp_path):
  _, _, path, cfg, params = converted
  hf.save_pretrained(cfg, params, tmp_path)
  want, got = safetensors_contents(path), safetensors_contents(tmp_path)
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name] == want[name], f"{name} differs"
  assert hf.config_from_hf(hf.config_to_hf(cfg, "float32")) == cfg


def test_saved_checkpoint_loads_in_transformers(converted, tmp_path):
  _, model, _, cfg, params = converted
  hf.save_pretrained(cfg, params, tmp_path)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  tokens, mask = padded_batch(cfg.vocab_size)
  np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask), hf_logits(model, tokens, mask))


def test_bfloat16_keeps_the_deepseek_router_in_float32(tmp_path):
  """transformers keeps DeepSeek-V3's gate weight and bias in float32; so do we, on load and on save."""
  save_hf_model("deepseek_v3", tmp_path / "hf")
  cfg, params = hf.load_pretrained(tmp_path / "hf", dtype="bfloat16")
  router = params["layers_moe"]["router"]
  assert router["kernel"].dtype == np.float32 and router["bias"].dtype == np.float32
  assert params["layers_moe"]["experts"]["gate"].dtype.name == "bfloat16"
  hf.save_pretrained(cfg, params, tmp_path / "ours")
  contents = safetensors_contents(tmp_path / "ours")
  assert contents["model.layers.1.mlp.gate.e_score_correction_bias"][0] == "F32"
  assert contents["model.layers.1.mlp.experts.0.up_proj.weight"][0] == "BF16"
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
  assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "deepseek-v3"])
def test_our_init_matches_transformers(preset, tmp_path):
  """The other direction: a small config of the preset and our random weights (router bias nonzero), run by
  transformers."""
  small = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64, init_std=0.3)
  if preset == "mixtral-8x7b":
    small.update(n_kv_heads=2)
  else:
    small.update(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_d_ff=8,
                 first_k_dense=1, n_experts=16, n_group=4, topk_group=2, n_experts_per_tok=4, mtp_depth=0,
                 rope_scaling=(("factor", 4.0), ("mscale", 1.0), ("mscale_all_dim", 1.0),
                               ("original_max_position_embeddings", 8.0)))
  cfg = models.preset(preset, **small)
  params = random_params(cfg)
  hf.save_pretrained(cfg, params, tmp_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  tokens, mask = padded_batch(cfg.vocab_size)
  diff = max_diff(our_logits(cfg, params, tokens, mask), hf_logits(model, tokens, mask), mask)
  print(f"\n[hf parity, ours -> transformers] {preset}: max |logit diff| = {diff:.3g}")
  assert diff <= TOLERANCE, f"{preset}: max abs logit diff {diff:.3g}"
  assert hf.config_from_hf(hf.config_to_hf(cfg, "float32")) == cfg.replace(router_z_loss_coef=0.0)


def test_mtp_modules_load_only_where_stored(tmp_path):
  """transformers' configs declare one MTP module (num_nextn_predict_layers) but save none: we load none. A
  published checkpoint stores it as layer `num_hidden_layers`; a second module past the declared one is skipped."""
  model = make_hf_model("deepseek_v3")
  assert model.config.num_nextn_predict_layers == 1
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_pretrained(tmp_path)
  assert cfg.mtp.depth == 0 and cfg.n_layers == 3 and "mtp" not in params
  tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  tensors["model.layers.4.eh_proj.weight"] = np.zeros((64, 128), np.float32)  # module 2: not declared
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  assert hf.load_pretrained(tmp_path)[0].mtp.depth == 0
  tensors["model.layers.3.eh_proj.weight"] = np.zeros((64, 128), np.float32)  # module 1, incomplete
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.3\."):
    hf.load_pretrained(tmp_path)


def test_mtp_modules_roundtrip_in_deepseek_layout(tmp_path):
  """Our MTP module is saved as DeepSeek publishes it (layer `num_hidden_layers`: a decoder layer, enorm, hnorm,
  eh_proj, shared_head, copies of the embedding and head), loads back bit-exact, and transformers loads the
  directory and gives the main model's logits."""
  small = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64, init_std=0.3,
               q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_d_ff=8,
               first_k_dense=1, n_experts=4, n_group=2, topk_group=1, n_experts_per_tok=2, mtp_depth=1,
               rope_type="default", rope_scaling=())
  cfg = models.preset("deepseek-v3", **small)
  params = random_params(cfg)
  hf.save_pretrained(cfg, params, tmp_path)
  stored = safetensors_contents(tmp_path)
  mtp = sorted(n[len("model.layers.2."):] for n in stored if n.startswith("model.layers.2."))
  assert mtp == sorted(
      ["embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
       "shared_head.head.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
       "mlp.gate.weight", "mlp.gate.e_score_correction_bias", "mlp.shared_experts.gate_proj.weight",
       "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.down_proj.weight"]
      + [f"self_attn.{m}.weight" for m in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
                                            "kv_a_layernorm", "kv_b_proj", "o_proj")]
      + [f"mlp.experts.{e}.{m}.weight" for e in range(4) for m in ("gate_proj", "up_proj", "down_proj")])
  assert stored["model.layers.2.embed_tokens.weight"] == stored["model.embed_tokens.weight"]
  assert stored["model.layers.2.shared_head.head.weight"] == stored["lm_head.weight"]
  eh = np.asarray(params["mtp"]["proj"]["kernel"][0])  # [2D, D], input [RMSNorm(emb); RMSNorm(h)]
  np.testing.assert_array_equal(safetensors.numpy.load_file(tmp_path / "model.safetensors")[
      "model.layers.2.eh_proj.weight"], eh.T)
  cfg2, params2 = hf.load_pretrained(tmp_path)
  assert cfg2 == cfg
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  tokens, mask = padded_batch(cfg.vocab_size)
  assert max_diff(our_logits(cfg, params, tokens, mask), hf_logits(model, tokens, mask), mask) <= TOLERANCE


@pytest.mark.parametrize("change,match", [
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_deepseek_configs_raise(change, match):
  config = {**make_hf_model("deepseek_v3").config.to_dict(), "architectures": ["DeepseekV3ForCausalLM"], **change}
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(config)
