"""Every preset's parameter count (jax.eval_shape, no memory) against its published figure, its FLOPs per token,
and its scaled-down twin training a few steps on CPU."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jpllm_jax import models
from jpllm_jax.models.presets import twin
from jpllm_jax.train import flops
from jpllm_jax.train.optimizer import make_optimizer
from jpllm_jax.train.step import StepConfig, init_state, make_train_step, state_shardings

# Published totals (embeddings counted): HF model cards' safetensors counts and papers.
PUBLISHED = {
    "llama2-7b": 6.74e9, "llama2-13b": 13.02e9, "llama2-70b": 68.98e9,  # meta-llama/Llama-2-*-hf
    "mistral-7b": 7.24e9,  # mistralai/Mistral-7B-v0.1
    "mixtral-8x7b": 46.7e9,  # mistralai/Mixtral-8x7B-v0.1 (arXiv:2401.04088: 47B)
    "llama3-8b": 8.03e9, "llama3-70b": 70.6e9,  # meta-llama/Meta-Llama-3-8B, -70B
    "qwen2-72b": 72.7e9,  # Qwen/Qwen2-72B (arXiv:2407.10671: 72.71B)
    "deepseek-v3": 685e9,  # deepseek-ai/DeepSeek-V3: 671B main model + 14B MTP module
    "llm-jp-3-172b": 2_444_992_512 + 169_947_181_056,  # llm-jp/llm-jp-3-172b: embedding + non-embedding
    "llm-jp-175b-v1": 175.0e9,  # the GPT-3 175B shape (Brown et al. 2020, table 2.1)
}


def gpt_count(v: int, d: int, layers: int, positions: int) -> int:
  """The GPT-2 architecture's count: 12 d^2 + 13 d per layer (4 d^2 + 4 d attention, 8 d^2 + 5 d MLP, 4 d
  norms), tied embedding, position table and final norm."""
  return layers * (12 * d * d + 13 * d) + v * d + positions * d + 2 * d


def llama_count(v: int, d: int, layers: int, heads: int, kv: int, ff: int) -> int:
  e = d // heads
  return layers * (2 * d * heads * e + 2 * d * kv * e + 3 * d * ff + 2 * d) + 2 * v * d + d


# Only nominal sizes are published (13b, 1.3b, 7B ...): the count the published architecture implies.
IMPLIED = {
    "llm-jp-13b-v1": gpt_count(50570, 5120, 40, 2048), "llm-jp-1.3b-v1": gpt_count(50570, 2048, 24, 2048),
    "fugaku-llm-13b": gpt_count(50570, 5184, 40, 2048),
    "swallow-llama2-7b": llama_count(43176, 4096, 32, 32, 32, 11008),
    "swallow-llama2-13b": llama_count(43176, 5120, 40, 40, 40, 13824),
    "swallow-llama2-70b": llama_count(43176, 8192, 80, 64, 8, 28672),
    "swallow-mistral-7b": llama_count(42800, 4096, 32, 32, 8, 14336),
    "qwen2-7b": 7.6156e9,  # Qwen/Qwen2-7B: 7.62B
}
NAMES = ("fugaku-llm-13b", "llm-jp-1.3b-v1", "llm-jp-13b-v1", "llm-jp-175b-v1", "llm-jp-3-172b", "llama2-7b",
         "llama2-13b", "llama2-70b", "swallow-llama2-7b", "swallow-llama2-13b", "swallow-llama2-70b",
         "swallow-mistral-7b", "mistral-7b", "mixtral-8x7b", "llama3-8b", "llama3-70b", "qwen2-72b", "deepseek-v3")


def count(cfg) -> int:
  return sum(math.prod(s.shape) for s in jax.tree.leaves(jax.eval_shape(lambda: models.param_shapes(cfg))))


def test_every_issue_preset_is_listed():
  assert set(NAMES) <= set(models.PRESETS)
  assert set(models.PRESETS) == set(PUBLISHED) | set(IMPLIED)


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_parameter_count(name):
  want = PUBLISHED.get(name, IMPLIED.get(name))
  got = count(models.preset(name))
  assert abs(got - want) / want < 0.005, (name, got, want)


def test_deepseek_v3_without_mtp_is_671b():
  assert abs(count(models.preset("deepseek-v3", mtp_depth=0)) - 671e9) / 671e9 < 0.005


@pytest.mark.parametrize("name", ["llama2-7b", "llama3-70b", "qwen2-72b", "llm-jp-13b-v1", "llm-jp-3-172b"])
def test_dense_flops_per_token(name):
  """Dense: 6 x (parameters less the input embedding lookup) + 12 x layers x d_model x seq (PaLM, appendix B)."""
  cfg, seq = models.preset(name), 4096
  lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  lookup += cfg.max_seq_len * cfg.d_model if cfg.learned_positions else 0
  want = 6 * (count(cfg) - lookup) + 12 * cfg.n_layers * cfg.attention.n_heads * cfg.dim_per_head * seq
  assert abs(flops.train_flops_per_token(cfg, seq) - want) / want < 0.005  # norms and biases: no matmul


@pytest.mark.parametrize("name,active", [("mixtral-8x7b", 12.9e9), ("deepseek-v3", 37e9)])
def test_moe_active_parameters(name, active):
  """MoE FLOPs count the active parameters: Mixtral 12.9B (arXiv:2401.04088), DeepSeek-V3 37B (arXiv:2412.19437),
  both counting the embeddings, without MTP."""
  cfg = models.preset(name, mtp_depth=0)
  got = flops.matmul_params(cfg) + cfg.vocab_size * cfg.d_model
  assert abs(got - active) / active < 0.02, got  # both figures are rounded (to 0.1B and to 1B).


TWINS = sorted({twin(models.preset(n)) for n in NAMES}, key=str)


@pytest.mark.parametrize("cfg", TWINS, ids=lambda c: f"{c.family}-{c.attention.kind}-{c.moe.n_experts}e")
def test_twin_trains(cfg):
  """Four steps on one repeated batch lower the loss (same family and features as the full preset)."""
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1, 1), ("data", "stage", "fsdp", "expert", "tensor"))
  tx, schedule = make_optimizer(1e-2, 0, 10, kinds=models.transformer.param_kinds(cfg))
  step = make_train_step(cfg, tx, schedule, StepConfig(), mesh)
  # Initialised on the step's shardings: an eagerly built state's arrays carry no mesh, and the second call (on
  # the step's outputs) would trace and compile the step again.
  state = jax.jit(functools.partial(init_state, cfg, tx), out_shardings=state_shardings(cfg, tx, mesh))(
      jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, cfg.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": jnp.ones((2, 32), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32)),
           "weights": jnp.ones((2, 32), jnp.float32)}
  losses = []
  for _ in range(4):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert step._cache_size() == 1  # one trace and compile for the four steps
