"""Device meshes, the default logical-to-mesh rules table, and multi-host start-up.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded parameters and optimizer
state), `tensor` (Megatron-style tensor parallel), `expert` (shards the experts of MoE layers, and the
batch with data and fsdp: parallel/expert.py), and `stage` (pipeline stages: parallel/pipeline.py, the
stacked `layers` in blocks). A size of -1 takes the devices left over.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding

from jpllm_jax.models import stacks
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.parallel.logical import Rules, logical_to_spec

MESH_AXES = ("data", "stage", "fsdp", "expert", "tensor")

# MaxText-style defaults: batch over data+fsdp+expert, weights' embed dim over fsdp, heads/mlp/vocab over tensor,
# the experts of MoE weights over expert.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    # MLA's low-rank dims (q_a/q_b, kv_a/kv_b): the contraction dim of the up-projections, sharded like `embed`
    # (without these, q_b and kv_b, 12 of DeepSeek-V3's 15 GiB of weights per device at expert 64 x fsdp 32,
    # were replicated over fsdp).
    ("q_lora", "fsdp"),
    ("kv_lora", "fsdp"),
    ("vocab", "tensor"),
    ("layers", "stage"),  # stacked layers in contiguous blocks over the pipeline stages.
    ("expert", "expert"),  # E of the expert weights (parallel/expert.py).
)


def with_rule_overrides(overrides: str | Mapping[str, object] | None, rules: Rules = DEFAULT_RULES) -> Rules:
  """`rules` with some logical axes mapped elsewhere: `"mlp=tensor,batch=data+fsdp,vocab="` (`+` joins mesh
  axes, an empty value replicates) or a mapping {logical axis: mesh axis, tuple of them, or None}."""
  if not overrides:
    return tuple(rules)
  if isinstance(overrides, str):
    pairs = []
    for part in filter(None, (p.strip() for p in overrides.split(","))):
      name, eq, value = part.partition("=")
      if not eq:
        raise ValueError(f"mesh rule {part!r} is not logical_axis=mesh_axis[+mesh_axis...]")
      pairs.append((name.strip(), tuple(a.strip() for a in value.split("+") if a.strip()) or None))
  else:
    pairs = [(k, (v,) if isinstance(v, str) else (tuple(v) if v else None)) for k, v in overrides.items()]
  table = dict(rules)
  for name, axes in pairs:
    if name not in table:
      raise ValueError(f"unknown logical axis {name!r} in the mesh rules; known: {sorted(table)}")
    unknown = [a for a in axes or () if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"unknown mesh axes {unknown} in the rule for {name!r}; use {MESH_AXES}")
    table[name] = None if axes is None else (axes[0] if len(axes) == 1 else axes)
  return tuple(table.items())


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """How many ways the batch is split: the product of the mesh axes the `batch` rule maps to."""
  axes = dict(rules).get("batch") or ()
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves one -1 entry and checks that the axis sizes multiply to the device count."""
  unknown = [a for a in sizes if a not in MESH_AXES]
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; use {MESH_AXES}")
  shape = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
  free = [a for a, n in shape.items() if n == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free}")
  known = math.prod(n for n in shape.values() if n != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes' product "
                       f"{known}; change the mesh sizes")
    shape[free[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"mesh {shape} has {math.prod(shape.values())} devices but {num_devices} are available; "
                     f"set the sizes so that their product is {num_devices} (or use -1 for one axis)")
  return shape


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
  """A mesh over all (global) devices; the physical layout puts `tensor` on the fastest links."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(sizes, len(devices))
  dims = tuple(shape[a] for a in MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(dims)
  return Mesh(grid, MESH_AXES)


def check_model_fits_mesh(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
  """Fails at start-up, naming what to change, when a sharded dimension does not divide its mesh axes."""
  table = dict(rules)
  dims = [("heads", cfg.attention.n_heads), ("kv_heads", cfg.attention.num_heads_kv), ("vocab", cfg.vocab_size),
          ("embed", cfg.d_model)]  # layers over `stage`: train.step.pipeline_schedule checks them.
  if any(not s.moe for s in stacks.stacks(cfg)):  # a stack with the dense MLP
    dims.append(("mlp", cfg.d_ff))
  if cfg.moe.n_experts:  # the experts' width, the shared experts' width and the expert count.
    dims += [("mlp", cfg.expert_d_ff), ("mlp", cfg.moe.n_shared_experts * cfg.expert_d_ff),
             ("expert", cfg.moe.n_experts)]
  if cfg.attention.kind == "mla":
    dims += [("q_lora", cfg.attention.q_lora_rank), ("kv_lora", cfg.attention.kv_lora_rank)]
  for name, size in dims:
    axes = table.get(name)
    if axes is None or not size:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    n = math.prod(mesh.shape[a] for a in axes)
    if size % n:
      hint = " (pad the vocabulary to a multiple of it)" if name == "vocab" else ""
      raise ValueError(f"model dimension {name}={size} is not divisible by mesh axes {axes} of total size {n}"
                       f"{hint}; change the model or the mesh")


def shardings(axes_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """`NamedSharding` for every leaf of a tree of logical axes tuples."""
  return jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)), axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None,
                           local_device_ids=None) -> None:
  """Starts multi-host JAX (`jax.distributed.initialize`); on CPU the collectives use gloo.

  With no coordinator this is a no-op for a single process; on TPU pods and Slurm/Open MPI GPU clusters
  JAX can discover the arguments itself (pass `coordinator="auto"`).
  """
  if coordinator is None:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU client reads it.
  if coordinator == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
