"""Next-token cross-entropy with LLM-jp's z-loss, and per-token log-likelihoods for evaluation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jpllm_jax.parallel.logical import logical_constraint


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


def fused_cross_entropy(x_BTD, w, layout: str, targets_BT, weights_BT=None, *, z_loss: float = 0.0,
                        chunk_tokens: int = 512):
  """`cross_entropy(einsum(x, w), ...)` without ever holding the [B, T, V] logits: the output projection,
  softmax and both of its gradient products run in a scan over chunks of about `chunk_tokens` tokens
  (all B rows x chunk_tokens // B positions, so that a batch-sharded input stays sharded).

  x_BTD: final hidden states (compute dtype); w: the output projection, [D, V] with layout "dv" or the
  tied embedding [V, D] with layout "vd". Returns the same (total, metrics) as `cross_entropy`.

  Under differentiation the forward pass also forms the gradients of the total loss (logits are never
  stored; each chunk's softmax is turned into its gradient while it is hot) and the backward pass only
  scales them; the metrics `ce` and `z_loss` carry no gradient. On CPU this saves most of the memory traffic
  and page faults of the vocabulary head (benchmarks/train_throughput.py); on accelerators it is the usual
  memory saving of a chunked loss.
  """
  b, t, _ = x_BTD.shape
  w_BT = jnp.ones((b, t), jnp.float32) if weights_BT is None else weights_BT.astype(jnp.float32)
  c = min(max(1, chunk_tokens // b), t)
  pad = -t % c
  if pad:
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    w_BT = jnp.pad(w_BT, ((0, 0), (0, pad)))
  total, ce, zl = _fused_sums(layout, float(z_loss), c, x_BTD, w, targets_BT.astype(jnp.int32), w_BT)
  denom = jnp.maximum(w_BT.sum(), 1.0)
  ce, zl = jax.lax.stop_gradient(ce), jax.lax.stop_gradient(zl)
  return total / denom, {"ce": ce / denom, "z_loss": zl / denom, "tokens": w_BT.sum()}


def _to_chunks(x, c: int):
  """[B, T, ...] -> [T / c, B, c, ...]."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, t // c, c, *x.shape[2:]), 1, 0)


def _from_chunks(x):
  n, b, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _chunk_stats(layout: str, x_BCD, w, t_BC):
  """Logits of a chunk, their log-partition function and the target logits."""
  logits = jnp.einsum(f"bcd,{layout}->bcv", x_BCD, w, preferred_element_type=jnp.float32)
  logits = logical_constraint(logits, ("batch", "length", "vocab"))
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, t_BC[..., None], axis=-1)[..., 0]
  return logits, log_z, target


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_sums(layout: str, z_loss: float, c: int, x_BTD, w, targets_BT, w_BT):
  """(total, ce, z) weighted sums; the forward-only path."""
  def body(carry, xs):
    x, t, wt = xs
    _, log_z, target = _chunk_stats(layout, x, w, t)
    ce, zl = carry
    return (ce + jnp.sum((log_z - target) * wt), zl + jnp.sum(jnp.square(log_z) * wt)), None

  (ce, zl), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)),
                             (_to_chunks(x_BTD, c), _to_chunks(targets_BT, c), _to_chunks(w_BT, c)))
  return ce + z_loss * zl, ce, zl


def _fused_sums_fwd(layout: str, z_loss: float, c: int, x_BTD, w, targets_BT, w_BT):
  def body(carry, xs):
    x, t, wt = xs
    logits, log_z, target = _chunk_stats(layout, x, w, t)
    ce, zl, dw = carry
    # d total / d logits = wt * (softmax * (1 + 2 z log_z) - onehot(target)), in one elementwise pass.
    scale = wt * (1.0 + 2.0 * z_loss * log_z)
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t[..., None]
    d = jnp.exp(logits - log_z[..., None]) * scale[..., None] - jnp.where(onehot, wt[..., None], 0.0)
    d = logical_constraint(d.astype(x.dtype), ("batch", "length", "vocab"))
    dx = jnp.einsum(f"bcv,{layout}->bcd", d, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = dw + jnp.einsum(f"bcd,bcv->{layout}", x, d, preferred_element_type=jnp.float32)
    return (ce + jnp.sum((log_z - target) * wt), zl + jnp.sum(jnp.square(log_z) * wt), dw), dx

  init = (jnp.float32(0), jnp.float32(0), jnp.zeros(w.shape, jnp.float32))
  (ce, zl, dw), dx = jax.lax.scan(body, init, (_to_chunks(x_BTD, c), _to_chunks(targets_BT, c),
                                               _to_chunks(w_BT, c)))
  return (ce + z_loss * zl, ce, zl), (_from_chunks(dx), dw.astype(w.dtype))


def _fused_sums_bwd(layout: str, z_loss: float, c: int, res, g):
  del layout, z_loss, c
  dx, dw = res
  g_total = g[0]  # `fused_cross_entropy` stops the gradient of the other two outputs.
  return (dx * g_total.astype(dx.dtype), dw * g_total.astype(dw.dtype), None, None)


_fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd)
