"""The model zoo: pure functions over plain parameter pytrees.

    params = models.init(config, jax.random.key(0))
    logits = models.forward(config, params, tokens, positions=None, segment_ids=None)

`forward` is the entry point for every family; the family files hold presets of published models.
Mixture-of-experts models return their auxiliary losses with `forward(..., return_aux=True)` (see `hidden`);
`moe.update_router_biases` and `moe.trainable_mask` serve DeepSeek-V3's auxiliary-loss-free balancing.
"""
from __future__ import annotations

from typing import Any, Callable

from jpllm_jax.models import deepseek, gpt, llama, mistral, mixtral, moe, qwen2
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.models.loss import cross_entropy, fused_cross_entropy, token_log_probs
from jpllm_jax.models.transformer import (Context, context, embed, forward, forward_cached, head, hidden, init,
                                          init_cache, param_axes, param_shapes, param_specs, run_stack)

PRESETS: dict[str, Callable[..., ModelConfig]] = {**llama.PRESETS, **mistral.PRESETS, **qwen2.PRESETS,
                                                  **gpt.PRESETS, **mixtral.PRESETS, **deepseek.PRESETS}


def preset(name: str, **overrides: Any) -> ModelConfig:
  """A published architecture by name (`llama2-7b`, `llama3-8b`, `mistral-7b`, `qwen2-7b`, `llm-jp-13b-v1`,
  `mixtral-8x7b`, `deepseek-v3`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name](**overrides)


__all__ = ["Context", "ModelConfig", "PRESETS", "context", "cross_entropy", "embed", "forward", "forward_cached",
           "fused_cross_entropy", "head", "hidden", "init", "init_cache", "moe", "param_axes", "param_shapes",
           "param_specs", "preset", "run_stack", "token_log_probs"]
