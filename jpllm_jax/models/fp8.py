"""The matmul policy of the dense projections: the compute dtype, or FP8 GEMMs (`kernels_pallas.fp8_gemm`).

Every projection of the models calls `layers.matmul(eq, x, w, name=...)`; under an FP8 `Policy` (entered by the
train step through `strategy.use`, built by `policy(cfg)` from `numerics.matmul` and `numerics.fp8_exclude`) the
einsum is reshaped to 2-D (or batched, for stacked experts) `fp8_matmul`s:

  fp8_tensorwise  one FP32 scale per tensor from its current amax (Transformer Engine's current scaling).
  fp8_delayed     one FP32 scale per tensor from the largest amax of its last `fp8_amax_history` steps (Transformer
                  Engine's DelayedScaling with amax_compute_algo="max", margin 0; flax's fp8_ops): x, w and the
                  output cotangent dy of every call site each have a history (`init_history`).
  fp8_blockwise   DeepSeek-V3 (arXiv:2412.19437 section 3.3): activations per 1x128 tile, weights per 128x128
                  block, FP32 accumulation promoted every 128 elements of K; dgrad and wgrad in FP8 too.

`name` says what a projection is (NAMES); names in the exclusion list keep the compute dtype. The policy's
statistics: inside `probing(params)` every FP8 GEMM adds, to the gradient of a probe in the params, the counts of
elements of its operands and output cotangent that saturate E4M3 (|x / s| beyond 448) and that are flushed to zero
(x != 0 rounding to 0) out of all elements; `stats(grads)` turns them into the logged fractions. The gradient is
the side channel because it reaches every call, in scanned layers and switch branches alike. The routed experts'
GEMMs run inside their own custom VJP (moe/ops.py `expert_mixture`) and are not counted.

Delayed scaling uses the same side channel for its amaxes (flax's "overwrite with gradient"). The histories live
in the train state (`state["fp8"]`, not in the optimizer's params): a tree of [*stack, H, 3] FP32 arrays (amaxes
of x, w, dy; row 0 the newest) beside the kernels of the projections that `layers.dense` runs, merged into the
params for the step (`merge`), so a scanned stack's histories are scanned with its layers. Each call scales by the
rows' maxima and gives its history, as its "gradient", this step's amaxes in row 0 (zeros elsewhere); the step
rolls them in (`roll`); micro-batches combine by their maximum (`accumulate`), skipped steps keep the old ones.
An empty history (all 0: the first FP8 step, also after `fp8_from_step`, whose BF16 steps leave the histories
empty) falls back to the current amax. Calls without a history use current per-tensor scaling: the routed experts
(inside their own VJP), and the head and router if they are taken out of `fp8_exclude`; the histories of
excluded projections stay empty.
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
HISTORY = "fp8_amax_history"  # the key of a projection's amax history, beside its "kernel" (fp8_delayed)
SCALING = {"fp8_tensorwise": "tensorwise", "fp8_delayed": "tensorwise", "fp8_blockwise": "blockwise"}
NO_HISTORY = ("lm_head", "router")  # kernels that `layers.matmul` reads directly (no `layers.dense`, no history)


@dataclasses.dataclass(frozen=True)
class Policy:
  """An FP8 recipe for the projections not in `exclude`; `backend` is the fp8_gemm backend (None: by platform);
  `delayed`: tensorwise scales from the call sites' amax histories where they have one."""
  scaling: str  # "tensorwise" | "blockwise"
  exclude: frozenset[str] = frozenset({"embed", "lm_head", "router"})
  backend: str | None = None
  delayed: bool = False

  def applies(self, name: str) -> bool:
    return name not in self.exclude


def policy(cfg: ModelConfig, backend: str | None = None) -> Policy | None:
  """The config's policy (None for `matmul='default'`)."""
  kind = cfg.numerics.matmul
  if kind == "default":
    return None
  unknown = cfg.numerics.fp8_excluded - set(NAMES)
  if unknown:
    raise ValueError(f"fp8_exclude names {sorted(unknown)} are not projection names {NAMES}")
  return Policy(SCALING[kind], cfg.numerics.fp8_excluded, backend, delayed=kind == "fp8_delayed")


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


def einsum(pol: Policy, eq: str, x: jax.Array, w: jax.Array, history: jax.Array | None = None) -> jax.Array:
  """`jnp.einsum(eq, x, w)` as FP8 GEMMs: x -> [B, M, K], w -> [B, K, N] (B: indices in x, w and the output,
  e.g. the experts of "eck,ekn->ecn"), one `fp8_matmul` per B (vmapped), then back to the output's layout.
  `history` [H, 3]: the call site's amax history, used under a delayed policy (a projection without B)."""
  lhs, rhs, out, batch, contract, free_x, free_w = _parse(eq)
  history = history if pol.delayed else None
  if history is not None and (batch or history.ndim != 2 or history.shape[1] != 3):
    raise ValueError(f"an amax history [H, 3] belongs to one GEMM: {eq!r} with history {history.shape}")
  size = {**dict(zip(lhs, x.shape)), **dict(zip(rhs, w.shape))}
  prod = lambda idx: math.prod(size[c] for c in idx)  # noqa: E731
  x3 = jnp.transpose(x, [lhs.index(c) for c in batch + free_x + contract]).reshape(
      prod(batch), prod(free_x), prod(contract))
  w3 = jnp.transpose(w, [rhs.index(c) for c in batch + contract + free_w]).reshape(
      prod(batch), prod(contract), prod(free_w))
  mm = functools.partial(_tapped_matmul, pol.scaling, pol.backend, history=history)
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


def _counts(x: jax.Array, scaling: str, layout: str, amax: jax.Array | None = None) -> jax.Array:
  """[saturated, flushed, elements] of x [M, K] quantised to E4M3 as the GEMMs do: per tensor (by its amax or the
  given delayed `amax`), or per 1x128 tile along K ("rows", activations and the dgrad's dy) or per 128x128 block
  ("blocks", weights)."""
  m, k = x.shape
  up = lambda d: -(-d // fp8_quant.TILE) * fp8_quant.TILE  # noqa: E731
  x = jnp.pad(x.astype(jnp.float32), ((0, up(m) - m), (0, up(k) - k)))
  if scaling == "tensorwise":
    q, s = fp8_quant.quantize_tensor(x, E4M3, lhs=True, amax=amax)
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


def _delayed_amax(history: jax.Array | None) -> tuple[jax.Array, ...] | None:
  """The amaxes (x, w, dy) a call scales by: their maxima over the history (0: none yet, so the current one)."""
  return None if history is None else tuple(jnp.max(history, axis=0))


def _gemm(scaling, backend, history):
  return lambda x, w: fp8_matmul(x, w, scaling=scaling, backend=backend, amax=_delayed_amax(history))


def _tapped_matmul(scaling, backend, x, w, *, history=None):
  """`fp8_matmul`, delayed if `history` is given, with its statistics and amaxes passed out as gradients."""
  probe = _PROBE.get()
  if probe is None and history is None:
    return _gemm(scaling, backend, None)(x, w)
  return _tap(scaling, backend, x, w, history, probe)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tap(scaling, backend, x, w, history, probe):
  del probe
  return _gemm(scaling, backend, history)(x, w)


def _tap_fwd(scaling, backend, x, w, history, probe):
  return _tap(scaling, backend, x, w, history, probe), (x, w, history, probe)


def _tap_bwd(scaling, backend, res, dy):
  """dx and dw of the FP8 GEMM; the history's cotangent: this step's amaxes of x, w, dy in row 0; the probe's:
  the counts of saturated and flushed elements of x, w and dy as the GEMMs quantised them."""
  x, w, history, probe = res
  dx, dw = jax.vjp(_gemm(scaling, backend, history), x, w)[1](dy)
  d_history = counts = None
  if history is not None:
    d_history = jnp.zeros_like(history).at[0].set(jnp.stack([fp8_quant.tensor_amax(t) for t in (x, w, dy)]))
  if probe is not None:
    ax, aw, ady = _delayed_amax(history) or (None, None, None)
    counts = _counts(x, scaling, "rows", ax) + _counts(w, scaling, "blocks", aw) + _counts(dy, scaling, "rows", ady)
  return dx, dw, d_history, counts


_tap.defvjp(_tap_fwd, _tap_bwd)


# ------------------------------------------------------------------------------------------ amax histories
def _is_history(path) -> bool:
  return bool(path) and getattr(path[-1], "key", None) == HISTORY


def init_history(cfg: ModelConfig, shapes: dict, axes: dict) -> dict | None:
  """Zero amax histories (fp8_delayed; None otherwise) in a tree of the params' nesting: {HISTORY: [*stack, H, 3]}
  beside each "kernel" of the param `shapes` that `layers.dense` runs, `stack` the kernel's leading `layers` axes
  (`axes`: the params' logical axes), so that a scanned stack's histories are scanned with it."""
  if cfg.numerics.matmul != "fp8_delayed":
    return None
  out: dict = {}
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple))
  for (path, shape), ax in zip(jax.tree_util.tree_leaves_with_path(shapes), flat_axes, strict=True):
    keys = [p.key for p in path]
    if keys[-1] != "kernel" or set(keys) & set(NO_HISTORY):
      continue
    n_stack = next((i for i, a in enumerate(ax) if a != "layers"), len(ax))
    site = functools.reduce(lambda d, k: d.setdefault(k, {}), keys[:-1], out)
    site[HISTORY] = jnp.zeros((*shape.shape[:n_stack], cfg.numerics.fp8_amax_history, 3), jnp.float32)
  return out


def merge(params: dict, history: dict) -> dict:
  """params with each amax history beside its kernel: what the model reads under a delayed policy."""
  out = dict(params)
  for k, v in history.items():
    out[k] = v if k == HISTORY else merge(params[k], v)
  return out


def split(grads: dict) -> tuple[dict, dict]:
  """(grads without the histories' cotangents, those cotangents in the histories' tree)."""
  rest, hist = {}, {}
  for k, v in grads.items():
    if k == HISTORY:
      hist[k] = v
    elif isinstance(v, dict):
      rest[k], sub = split(v)
      if sub:
        hist[k] = sub
    else:
      rest[k] = v
  return rest, hist


def roll(history: dict, d_history: dict) -> dict:
  """The histories one step on: each shifted by one row, this step's amaxes (row 0 of its cotangent) in row 0."""
  return jax.tree.map(lambda h, d: jnp.concatenate([d[..., :1, :], h[..., :-1, :]], axis=-2), history, d_history)


def accumulate(acc: dict, grads: dict) -> dict:
  """acc + grads over micro-batches; the amax histories' cotangents combine by their maximum instead."""
  return jax.tree_util.tree_map_with_path(lambda p, a, g: jnp.maximum(a, g) if _is_history(p) else a + g,
                                          acc, grads)


def divide(grads: dict, denom: jax.Array) -> dict:
  """grads / denom (a token count), except the amax histories' cotangents (amaxes, not sums)."""
  return jax.tree_util.tree_map_with_path(lambda p, g: g if _is_history(p) else g / denom, grads)


def train_grads(cfg: ModelConfig, params: dict, step: jax.Array, grads_fn, history: dict | None = None
                ) -> tuple[dict, dict, dict | None]:
  """(metrics, grads, history) from (metrics, grads) = grads_fn(params) under the config's policy, with the FP8
  statistics in the metrics and, for fp8_delayed, the amax `history` (`init_history`) used and rolled on.
  With `fp8_from_step` = N > 0, steps before N run in the compute dtype (statistics 0, the histories left as they
  are: empty at N, whose FP8 step scales by current amaxes) and the rest in FP8, so a checkpoint of the first
  phase continues in FP8 (both branches are compiled, each step runs one)."""
  pol = policy(cfg)
  if pol is None:
    return (*grads_fn(params), history)
  if pol.delayed and history is None:
    raise ValueError("matmul='fp8_delayed' needs the amax histories of the train state (state['fp8'])")

  def in_fp8():
    with strategy.update(matmul=pol):
      metrics, grads = grads_fn(with_probe(params if history is None else merge(params, history)))
    grads, fp8_stats = stats(grads)
    new_history = None
    if history is not None:
      grads, d_history = split(grads)
      new_history = roll(history, d_history)
    return {**metrics, **fp8_stats}, grads, new_history

  if not cfg.numerics.fp8_from_step:
    return in_fp8()

  def in_compute_dtype():
    metrics, grads = grads_fn(params)
    zero = jnp.zeros((), jnp.float32)
    return {**metrics, "fp8_overflow": zero, "fp8_underflow": zero}, grads, history

  return jax.lax.cond(step >= cfg.numerics.fp8_from_step, in_fp8, in_compute_dtype)
