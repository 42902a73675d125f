"""optax AdamW with LLM-jp's recipe as the default, one transform per parameter kind.

b1 0.9, b2 0.95, eps 1e-8 (the 172B run used 1e-5: set `eps`), weight decay 0.1 on matrices and
embeddings only (not on norms and biases), global-norm clipping at 1.0, linear warm-up then cosine decay
to 10% of the peak learning rate. Router biases are outside the optimizer (`optax.set_to_zero`: no Adam
moments); `moe.update_router_biases` moves them.
"""
from __future__ import annotations

from typing import Any

import jax
import optax

from jpllm_jax.models import moe

# LLM-jp's values: the defaults of `make_optimizer` and of the run config's `optim` section.
RECIPE = dict(min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)

# Optimizer label of each parameter kind (`models.transformer.param_kinds`).
LABELS = {"weight": "decay", "scale": "no_decay", "bias": "no_decay", "router_bias": "frozen"}


def lr_schedule(peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_lr`, then cosine decay to `min_lr_ratio * peak_lr` at `total_steps`."""
  warmup_steps = max(0, min(warmup_steps, total_steps - 1))
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
                                            decay_steps=max(total_steps, warmup_steps + 1),
                                            end_value=peak_lr * min_lr_ratio)


def param_labels(kinds: Any) -> Any:
  """`multi_transform` labels ("decay", "no_decay", "frozen") from a tree of parameter kinds."""
  return jax.tree.map(LABELS.__getitem__, kinds)


def decay_mask(kinds: Any) -> Any:
  """True for the parameters that get weight decay (matrices and embeddings), from their kinds."""
  return jax.tree.map(lambda label: label == "decay", param_labels(kinds))


def _labels_without_kinds(params: Any) -> Any:
  """For a tree that is not a model's (no kinds given): router biases frozen, everything else decayed."""
  return jax.tree_util.tree_map_with_path(lambda path, _: "frozen" if moe.is_router_bias(path) else "decay", params)


def make_optimizer(peak_lr: float = 3e-4, warmup_steps: int = 2000, total_steps: int = 100_000, *,
                   kinds: Any = None, **recipe) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser and its learning-rate schedule (for logging).

  `kinds`: the parameter kinds (`models.transformer.param_kinds(cfg)`) that pick each leaf's transform;
  `recipe`: overrides of `RECIPE`.
  """
  unknown = set(recipe) - set(RECIPE)
  if unknown:
    raise TypeError(f"unknown optimizer settings {sorted(unknown)}; known: {sorted(RECIPE)}")
  r = {**RECIPE, **recipe}
  schedule = lr_schedule(peak_lr, warmup_steps, total_steps, r["min_lr_ratio"])
  adam = lambda wd: optax.adamw(schedule, b1=r["b1"], b2=r["b2"], eps=r["eps"], weight_decay=wd)
  labels = _labels_without_kinds if kinds is None else param_labels(kinds)
  tx = optax.multi_transform({"decay": adam(r["weight_decay"]), "no_decay": adam(0.0),
                              "frozen": optax.set_to_zero()}, labels)
  if r["clip_norm"] and r["clip_norm"] > 0:
    tx = optax.chain(optax.clip_by_global_norm(r["clip_norm"]), tx)
  return tx, schedule
