"""optax AdamW with LLM-jp's recipe as the default.

b1 0.9, b2 0.95, eps 1e-8 (the 172B run used 1e-5: set `eps`), weight decay 0.1 on matrices and
embeddings only (not on norms and biases), global-norm clipping at 1.0, linear warm-up then cosine decay
to 10% of the peak learning rate.
"""
from __future__ import annotations

from typing import Any

import jax
import optax


def lr_schedule(peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_lr`, then cosine decay to `min_lr_ratio * peak_lr` at `total_steps`."""
  warmup_steps = max(0, min(warmup_steps, total_steps - 1))
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
                                            decay_steps=max(total_steps, warmup_steps + 1),
                                            end_value=peak_lr * min_lr_ratio)


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay: every leaf except biases and norm parameters."""
  def wants_decay(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    return names[-1] != "bias" and not any("norm" in str(n) for n in names)
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(peak_lr: float = 3e-4, warmup_steps: int = 2000, total_steps: int = 100_000,
                   min_lr_ratio: float = 0.1, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, clip_norm: float = 1.0) -> tuple[optax.GradientTransformation,
                                                                                 optax.Schedule]:
  """The optimiser and its learning-rate schedule (for logging)."""
  schedule = lr_schedule(peak_lr, warmup_steps, total_steps, min_lr_ratio)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm and clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
