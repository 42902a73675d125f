"""The model zoo: pure functions over plain parameter pytrees.

    params = models.init(config, jax.random.key(0))
    logits = models.forward(config, params, tokens, positions=None, segment_ids=None)

`forward` is the entry point for every family; the family files hold presets of published models.
Mixture-of-experts models return their auxiliary losses with `forward(..., return_aux=True)` (see `hidden`);
`moe.update_router_biases` and `moe.trainable_mask` serve DeepSeek-V3's auxiliary-loss-free balancing.
`stacks.stacks(cfg)` describes the stacks of layers (`layers`, `layers_moe`, the MTP blocks) for every reader.
"""
from __future__ import annotations

from typing import Any, Callable

from jpllm_jax.models import deepseek, gpt, llama, mistral, mixtral, moe, qwen2, stacks
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.models.loss import cross_entropy, fused_cross_entropy, token_log_probs
from jpllm_jax.models.transformer import (Context, context, embed, forward, forward_cached, head, hidden, init,
                                          init_cache, mtp_hidden, param_axes, param_shapes, param_specs,
                                          run_stack)

PRESETS: dict[str, Callable[..., ModelConfig]] = {**llama.PRESETS, **mistral.PRESETS, **qwen2.PRESETS,
                                                  **gpt.PRESETS, **mixtral.PRESETS, **deepseek.PRESETS}


def preset(name: str, **overrides: Any) -> ModelConfig:
  """The ModelConfig of a published architecture: one of `PRESETS` (each family file's table states its source).

  Names: `llama2-7b|13b|70b`, `llama3-8b|70b`, `mistral-7b`, `mixtral-8x7b`, `qwen2-7b|72b`, `deepseek-v3`
  (671B + the MTP module; `mtp_depth=0` without), Japanese runs `swallow-llama2-7b|13b|70b` and
  `swallow-mistral-7b` (vocabularies expanded to 43,176 / 42,800), `llm-jp-1.3b-v1`, `llm-jp-13b-v1`,
  `llm-jp-175b-v1`, `llm-jp-3-172b`, `fugaku-llm-13b`. `overrides` are ModelConfig.replace fields (flat names,
  e.g. `remat="full"`, `dtype="bfloat16"`). `models.presets.twin(cfg)` is a preset's scaled-down CPU twin; the
  run's published training settings are in experiments/configs/presets.py."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name](**overrides)


__all__ = ["Context", "ModelConfig", "PRESETS", "context", "cross_entropy", "embed", "forward", "forward_cached",
           "fused_cross_entropy", "head", "hidden", "init", "init_cache", "moe", "mtp_hidden", "param_axes",
           "param_shapes", "param_specs", "preset", "run_stack", "stacks", "token_log_probs"]
