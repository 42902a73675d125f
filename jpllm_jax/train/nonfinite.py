"""Where a non-finite value first appears in a training step: layer, sub-layer, pass, devices, batch row.

The guard (train/step.py) skips a step whose loss or gradients are not finite and names the first non-finite
gradient leaf, which says little: every gradient upstream of an overflow is NaN. `jax_debug_nans` does not see
inside `shard_map` (jax #26796, #25643). `rerun` re-runs the step's forward and backward on its batch piece by
piece (the embedding, each layer of each stack with its MoE balance and router z-loss terms, final norm + head +
loss, the MTP blocks and their loss; one `jax.vjp` per piece, remat off), so that it computes the step's loss
term for term, under a `Strategy.probe` that checks finiteness at every sub-layer boundary the model marks with
`models.strategy.probe` (norms, attention, MLP activation, MLP/MoE output, residual; inside the expert-parallel
`shard_map` each device reports its own rows). The first site is the first piece, in forward order, whose
forward holds a non-finite value (its earliest probe), else the first piece, in backward order, whose cotangents
or parameter gradients do.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
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
from jpllm_jax.train import step as step_lib

BTD = ("batch", "length", "embed")


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
    self.names: dict[int, tuple[str, int]] = {}  # probe position -> (name, trace), in trace order.
    self._seq, self._trace = 0, 0

  def new_trace(self) -> None:
    """A piece's function is being traced: its probes are numbered as one program."""
    self._trace += 1

  def next_name(self, seq: int) -> str:
    """The name of the probe after `seq` in its program (its own name if it is the last)."""
    after = self.names.get(seq + 1)
    return after[0] if after and after[1] == self.names[seq][1] else self.names[seq][0]

  def depth(self, seq: int) -> int:
    """How many probes of the same name precede `seq` in its program: the depth of an MTP block's probe."""
    return sum(1 for s, key in self.names.items() if s < seq and key == self.names[seq])

  def probe(self, name: str, x, axes):
    seq, self._seq = self._seq, self._seq + 1
    self.names[seq] = (name, self._trace)
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


class _Pieces:
  """The train step's loss (train/step.py `_loss_sums`) cut into jitted pieces, each with its backward: the
  embedding, one layer of a stack (with its MoE balance and router z-loss terms), the final norm + head + loss,
  and the MTP blocks with their losses (and MoE terms). The terms are sums over the micro-batch (per-token means
  times its loss tokens, as `_loss_sums`); `total` weighs them into the step's loss sum."""

  def __init__(self, cfg: ModelConfig, z_loss: float, loss_chunk: int, mtp_loss_coef: float, on_trace):
    self.cfg, self.z_loss, self.loss_chunk, self.mtp_loss_coef = cfg, z_loss, loss_chunk, mtp_loss_coef
    self.on_trace = on_trace  # called as each piece's function is traced (the recorder numbers its probes).
    one = jnp.ones((), jnp.float32)
    self.fwd = {"embed": jax.jit(self.embed), "layer": jax.jit(self.layer), "head": jax.jit(self.head),
                "mtp": jax.jit(self.mtp)}
    self.bwd = {
        "embed": jax.jit(lambda sh, b, g: jax.vjp(lambda s: self.embed(s, b), sh)[1](g)[0]),
        "layer": jax.jit(lambda p, x, b, g: jax.vjp(lambda p, x: self._layer_total(p, x, b), p, x)[1]((g, one))),
        "head": jax.jit(lambda sh, x, b: jax.grad(lambda s, x: self.total(self.head(s, x, b)), (0, 1))(sh, x)),
        "mtp": jax.jit(lambda sh, x, b: jax.grad(lambda s, x: self.total(self.mtp(s, x, b)), (0, 1))(sh, x))}

  def total(self, terms: dict[str, jax.Array]) -> jax.Array:
    weights = {"ce": 1.0, "z_loss": self.z_loss, "moe_loss": 1.0, "mtp_loss": self.mtp_loss_coef}
    return sum((weights[k] * v for k, v in terms.items()), jnp.zeros((), jnp.float32))

  def embed(self, sh, b):
    self.on_trace()
    return strategy.probe("embed", models.embed(self.cfg, sh, b["inputs"], b["positions"]), BTD)

  def _moe_terms(self, stats, b) -> dict[str, jax.Array]:
    """The routed layers' share of `hidden`'s moe_aux_loss + router_z_loss (means over all routed layers)."""
    if stats is None:
      return {}
    moe_cfg, n = self.cfg.moe, jnp.sum(b["weights"].astype(jnp.float32))
    per_layer = moe_cfg.moe_aux_loss_coef * stats["balance_loss"] + moe_cfg.router_z_loss_coef * stats["z_loss"]
    return {"moe_loss": n * jnp.sum(per_layer) / self.cfg.n_routed_layers}

  def layer(self, p, x, b):
    self.on_trace()
    ctx = models.context(self.cfg, b["inputs"], b["positions"], b["segment_ids"])
    x, stats = models.run_stack(self.cfg, p, x, ctx, with_stats=True)
    return x, self._moe_terms(stats, b)

  def _layer_total(self, p, x, b):
    x, terms = self.layer(p, x, b)
    return x, self.total(terms)

  def _ce(self, sh, x, targets, weights, z_loss: float, prefix: str = ""):
    """(ce sum, z-loss sum, tokens) of the head on final-normed x, probed as one site (fused) or two."""
    w, layout = models.head(self.cfg, sh, x.dtype)
    if self.loss_chunk:
      _, m = models.fused_cross_entropy(x, w, layout, targets, weights, z_loss=z_loss, chunk_tokens=self.loss_chunk)
    else:
      logits = strategy.probe(prefix + "head", jnp.einsum(f"btd,{layout}->btv", x, w,
                                                          preferred_element_type=jnp.float32),
                              ("batch", "length", "vocab"))
      _, m = models.cross_entropy(logits, targets, weights, z_loss=z_loss)
    ce, zl = strategy.probe(prefix + ("head+loss" if self.loss_chunk else "loss"), jnp.stack([m["ce"], m["z_loss"]]))
    return ce * m["tokens"], zl * m["tokens"], m["tokens"]

  def head(self, sh, x, b):
    self.on_trace()
    x = strategy.probe("final_norm", layers.norm(self.cfg, sh["final_norm"], x), BTD)
    ce, zl, _ = self._ce(sh, x, b["targets"], b["weights"], self.z_loss)
    return {"ce": ce, "z_loss": zl}

  def mtp(self, sh, x, b):
    """The MTP blocks on the last layer's output x and their loss, mtp_loss = tokens x the mean over depths of
    each depth's cross-entropy (a per-token mean over its own targets)."""
    self.on_trace()
    ctx = models.context(self.cfg, b["inputs"], b["positions"], b["segment_ids"])
    hid, stats = models.mtp_hidden(self.cfg, sh, b["inputs"], x, ctx)
    ce = []
    for k in range(self.cfg.mtp.depth):
      targets = step_lib._mtp_targets(b, k)  # pylint: disable=protected-access
      ce_sum, _, n_k = self._ce(sh, hid[k], *targets, 0.0, prefix="mtp.")
      ce.append(ce_sum / jnp.maximum(n_k, 1.0))
    return {"mtp_loss": jnp.sum(b["weights"].astype(jnp.float32)) * jnp.mean(jnp.stack(ce)),
            **self._moe_terms(stats, b)}


@dataclasses.dataclass
class Rerun:
  """The checking run's verdict: the first non-finite `site` (None: none), and `loss`, the step's loss terms as
  the rerun computed them ("loss", "ce", "z_loss", and "moe_loss" / "mtp_loss" where the model has them; per-token
  means as the step logs them), or None where it stopped at a site before the end."""
  site: dict[str, Any] | None
  loss: dict[str, float] | None


def locate(cfg: ModelConfig, params, batch: dict[str, jax.Array], **kwargs) -> dict[str, Any] | None:
  """The first non-finite site of one train step's forward and backward on `batch` (`rerun(...).site`):
  {"pass", "stack", "layer" (index in the model, dense layers first; in `mtp`, the depth), "sublayer", "value"
  (nan/inf), "devices", "batch_index" (row of the global batch, where the site has a batch axis)}; None when the
  step is finite this time (a fault that did not reproduce)."""
  return rerun(cfg, params, batch, **kwargs).site


def rerun(cfg: ModelConfig, params, batch: dict[str, jax.Array], *, mesh: Mesh, rules: Rules, z_loss: float,
          micro_batches: int = 1, loss_chunk: int = 512, mtp_loss_coef: float = 0.0) -> Rerun:
  """Re-runs one train step's forward and backward on `batch` piece by piece under the finiteness probes (see the
  module docstring); the step's settings as in `train.step.StepConfig`."""
  cfg = cfg.replace(remat="none")  # one forward per piece: the backward's recompute would re-run the probes.
  rec = _Recorder(mesh, rules)
  pieces = _Pieces(cfg, z_loss, loss_chunk, mtp_loss_coef, rec.new_trace)
  sums: dict[str, float] = collections.defaultdict(float)
  M = micro_batches
  with axis_rules(mesh, rules), strategy.use(dataclasses.replace(strategy.current(), probe=rec.probe)):
    for mb in range(M):
      b = {k: v.reshape(M, v.shape[0] // M, *v.shape[1:])[mb] for k, v in batch.items()}
      site = _micro_batch(pieces, rec, params, b, sums)
      if site is not None:
        if site["batch_index"] is not None:
          site["batch_index"] += mb * (batch["inputs"].shape[0] // M)
        site["micro_batch"] = mb
        return Rerun(site, None)
  tokens = max(float(jnp.sum(batch["weights"].astype(jnp.float32))), 1.0)
  loss = {k: v / tokens for k, v in sums.items()}
  return Rerun(None, {"loss": float(pieces.total(loss)), **loss})


def _micro_batch(pieces: _Pieces, rec: _Recorder, params, b, sums: dict[str, float]) -> dict[str, Any] | None:
  """One micro-batch's pieces, forward then backward, until the first that holds a non-finite value (its site);
  adds the loss terms to `sums`."""
  main = models.stacks.main_stacks(pieces.cfg)
  shared = {k: v for k, v in params.items() if k not in {s.name for s in main}}
  stacks = [(s.name, s.n) for s in main]
  found = functools.partial(_found, rec)
  layer_params = lambda s, i: jax.tree.map(lambda a: a[i:i + 1], params[s])  # noqa: E731
  fwd, bwd, mtp = pieces.fwd, pieces.bwd, bool(pieces.cfg.mtp.depth)

  def add(terms):
    for k, v in terms.items():
      sums[k] += float(v)

  rec.phase, rec.hits = "forward", []
  x = fwd["embed"](shared, b)
  if site := found("embed", None, None, "forward"):
    return site
  inputs, depth = [], 0
  for s, n in stacks:
    for i in range(n):
      inputs.append((s, i, depth, x))
      x, terms = fwd["layer"](layer_params(s, i), x, b)
      if site := found("layer", s, depth, "forward"):
        return site
      add(terms)
      depth += 1
  for piece, run in (("head", True), ("mtp", mtp)):
    if run:
      terms = fwd[piece](shared, x, b)
      if site := found(piece, "mtp" if piece == "mtp" else None, None, "forward"):
        return site
      add(terms)

  rec.phase = "backward"
  g_shared, g = bwd["head"](shared, x, b)
  if site := found("head", None, None, "backward", g_shared):
    return site
  if mtp:
    g_shared, g_mtp = bwd["mtp"](shared, x, b)
    if site := found("mtp", "mtp", None, "backward", g_shared):
      return site
    g = g + g_mtp
  for s, i, d, x_in in reversed(inputs):
    g_p, g = bwd["layer"](layer_params(s, i), x_in, b, g)
    if site := found("layer", s, d, "backward", g_p):
      return site
  return found("embed", None, None, "backward", bwd["embed"](shared, b, g))


def _found(rec: _Recorder, piece: str, stack: str | None, layer: int | None, phase: str, grads=None):
  """The site of the piece just run if it holds one (the same verdict on every process), else None. Within the
  MTP piece, `layer` is the depth of the site's block or loss."""
  jax.effects_barrier()
  bad = _bad_leaf(grads) if grads is not None else None
  if not _any_process(bool(rec.hits) or bad is not None):
    rec.hits = []
    return None
  site = {"pass": phase, "piece": piece, "stack": stack, "layer": layer}
  if rec.hits:  # forward: the earliest probe holding one; backward (in reverse): the latest, and the sub-layer
    seq = (min if phase == "forward" else max)(h.seq for h in rec.hits)  # after it made the value.
    hits = [h for h in rec.hits if h.seq == seq]  # inside a shard_map: one hit per device.
    rows = [h.batch_index for h in hits if h.batch_index is not None]
    site.update(sublayer=hits[0].name, value="nan" if any(h.kind == "nan" for h in hits) else "inf",
                devices=sorted({d for h in hits for d in h.devices}), batch_index=min(rows) if rows else None)
    if phase == "backward":
      site.update(sublayer=rec.next_name(seq), gradient_at=hits[0].name)
    if piece == "mtp":
      site["layer"] = rec.depth(seq)
    return site
  if bad is not None:
    return {**site, "sublayer": f"gradient of {bad[0]}", "value": "nan/inf", "devices": bad[1], "batch_index": None}
  return {**site, "sublayer": "(on another process)", "value": "?", "devices": [], "batch_index": None}


def describe(site: dict[str, Any]) -> str:
  """One line: "first nan in the forward pass at layer 1 (layers), mlp.activation, devices [0], batch row 0"."""
  where = f"layer {site['layer']} ({site['stack']})" if site["layer"] is not None else site["piece"]
  sub = site["sublayer"] + (f" (the gradient at its input {site['gradient_at']})" if "gradient_at" in site else "")
  row = "" if site["batch_index"] is None else f", batch row {site['batch_index']}"
  return f"first {site['value']} in the {site['pass']} pass at {where}, {sub}, devices {site['devices']}{row}"


def report(cfg: ModelConfig, params, batch, step: int, workdir: pathlib.Path, **kwargs) -> dict[str, Any]:
  """Runs `locate` for bad step `step` (1-based, as logged) with `params`, the state after step `step` + 1 (the
  guard checks a step while the next one runs; the bad step's own params exactly when that one was skipped too),
  logs the site and writes `<workdir>/nonfinite_step<step>.json`; returns the report ({"step", "site", "params",
  "loss": the rerun's loss terms, see `Rerun`})."""
  site, loss = dataclasses.astuple(rerun(cfg, params, batch, **kwargs))
  out = {"step": step, "site": site, "params": f"after step {step + 1}", "loss": loss}
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
