"""Ahead-of-time pre-flight: compile the real sharded train step for a TPU topology that is not attached.

With libtpu installed, `jax.experimental.topologies.get_topology_desc(topology_name="v5p:8x8x8", platform="tpu")`
gives deviceless TPU devices on a CPU machine; `make_train_step(...).lower(*ShapeDtypeStructs).compile()` is the
partitioned program XLA would run there, and its `memory_analysis()` is the out-of-memory the run would hit.
Targets without a deviceless compiler here (NVIDIA GPUs, A64FX) go through `memory_model` instead.

The caller's process must allow the TPU platform (JAX_PLATFORMS='' or 'cpu,tpu'); tests run this in a subprocess.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jpllm_jax import models
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.moe import tuning
from jpllm_jax.parallel import make_mesh
from jpllm_jax.parallel.mesh import check_model_fits_mesh, mesh_shape, with_rule_overrides
from jpllm_jax.train import flops as flops_lib
from jpllm_jax.train.optimizer import make_optimizer
from jpllm_jax.train.step import BATCH_KEYS, StepConfig, init_state, make_train_step

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: memory, dense bf16 peak and memory bandwidth, from the vendor's published figures."""
  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  source: str


# Google Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): HBM per chip,
# peak bf16 FLOP/s and HBM bandwidth. H100 SXM: NVIDIA H100 datasheet (dense bf16, no sparsity). A64FX: Fujitsu
# A64FX datasheet, 48 cores at 2.0 GHz (Fugaku's normal mode), FP32 (the chip has no bf16 matmul), HBM2.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("h100", 80 * GiB, 989e12, 3.35e12, "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
    "a64fx": Chip("a64fx", 32 * GiB, 6.144e12, 1024e9, "Fujitsu A64FX datasheet (FP32, 2.0 GHz)"),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed --topology: "v5p:8x8x8" (compiled with libtpu), "h100x8" or "a64fxx16" (analytic)."""
  chip: Chip
  devices: int
  name: str

  @property
  def compiled(self) -> bool:
    return self.chip.name in ("v4", "v5e", "v5p", "v6e")


def parse_topology(name: str, hbm_gib: float | None = None) -> Target:
  """The target `name`; `hbm_gib` budgets that much memory per chip instead of its HBM (what is left beside
  other work on the chip, or a small budget that makes a quick compile a does-not-fit case in tests)."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)", name)
  n = re.fullmatch(r"(h100|a64fx)(?:x(\d+))?", name)
  if not (m or n):
    raise ValueError(f"unknown topology {name!r}: use v4|v5e|v5p|v6e:AxBxC (e.g. v5p:8x8x8) or h100xN / a64fxxN")
  chip = CHIPS[(m or n).group(1)]
  if hbm_gib is not None:
    chip = dataclasses.replace(chip, hbm_bytes=int(hbm_gib * GiB))
  if m:
    return Target(chip, math.prod(int(d) for d in m.group(2).split("x")), name)
  return Target(chip, int(n.group(2) or 1), name)


@functools.lru_cache(maxsize=8)
def topology_devices(name: str) -> tuple[Any, ...]:
  """The deviceless TPU devices of `name` (needs libtpu and a process that allows the TPU platform)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return tuple(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one compile is of: the model, the global batch, the mesh and its rules."""
  cfg: ModelConfig
  batch_size: int
  seq_len: int
  micro_batches: int = 1
  mesh: tuple[tuple[str, int], ...] = (("data", 1), ("fsdp", -1))
  rules: str = ""
  moe_impl: str = ""  # moe_ffn's implementation on the TPU ("": what "auto" picks there, tuning.IMPL_BY_BACKEND)

  def flags(self) -> str:
    """The launcher flags that select this plan."""
    parts = [f"--config.model.remat={self.cfg.numerics.remat}", f"--config.train.batch_size={self.batch_size}",
             f"--config.train.micro_batches={self.micro_batches}"]
    parts += [f"--config.mesh.{a}={n}" for a, n in self.mesh]
    if self.rules:
      parts.append(f"--config.mesh.rules={self.rules}")
    return " ".join(parts)


def _optimizer(cfg: ModelConfig):
  return make_optimizer(1e-4, 2000, 100_000, kinds=models.transformer.param_kinds(cfg))


def lower(plan: Plan, devices) -> Any:
  """The train step of `plan` lowered for `devices`, every input a ShapeDtypeStruct (no memory)."""
  mesh = make_mesh(dict(plan.mesh), devices=list(devices))
  rules = with_rule_overrides(plan.rules or None)
  check_model_fits_mesh(plan.cfg, mesh, rules)
  tx, schedule = _optimizer(plan.cfg)
  state = jax.eval_shape(functools.partial(init_state, plan.cfg, tx), jax.random.key(0))
  shape = (plan.batch_size, plan.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32) for k in BATCH_KEYS}
  # This host's backend is not the target's: "auto" MoE is traced as the TPU would pick it.
  with tuning.use_impl(plan.moe_impl or tuning.IMPL_BY_BACKEND.get("tpu", tuning.DEFAULT_IMPL)):
    step = make_train_step(plan.cfg, tx, schedule, StepConfig(micro_batches=plan.micro_batches), mesh, rules)
    return step.lower(state, batch)


def _recompute(cfg: ModelConfig) -> float:
  """Executed over model FLOPs: a fully recomputed forward adds a third; partial policies recompute less."""
  return {"none": 1.0, "full": 4 / 3}.get(cfg.numerics.remat, 1.1)


def analyse(plan: Plan, target: Target, memory: dict[str, float], xla_flops: float,
            bytes_per_device: float) -> dict[str, Any]:
  """Per-device breakdown, roofline step time and MFU ceiling of a compiled (or modelled) step.

  The verdict is on `peak` when the memory holds it: XLA's heap-simulated peak of the program (the arguments and
  the temporaries live together at its worst point), which is what libtpu checks against HBM. Run with
  LIBTPU_INIT_ARGS=--xla_tpu_max_hbm_size_mib=N, the 2-layer dense twin (1024 x 64 tokens, peak 246 MiB, allocation
  323 MiB) compiles at N=280 and is refused at N=200 ("HLO temporaries (250.83M)"): temp_size is
  the allocation's size, which holds more than is ever live (reported as `allocated_bytes`). The analytic model
  estimates the peak.

  XLA's cost analysis counts a while loop's body once (the scanned layers, the loss chunks), so the roofline
  takes the larger of its FLOPs and the model FLOPs times the recomputation of the remat policy."""
  chip = target.chip
  allocated = memory["arguments"] + memory["temporaries"] + memory["outputs"] - memory.get("aliased", 0) \
      + memory.get("generated_code", 0)
  total = memory.get("peak") or allocated
  model_flops = flops_lib.train_flops_per_token(plan.cfg, plan.seq_len) * plan.batch_size * plan.seq_len
  model_flops /= target.devices
  flops = max(xla_flops, model_flops * _recompute(plan.cfg))
  step_s = max(flops / chip.peak_flops, bytes_per_device / chip.hbm_bandwidth)
  return {"per_device_bytes": int(total), "allocated_bytes": int(allocated), "hbm_bytes": int(chip.hbm_bytes),
          "fits": bool(total <= chip.hbm_bytes), **{f"{k}_bytes": int(v) for k, v in memory.items()},
          "flops_per_step": float(flops), "xla_flops_per_step": float(xla_flops),
          "bytes_accessed": float(bytes_per_device), "model_flops_per_step": float(model_flops),
          "step_time_s": float(step_s), "mfu_ceiling": float(min(model_flops / chip.peak_flops / step_s, 1.0))}


def compile_plan(plan: Plan, target: Target) -> dict[str, Any]:
  """Compiles `plan` for the TPU `target` and reads XLA's per-device memory and cost analyses."""
  t0 = time.perf_counter()
  try:
    compiled = lower(plan, topology_devices(target.name)).compile()
  except jax.errors.JaxRuntimeError as e:  # libtpu refuses a program that exceeds HBM, naming what it needs.
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not m:
      raise
    need = float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1)
    memory = {"arguments": 0, "temporaries": need, "outputs": 0, "aliased": 0, "peak": need}
    out = analyse(plan, target, memory, 0.0, 0.0)
    out.update(fits=False, compile_s=round(time.perf_counter() - t0, 1), oom=str(e).splitlines()[0][:300])
    return out
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
            "generated_code": m.generated_code_size_in_bytes}
  if peak := getattr(m, "peak_memory_in_bytes", 0):
    memory["peak"] = peak
  out = analyse(plan, target, memory, cost.get("flops", 0.0), cost.get("bytes accessed", 0.0))
  out["compile_s"] = round(time.perf_counter() - t0, 1)
  return out


def model_plan(plan: Plan, target: Target) -> dict[str, Any]:
  """The analytic estimate (`memory_model`) in the same form as `compile_plan`."""
  from jpllm_jax.train import memory_model  # pylint: disable=import-outside-toplevel
  est = memory_model.estimate(plan.cfg, plan.batch_size, plan.seq_len, plan.micro_batches,
                              dict(plan.mesh), target.devices, plan.rules)
  return analyse(plan, target, est, 0.0, est["hbm_traffic"])


def candidates(plan: Plan, devices: int) -> list[Plan]:
  """Plans to try when `plan` does not fit, cheapest first: more recomputation, then micro-batches (smaller
  activations at the same global batch), then parameters sharded over more devices or over tensor."""
  out = []
  for remat in ("save_dots", "save_dots_no_batch", "save_qkv_proj", "full"):
    if remat != plan.cfg.numerics.remat:
      out.append(dataclasses.replace(plan, cfg=plan.cfg.replace(remat=remat)))
  full = dataclasses.replace(plan, cfg=plan.cfg.replace(remat="full"))
  mesh = dict(full.mesh)
  shape = mesh_shape(mesh, devices)
  per_device = full.batch_size // math.prod(shape[a] for a in ("data", "fsdp", "expert"))
  mb = 2
  while mb <= per_device and full.batch_size % mb == 0:
    out.append(dataclasses.replace(full, micro_batches=mb))
    mb *= 2
  base = out[-1] if out[-1].micro_batches > 1 else full  # the most micro-batches, then wider parameter shards.
  if shape["data"] != 1:
    out.append(dataclasses.replace(base, mesh=tuple({**mesh, "data": 1, "fsdp": -1}.items())))
  for tp in (2, 4, 8):
    if devices % tp == 0 and tp > shape["tensor"]:
      out.append(dataclasses.replace(base, mesh=tuple({**mesh, "data": 1, "fsdp": -1, "tensor": tp}.items())))
  return out


def run(plan: Plan, target: Target, log: Callable[[str], None] = print, max_compiles: int = 8) -> dict[str, Any]:
  """Checks `plan` on `target`; when it does not fit, tries `candidates` until one fits (at most `max_compiles`
  compiles in all). The result holds the first plan's numbers and `suggestion`: the flags that fit, or why none."""
  check = compile_plan if target.compiled else model_plan
  kind = "compile" if target.compiled else "model"

  def attempt(i: int, p: Plan) -> dict[str, Any] | None:
    t0 = time.perf_counter()
    try:
      r = check(p, target)
    except ValueError as e:  # the model does not divide the mesh: not a candidate.
      log(f"[preflight] {kind} {i}: {p.flags()} -> skipped: {e}")
      return None
    log(f"[preflight] {kind} {i}: {p.flags()} -> {r['per_device_bytes'] / GiB:.2f} GiB of "
        f"{r['hbm_bytes'] / GiB:.0f} GiB, {'fits' if r['fits'] else 'does not fit'} "
        f"({time.perf_counter() - t0:.1f} s)")
    return r

  result = attempt(1, plan)
  if result is None:
    raise ValueError(f"{plan.flags()} does not divide the model on {target.name}")
  result.update(topology=target.name, chip=target.chip.name, devices=target.devices, flags=plan.flags(),
                method="xla_compile" if target.compiled else "analytic")
  if plan.cfg.moe.n_experts and target.compiled:
    result["moe_impl"] = plan.moe_impl or tuning.IMPL_BY_BACKEND.get("tpu", tuning.DEFAULT_IMPL)
  if result["fits"]:
    result["suggestion"] = plan.flags()
    return result
  tried = 1
  for p in candidates(plan, target.devices):
    if tried >= max_compiles:
      break
    tried += 1
    r = attempt(tried, p)
    if r is not None and r["fits"]:
      result["suggestion"] = p.flags()
      result["suggestion_per_device_bytes"] = r["per_device_bytes"]
      return result
  result["suggestion"] = (f"nothing tried fits {target.name} ({tried} {kind}s: remat, micro-batches, fsdp/tensor); "
                          f"use more chips or pipeline stages")
  return result
