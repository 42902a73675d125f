"""Tiny random Hugging Face models, built locally (never downloaded), and padded batches for the interop tests."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from safetensors import safe_open

from jpllm_jax import models

LLAMA_LIKE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def hf_config(variant: str) -> transformers.PreTrainedConfig:
  """One small config per family and variant the interop must cover."""
  if variant == "llama2":  # Multi-head attention, rope theta 10000.
    return transformers.LlamaConfig(**{**LLAMA_LIKE, "num_key_value_heads": 4})
  if variant == "llama3":  # GQA; head_dim 32 puts rotary frequencies in all three llama3 scaling bands.
    return transformers.LlamaConfig(**{**LLAMA_LIKE, "hidden_size": 128}, max_position_embeddings=128,
                                    rope_parameters=dict(LLAMA3_ROPE))
  if variant == "mistral":  # The window (4) is shorter than the test sequences (16).
    return transformers.MistralConfig(**LLAMA_LIKE, sliding_window=4)
  if variant in ("qwen2", "qwen2_tied"):  # q/k/v biases.
    return transformers.Qwen2Config(**LLAMA_LIKE, tie_word_embeddings=variant == "qwen2_tied")
  if variant == "gpt2":  # Fused c_attn, Conv1D [in, out] weights, learned positions, tied head.
    return transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                   initializer_range=0.2, bos_token_id=0, eos_token_id=0)
  if variant == "mixtral":  # 8 experts, top-2, in every layer.
    return transformers.MixtralConfig(**LLAMA_LIKE, num_local_experts=8, num_experts_per_tok=2)
  if variant in ("deepseek_v3", "deepseek_v3_yarn"):
    # 64 routed experts in 8 groups, top-4 within 4 groups, a shared expert, one dense layer then two MoE layers.
    # The yarn variant also has a plain q projection and the non-interleaved RoPE layout.
    yarn = variant == "deepseek_v3_yarn"
    return transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=64, n_group=8,
        topk_group=4, num_experts_per_tok=4, first_k_dense_replace=1, q_lora_rank=None if yarn else 32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5,
        initializer_range=0.2, max_position_embeddings=32, rope_interleave=not yarn,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0} if yarn else None)
  raise ValueError(variant)


VARIANTS = ("gpt2", "llama2", "llama3", "mistral", "qwen2", "qwen2_tied")
MOE_VARIANTS = ("mixtral", "deepseek_v3", "deepseek_v3_yarn")


def make_hf_model(variant: str, seed: int = 0) -> transformers.PreTrainedModel:
  """A float32 model in eval mode; norms and biases get noise so that their mapping is tested too."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(variant), attn_implementation="eager")
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:  # HF initialises norms to 1 and biases to 0.
        p.add_(0.1 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's routing bias: zeros would test no mapping.
        b.copy_(0.3 * torch.randn_like(b))
  return model.eval()


def save_hf_model(variant: str, path: pathlib.Path, dtype: torch.dtype = torch.float32,
                  **save_kwargs) -> transformers.PreTrainedModel:
  model = make_hf_model(variant).to(dtype)
  model.save_pretrained(path, **save_kwargs)
  return model


def padded_batch(vocab_size: int, length: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """tokens [4, length] and mask (1 on tokens): a full row, two right-padded rows and a left-padded row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (4, length))
  mask = np.ones((4, length), np.int32)
  mask[1, 10:] = 0
  mask[2, 3:] = 0
  mask[3, :5] = 0
  return np.where(mask == 1, tokens, 0), mask


def positions(mask: np.ndarray) -> np.ndarray:
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def hf_logits(model: transformers.PreTrainedModel, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions(mask)))
  return out.logits.float().numpy()


def our_logits(cfg: models.ModelConfig, params, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  logits = models.forward(cfg, params, jnp.asarray(tokens), positions=jnp.asarray(positions(mask)),
                          segment_ids=jnp.asarray(mask))
  return np.asarray(logits)


def max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  """Largest |a - b| over the non-pad positions."""
  return float(np.abs(a - b)[mask.astype(bool)].max())


def safetensors_contents(path: pathlib.Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
  """name -> (dtype, shape, raw bytes) over all shards of a checkpoint directory."""
  contents = {}
  for file in sorted(path.glob("*.safetensors")):
    with safe_open(file, framework="np") as f:
      for name in f.keys():
        x = f.get_tensor(name)
        contents[name] = (f.get_slice(name).get_dtype(), x.shape, x.tobytes())
  return contents


def random_params(cfg: models.ModelConfig, seed: int = 0, std: float | None = None) -> dict:
  """Random parameters of `cfg` from numpy, without compiling `models.init` (seconds per config on two cores):
  normal(std or init_std) weights, norms near 1, and a sigmoid-router bias of scale 0.3 (zeros would not test
  its mapping)."""
  rng = np.random.default_rng(seed)

  def make(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.asarray(1 + 0.1 * rng.normal(size=s.shape), s.dtype)
    scale = 0.3 if name.endswith("['router']['bias']") else (std or cfg.init_std)
    return jnp.asarray(scale * rng.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(make, models.param_shapes(cfg))
