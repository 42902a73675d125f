"""The matmul policy of the dense projections: the compute dtype, or FP8 GEMMs (`kernels_pallas.fp8_gemm`).

Every projection of the models calls `layers.matmul(eq, x, w, name=...)`; under an FP8 `Policy` (entered by the
train step through `strategy.use`, built by `policy(cfg)` from `numerics.matmul` and `numerics.fp8_exclude`) the
einsum is reshaped to 2-D (or batched, for stacked experts) `fp8_matmul`s:

  fp8_tensorwise  one FP32 scale per tensor from its current amax (Transformer Engine's current scaling).
  fp8_blockwise   DeepSeek-V3 (arXiv:2412.19437 section 3.3): activations per 1x128 tile, weights per 128x128
                  block, FP32 accumulation promoted every 128 elements of K; dgrad and wgrad in FP8 too.

`name` says what a projection is (NAMES); names in the exclusion list keep the compute dtype. The policy's
statistics: inside `probing(params)` every FP8 GEMM adds, to the gradient of a probe in the params, the counts of
elements of its operands and output cotangent that saturate E4M3 (|x / s| beyond 448) and that are flushed to zero
(x != 0 rounding to 0) out of all elements; `stats(grads)` turns them into the logged fractions. The gradient is
the side channel because it reaches every call, in scanned layers and switch branches alike. The routed experts'
GEMMs run inside their own custom VJP (moe/ops.py `expert_mixture`) and are not counted.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from jpllm_jax.models import strategy
from jpllm_jax.models.config import ModelConfig
from kernels_pallas import fp8_quant
from kernels_pallas.fp8_gemm import E4M3, fp8_matmul

# Projection names: GQA attention and MLP projections of transformer.py are "dense" (unnamed call sites).
NAMES = ("embed", "lm_head", "router", "attn", "mlp", "dense", "shared", "experts", "mtp_proj")
PROBE = "fp8_probe"  # the params key of the statistics probe (see module docstring)
SCALING = {"fp8_tensorwise": "tensorwise", "fp8_blockwise": "blockwise"}


@dataclasses.dataclass(frozen=True)
class Policy:
  """An FP8 recipe for the projections not in `exclude`; `backend` is the fp8_gemm backend (None: by platform)."""
  scaling: str  # "tensorwise" | "blockwise"
  exclude: frozenset[str] = frozenset({"embed", "lm_head", "router"})
  backend: str | None = None

  def applies(self, name: str) -> bool:
    return name not in self.exclude


def policy(cfg: ModelConfig, backend: str | None = None) -> Policy | None:
  """The config's policy (None for `matmul='default'`)."""
  kind = cfg.numerics.matmul
  if kind == "default":
    return None
  if kind not in SCALING:
    raise NotImplementedError(f"matmul={kind!r}: delayed scaling is not implemented yet; use fp8_tensorwise or "
                              "fp8_blockwise")
  unknown = cfg.numerics.fp8_excluded - set(NAMES)
  if unknown:
    raise ValueError(f"fp8_exclude names {sorted(unknown)} are not projection names {NAMES}")
  return Policy(SCALING[kind], cfg.numerics.fp8_excluded, backend)


def current(name: str) -> Policy | None:
  """The injected policy if it applies to projection `name`."""
  p = strategy.current().matmul
  return p if p is not None and p.applies(name) else None


# ------------------------------------------------------------------------------------------ einsum -> GEMM
def _parse(eq: str):
  lhs, rest = eq.replace(" ", "").split(",")
  rhs, out = rest.split("->")
  batch = [c for c in lhs if c in rhs and c in out]
  contract = [c for c in lhs if c in rhs and c not in out]
  free_x = [c for c in lhs if c not in rhs]
  free_w = [c for c in rhs if c not in lhs]
  if any(c not in out for c in free_x + free_w):
    raise ValueError(f"{eq!r} is not a projection: an index of one operand only is summed")
  return lhs, rhs, out, batch, contract, free_x, free_w


def einsum(pol: Policy, eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`jnp.einsum(eq, x, w)` as FP8 GEMMs: x -> [B, M, K], w -> [B, K, N] (B: indices in x, w and the output,
  e.g. the experts of "eck,ekn->ecn"), one `fp8_matmul` per B (vmapped), then back to the output's layout."""
  lhs, rhs, out, batch, contract, free_x, free_w = _parse(eq)
  size = {**dict(zip(lhs, x.shape)), **dict(zip(rhs, w.shape))}
  prod = lambda idx: math.prod(size[c] for c in idx)  # noqa: E731
  x3 = jnp.transpose(x, [lhs.index(c) for c in batch + free_x + contract]).reshape(
      prod(batch), prod(free_x), prod(contract))
  w3 = jnp.transpose(w, [rhs.index(c) for c in batch + contract + free_w]).reshape(
      prod(batch), prod(contract), prod(free_w))
  mm = functools.partial(_probed_matmul, pol.scaling, pol.backend)
  y = jax.vmap(mm)(x3, w3) if batch else mm(x3[0], w3[0])[None]
  order = batch + free_x + free_w
  y = y.reshape([size[c] for c in order])
  return jnp.transpose(y, [order.index(c) for c in out])


# ------------------------------------------------------------------------------------------ statistics
# The probe of the innermost `probing` (a traced array while the loss is differentiated), or None.
_PROBE: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("jpllm_fp8_probe", default=None)


@contextlib.contextmanager
def probing(params: dict) -> Iterator[dict]:
  """Within, FP8 GEMMs count saturated and flushed elements into the gradient of `params[PROBE]` (if present);
  yields params without the probe (what the model reads)."""
  if PROBE not in params:
    yield params
    return
  token = _PROBE.set(params[PROBE])
  try:
    yield {k: v for k, v in params.items() if k != PROBE}
  finally:
    _PROBE.reset(token)


@contextlib.contextmanager
def unprobed() -> Iterator[None]:
  """Within, FP8 GEMMs are not counted: inside another custom VJP (the routed experts' `expert_mixture`), whose
  rule cannot pass a cotangent to the closed-over probe."""
  token = _PROBE.set(None)
  try:
    yield
  finally:
    _PROBE.reset(token)


def with_probe(params: dict) -> dict:
  """params plus a zero probe [saturated, flushed, elements]: differentiate the loss with respect to it."""
  return {**params, PROBE: jnp.zeros((3,), jnp.float32)}


def stats(grads: dict) -> tuple[dict, dict[str, jax.Array]]:
  """(grads without the probe, {"fp8_overflow", "fp8_underflow"}: fractions of the FP8 operands' elements that
  saturated E4M3 and that were flushed to zero). Ratios, so any common scaling of the gradients cancels."""
  g = grads[PROBE]
  total = jnp.maximum(g[2], 1.0)
  return {k: v for k, v in grads.items() if k != PROBE}, {"fp8_overflow": g[0] / total, "fp8_underflow": g[1] / total}


def _counts(x: jax.Array, scaling: str, layout: str) -> jax.Array:
  """[saturated, flushed, elements] of x [M, K] quantised to E4M3 as the GEMMs do: per tensor, or per 1x128 tile
  along K ("rows", activations and the dgrad's dy) or per 128x128 block ("blocks", weights)."""
  m, k = x.shape
  up = lambda d: -(-d // fp8_quant.TILE) * fp8_quant.TILE  # noqa: E731
  x = jnp.pad(x.astype(jnp.float32), ((0, up(m) - m), (0, up(k) - k)))
  if scaling == "tensorwise":
    q, s = fp8_quant.quantize_tensor(x, E4M3, lhs=True)
    s = s[0, 0]
  elif layout == "rows":
    q, s = fp8_quant.quantize_rows(x, E4M3)
    s = jnp.repeat(s, fp8_quant.TILE, axis=1)
  else:
    q, s = fp8_quant.quantize_blocks(x, E4M3)
    s = jnp.repeat(s, fp8_quant.TILE, axis=0)
  saturated = jnp.sum(jnp.abs(x) > s * float(jnp.finfo(E4M3).max))
  flushed = jnp.sum((x != 0) & (q.astype(jnp.float32) == 0))
  return jnp.stack([saturated, flushed, m * k]).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _probe_matmul(scaling, backend, x, w, probe):
  del probe
  return fp8_matmul(x, w, scaling=scaling, backend=backend)


def _probe_fwd(scaling, backend, x, w, probe):
  return _probe_matmul(scaling, backend, x, w, probe), (x, w)


def _probe_bwd(scaling, backend, res, dy):
  x, w = res
  _, vjp = jax.vjp(lambda a, b: fp8_matmul(a, b, scaling=scaling, backend=backend), x, w)
  dx, dw = vjp(dy)
  counts = _counts(x, scaling, "rows") + _counts(w, scaling, "blocks") + _counts(dy, scaling, "rows")
  return dx, dw, counts


_probe_matmul.defvjp(_probe_fwd, _probe_bwd)


def _probed_matmul(scaling, backend, x, w):
  probe = _PROBE.get()
  if probe is not None:
    return _probe_matmul(scaling, backend, x, w, probe)
  return fp8_matmul(x, w, scaling=scaling, backend=backend)


def train_grads(cfg: ModelConfig, params: dict, step: jax.Array, grads_fn) -> tuple[dict, dict]:
  """(metrics, grads) = grads_fn(params) under the config's policy, with the FP8 statistics in the metrics;
  with `fp8_from_step` = N > 0, steps before N run in the compute dtype (statistics 0) and the rest in FP8, so a
  checkpoint of the first phase continues in FP8 (both branches are compiled, each step runs one)."""
  pol = policy(cfg)
  if pol is None:
    return grads_fn(params)

  def in_fp8():
    with strategy.update(matmul=pol):
      metrics, grads = grads_fn(with_probe(params))
    grads, fp8_stats = stats(grads)
    return {**metrics, **fp8_stats}, grads

  if not cfg.numerics.fp8_from_step:
    return in_fp8()

  def in_compute_dtype():
    metrics, grads = grads_fn(params)
    zero = jnp.zeros((), jnp.float32)
    return {**metrics, "fp8_overflow": zero, "fp8_underflow": zero}, grads

  return jax.lax.cond(step >= cfg.numerics.fp8_from_step, in_fp8, in_compute_dtype)
