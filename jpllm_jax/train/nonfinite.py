"""Where a non-finite value first appears in a training step: layer, sub-layer, pass, devices, batch row.

The guard (train/step.py) skips a step whose loss or gradients are not finite and names the first non-finite
gradient leaf, which says little: every gradient upstream of an overflow is NaN. `jax_debug_nans` does not see
inside `shard_map` (jax #26796, #25643). `locate` re-runs the step's forward and backward on its batch piece by
piece (the embedding, each layer of each stack, final norm + head + loss; one `jax.vjp` per piece, remat off),
under a `Strategy.probe` that checks finiteness at every sub-layer boundary the model marks with
`models.strategy.probe` (norms, attention, MLP activation, MLP/MoE output, residual; inside the expert-parallel
`shard_map` each device reports its own tokens). The first site is the first piece, in forward order, whose
forward holds a non-finite value (its earliest probe), else the first piece, in backward order, whose cotangents
or parameter gradients do. Not covered: the MoE auxiliary losses' and MTP's own gradient paths.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jpllm_jax import models
from jpllm_jax.models import layers, strategy
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.parallel import axis_rules, logical_to_spec
from jpllm_jax.parallel.logical import Rules

BTD = ("batch", "length", "embed")
STACKS = ("layers", "layers_moe")


@dataclasses.dataclass
class _Hit:
  seq: int  # the probe's position in its piece's program (trace order).
  name: str
  kind: str  # "nan" or "inf"
  devices: list[int]
  batch_index: int | None


class _Recorder:
  """The probe of the checking run: every probe becomes an identity whose forward value and backward cotangent
  are summarised in the program (per-axis "any non-finite" vectors, so nothing large leaves the devices) and
  recorded by a host callback when non-finite."""

  def __init__(self, mesh: Mesh, rules: Rules):
    self.mesh, self.rules = mesh, rules
    self.phase = "forward"  # which callbacks count: a backward's recomputed forward does not.
    self.hits: list[_Hit] = []
    self.names: dict[int, str] = {}  # probe position -> name, in trace order.
    self._seq = 0

  def probe(self, name: str, x, axes):
    seq, self._seq = self._seq, self._seq + 1
    self.names[seq] = name
    manual = tuple(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()) or ())

    def report(kind, v):
      bad = ~jnp.isfinite(v)
      marginals = [jnp.any(bad, axis=tuple(j for j in range(v.ndim) if j != i)) for i in range(v.ndim)]
      coords = [jax.lax.axis_index(a) for a in manual]
      jax.debug.callback(lambda *a: self._record(kind, seq, name, axes, manual, v.shape, *a),
                         jnp.any(bad), jnp.any(jnp.isnan(v)), marginals, coords)

    @jax.custom_vjp
    def identity(x):  # run when not differentiated; `fwd` when differentiated.
      report("forward", x)
      return x

    def fwd(x):
      report("forward", x)
      return x, None

    def bwd(_, g):
      report("backward", g)
      return (g,)

    identity.defvjp(fwd, bwd)
    return identity(x)

  def _record(self, phase, seq, name, axes, manual, shape, any_bad, any_nan, marginals, coords):
    if phase != self.phase or not bool(any_bad):
      return
    marginals = [np.asarray(m) for m in marginals]
    batch = None
    if manual:  # inside a shard_map: this device (and the devices along the axes it does not map).
      where = dict(zip(manual, (int(c) for c in coords)))
      sel = tuple(where.get(a, slice(None)) for a in self.mesh.axis_names)
      devices = sorted(int(d.id) for d in np.ravel(self.mesh.devices[sel]))
    else:
      spec = logical_to_spec(axes, self.rules) if axes else jax.sharding.PartitionSpec()
      index = NamedSharding(self.mesh, spec).devices_indices_map(tuple(shape))
      devices = sorted(d.id for d, idx in index.items()
                       if all(m[s].any() for m, s in zip(marginals, idx)))
      if axes and axes[0] == "batch":
        batch = int(np.argmax(marginals[0]))
    self.hits.append(_Hit(seq, name, "nan" if bool(any_nan) else "inf", devices, batch))


def _bad_leaf(tree) -> tuple[str, list[int]] | None:
  """The first leaf of `tree` holding a non-finite value, and the devices whose shards hold one."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not bool(jnp.all(jnp.isfinite(leaf))):
      devices = sorted(s.device.id for s in leaf.addressable_shards if not np.isfinite(np.asarray(s.data)).all())
      return jax.tree_util.keystr(path), devices
  return None


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def locate(cfg: ModelConfig, params, batch: dict[str, jax.Array], *, mesh: Mesh, rules: Rules, z_loss: float,
           micro_batches: int = 1, loss_chunk: int = 512) -> dict[str, Any] | None:
  """The first non-finite site of one train step's forward and backward on `batch` (see the module docstring):
  {"pass", "stack", "layer" (index in the model, dense layers first), "sublayer", "value" (nan/inf),
  "devices", "batch_index" (row of the global batch, where the site has a batch axis)}; None when the step is
  finite this time (a fault that did not reproduce)."""
  cfg = cfg.replace(remat="none")  # one forward per piece: the backward's recompute would re-run the probes.
  rec = _Recorder(mesh, rules)
  shared = {k: v for k, v in params.items() if k not in STACKS}
  stacks = [(s, int(jax.tree.leaves(params[s])[0].shape[0])) for s in STACKS if s in params]

  def embed_fn(sh, b):
    return strategy.probe("embed", models.embed(cfg, sh, b["inputs"], b["positions"]), BTD)

  def layer_fn(p, x, b):
    ctx = models.context(cfg, b["inputs"], b["positions"], b["segment_ids"])
    return models.run_stack(cfg, p, x, ctx, with_stats=False)[0]

  def head_fn(sh, x, b):
    x = strategy.probe("final_norm", layers.norm(cfg, sh["final_norm"], x), BTD)
    w, layout = models.head(cfg, sh, x.dtype)
    if loss_chunk:  # the fused head + loss: one site.
      total, m = models.fused_cross_entropy(x, w, layout, b["targets"], b["weights"], z_loss=z_loss,
                                            chunk_tokens=loss_chunk)
      return strategy.probe("head+loss", total * m["tokens"])
    logits = strategy.probe("head", jnp.einsum(f"btd,{layout}->btv", x, w, preferred_element_type=jnp.float32),
                            ("batch", "length", "vocab"))
    total, m = models.cross_entropy(logits, b["targets"], b["weights"], z_loss=z_loss)
    return strategy.probe("loss", total * m["tokens"])

  fwd = {"embed": jax.jit(embed_fn), "layer": jax.jit(layer_fn), "head": jax.jit(head_fn)}
  bwd = {"embed": jax.jit(lambda sh, b, g: jax.vjp(lambda s: embed_fn(s, b), sh)[1](g)[0]),
         "layer": jax.jit(lambda p, x, b, g: jax.vjp(lambda p, x: layer_fn(p, x, b), p, x)[1](g)),
         "head": jax.jit(lambda sh, x, b: jax.grad(head_fn, argnums=(0, 1))(sh, x, b))}
  layer_params = lambda s, i: jax.tree.map(lambda a: a[i:i + 1], params[s])

  def found(piece, stack, layer, phase, grads=None):
    """The site of this piece if it holds one (the same verdict on every process), else None."""
    jax.effects_barrier()
    bad = _bad_leaf(grads) if grads is not None else None
    if not _any_process(bool(rec.hits) or bad is not None):
      return None
    site = {"pass": phase, "piece": piece, "stack": stack, "layer": layer}
    if rec.hits and phase == "forward":  # the earliest probe of the piece holding one.
      hit = min(rec.hits, key=lambda h: h.seq)
      return {**site, "sublayer": hit.name, "value": hit.kind, "devices": hit.devices,
              "batch_index": hit.batch_index}
    if rec.hits:  # the latest probe (the backward runs in reverse): the sub-layer after it made the value.
      hit = max(rec.hits, key=lambda h: h.seq)
      return {**site, "sublayer": rec.names.get(hit.seq + 1, hit.name), "gradient_at": hit.name,
              "value": hit.kind, "devices": hit.devices, "batch_index": hit.batch_index}
    if bad is not None:
      return {**site, "sublayer": f"gradient of {bad[0]}", "value": "nan/inf", "devices": bad[1],
              "batch_index": None}
    return {**site, "sublayer": "(on another process)", "value": "?", "devices": [], "batch_index": None}

  M = micro_batches
  with axis_rules(mesh, rules), strategy.use(dataclasses.replace(strategy.current(), probe=rec.probe)):
    for mb in range(M):
      b = {k: v.reshape(M, v.shape[0] // M, *v.shape[1:])[mb] for k, v in batch.items()}
      offset = mb * (batch["inputs"].shape[0] // M)
      rec.phase, rec.hits = "forward", []
      x = fwd["embed"](shared, b)
      site = found("embed", None, None, "forward")
      inputs, depth = [], 0
      for s, n in stacks:
        for i in range(n):
          if site is None:
            inputs.append((s, i, depth, x))
            x = fwd["layer"](layer_params(s, i), x, b)
            site = found("layer", s, depth, "forward")
          depth += 1
      if site is None:
        fwd["head"](shared, x, b)
        site = found("head", None, None, "forward")
      if site is None:
        rec.phase = "backward"
        g_shared, g = bwd["head"](shared, x, b)
        site = found("head", None, None, "backward", g_shared)
        for s, i, d, x_in in reversed(inputs):
          if site is not None:
            break
          g_p, g = bwd["layer"](layer_params(s, i), x_in, b, g)
          site = found("layer", s, d, "backward", g_p)
        if site is None:
          site = found("embed", None, None, "backward", bwd["embed"](shared, b, g))
      if site is not None:
        if site["batch_index"] is not None:
          site["batch_index"] += offset
        site["micro_batch"] = mb
        return site
  return None


def describe(site: dict[str, Any]) -> str:
  """One line: "first nan in the forward pass at layer 1 (layers), mlp.activation, devices [0], batch row 0"."""
  where = f"layer {site['layer']} ({site['stack']})" if site["layer"] is not None else site["piece"]
  sub = site["sublayer"] + (f" (the gradient at its input {site['gradient_at']})" if "gradient_at" in site else "")
  row = "" if site["batch_index"] is None else f", batch row {site['batch_index']}"
  return f"first {site['value']} in the {site['pass']} pass at {where}, {sub}, devices {site['devices']}{row}"


def report(cfg: ModelConfig, params, batch, step: int, workdir: pathlib.Path, **kwargs) -> dict[str, Any]:
  """Runs `locate` for bad step `step` (1-based, as logged) with `params`, the state after step `step` + 1 (the
  guard checks a step while the next one runs; the bad step's own params exactly when that one was skipped too),
  logs the site and writes `<workdir>/nonfinite_step<step>.json`; returns the report ({"step", "site", "params"})."""
  site = locate(cfg, params, batch, **kwargs)
  out = {"step": step, "site": site, "params": f"after step {step + 1}"}
  if site is None:
    logging.warning("step %d: the non-finite value did not reproduce in the checking run", step)
  else:
    logging.warning("step %d: %s", step, describe(site))
  if jax.process_index() == 0:
    (workdir / f"nonfinite_step{step}.json").write_text(json.dumps(out, indent=1) + "\n")
  return out


POLICIES = ("skip", "rollback", "stop")


class NonFiniteStep(RuntimeError):
  """A step was not finite and `train.on_nonfinite=stop`; the message names the first site."""


class OnNonFinite:
  """The loop's answer to a non-finite step (`train.on_nonfinite`): the first one of a launch is located
  (`report`); then `skip` goes on (the guard has left the state as it was), `stop` raises `NonFiniteStep`, and
  `rollback` asks the loop to reload the last good checkpoint and continue past the offending batches."""

  def __init__(self, policy: str, cfg: ModelConfig, workdir: pathlib.Path, **locate_kwargs):
    if policy not in POLICIES:
      raise ValueError(f"train.on_nonfinite={policy!r}; use one of {POLICIES}")
    self.policy, self.cfg, self.workdir, self.kwargs = policy, cfg, workdir, locate_kwargs
    self.located, self.rollbacks = False, 0

  def __call__(self, step: int, metrics, batch, params) -> bool:
    """After step `step` (0-based) with its metrics and batch; `params` are those the next step started from
    (a skipped step leaves them as they were). Returns whether the loop must roll back."""
    if not int(metrics["nonfinite"]):
      return False
    site, path = None, self.workdir / f"nonfinite_step{step + 1}.json"
    if not self.located:
      self.located = True
      site = report(self.cfg, params, batch, step + 1, self.workdir, **self.kwargs)["site"]
    if self.policy == "stop":
      what = describe(site) if site else "it did not reproduce in the checking run"
      raise NonFiniteStep(f"step {step + 1} is not finite: {what}; report: {path}")
    return self.policy == "rollback"
