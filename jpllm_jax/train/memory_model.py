"""Analytic per-device memory of a train step, for targets with no deviceless compiler here (GPUs, A64FX).

The same breakdown as XLA's `memory_analysis()` (preflight.py), built from parts that are exact or traced:
- parameters (fp32 masters), Adam's two moments and the batch: each leaf's shard under the mesh rules;
- activations: the residuals autodiff saves for the backward pass under the config's remat policy, read off
  the traced loss of one device's micro-batch (`jax.ad_checkpoint` saved residuals; no memory is allocated),
  divided by the tensor axis, times the micro-batches a pipeline stage holds in flight (1F1B: the stage count),
  plus one layer's backward working set (its residuals without remat: recomputed intermediates and cotangents);
- gradients: one fp32 shard, a second one for the update being formed, and the accumulator with micro-batches.
Against XLA's TPU compile of a dense plan it stays within 15% (tests/test_preflight.py: 2.5% under); what it
leaves out is XLA's own scheduling: buffers it keeps live longer or frees earlier, fusion temporaries, generated
code, and for MoE layers the dispatch's sort and gather buffers (the Mixtral twin: 0.43 of the compile).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax._src.ad_checkpoint import saved_residuals  # what `jax.ad_checkpoint.print_saved_residuals` prints.

from jpllm_jax import models
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.models.transformer import param_kinds
from jpllm_jax.parallel.logical import logical_to_spec
from jpllm_jax.parallel.mesh import mesh_shape, with_rule_overrides
from jpllm_jax.train import step as step_lib


def _shard_bytes(shape, dtype, axes, rules, sizes: Mapping[str, int]) -> float:
  spec = logical_to_spec(axes, rules)
  ways = 1
  for entry in spec:
    for a in (entry,) if isinstance(entry, str) else (entry or ()):
      ways *= sizes[a]
  return math.prod(shape) * jnp.dtype(dtype).itemsize / ways


def state_bytes(cfg: ModelConfig, sizes: Mapping[str, int], rules) -> tuple[float, float]:
  """(parameter bytes, Adam moment bytes) per device: fp32 masters, two moments for every trained leaf."""
  shapes, axes, kinds = models.param_shapes(cfg), models.param_axes(cfg), param_kinds(cfg)
  is_axes = lambda x: isinstance(x, tuple)
  flat_axes = jax.tree.leaves(axes, is_leaf=is_axes)
  params = opt = 0.0
  for s, a, k in zip(jax.tree.leaves(shapes), flat_axes, jax.tree.leaves(kinds)):
    b = _shard_bytes(s.shape, cfg.numerics.param_dtype, a, rules, sizes)
    params += b
    opt += 0.0 if k == "router_bias" else 2 * b * 4 / jnp.dtype(cfg.numerics.param_dtype).itemsize
  return params, opt


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, loss_chunk: int = step_lib.LOSS_CHUNK) -> float:
  """Bytes of the residuals the backward pass keeps for a [batch, seq_len] micro-batch on one device (the
  parameters themselves are arguments, not counted)."""
  params = models.param_shapes(cfg)
  b = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.float32 if k == "weights" else jnp.int32)
       for k in step_lib.BATCH_KEYS}
  loss = lambda p, x: step_lib._loss_sums(cfg, p, x, 1e-4, loss_chunk)[0]  # pylint: disable=protected-access
  return float(sum(math.prod(a.shape) * a.dtype.itemsize for a, where in saved_residuals(loss, params, b)
                   if not where.startswith("from the argument")))


def estimate(cfg: ModelConfig, batch_size: int, seq_len: int, micro_batches: int, mesh: Mapping[str, int],
             devices: int, rules: str = "") -> dict[str, float]:
  """Per-device bytes in `memory_analysis()`'s terms (arguments, temporaries, outputs, aliased) and a rough
  HBM traffic per step (state read and written, activations written and read, weights gathered)."""
  sizes = mesh_shape(mesh, devices)
  table = with_rule_overrides(rules or None)
  batch_axes = dict(table).get("batch") or ()
  dp = math.prod(sizes[a] for a in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes))
  local = max(1, batch_size // dp // micro_batches)
  params, opt = state_bytes(cfg, sizes, table)
  stages = sizes.get("stage", 1)
  in_flight = min(micro_batches, stages) if stages > 1 else 1
  acts = activation_bytes(cfg, local, seq_len) / sizes["tensor"] / stages * in_flight
  # The backward of one layer holds that layer's intermediates (recomputed under remat) and their cotangents
  # beside the saved residuals: one layer's residuals without remat.
  layer = activation_bytes(cfg.replace(remat="none"), local, seq_len) / cfg.n_layers / sizes["tensor"]
  grads = params * 4 / jnp.dtype(cfg.numerics.param_dtype).itemsize
  accum = grads if micro_batches > 1 else 0.0
  batch_bytes = len(step_lib.BATCH_KEYS) * batch_size / dp * seq_len * 4
  state = params + opt
  weights_bf16 = params / 2 * sizes["fsdp"] / stages  # gathered over fsdp, once forward and once backward.
  return {"arguments": state + batch_bytes, "temporaries": acts + layer + 2 * grads + accum,
          "outputs": state, "aliased": state, "activations": acts, "layer_backward": layer,
          "hbm_traffic": 3 * state + 2 * acts * micro_batches + 2 * weights_bf16 * micro_batches}
