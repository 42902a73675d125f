"""Next-token cross-entropy with LLM-jp's z-loss, and per-token log-likelihoods for evaluation."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits_BTV, targets_BT):
  """log p(target) for each position, in float32."""
  log_z, target_logit = _log_z_and_target_logit(logits_BTV, targets_BT)
  return target_logit - log_z


def _log_z_and_target_logit(logits_BTV, targets_BT):
  logits = logits_BTV.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  return log_z, jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]


def cross_entropy(logits_BTV, targets_BT, weights_BT=None, *, z_loss: float = 0.0):
  """Mean weighted cross-entropy plus `z_loss * mean(log Z ** 2)` (PaLM's z-loss; 1e-4 in LLM-jp).

  Returns (total loss, metrics dict with `ce`, `z_loss` and the weight sum `tokens`). `weights_BT` is
  0 on padding (and wherever a target is not a real next token of the same document).
  """
  log_z, target_logit = _log_z_and_target_logit(logits_BTV, targets_BT)
  nll = log_z - target_logit
  w = jnp.ones_like(nll) if weights_BT is None else weights_BT.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)
  ce = (nll * w).sum() / denom
  zl = (jnp.square(log_z) * w).sum() / denom
  total = ce + z_loss * zl
  return total, {"ce": ce, "z_loss": zl, "tokens": w.sum()}
