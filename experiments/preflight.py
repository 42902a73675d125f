r"""Pre-flight: will this preset's train step fit the target, and how fast can it be? Compiled, not run.

  python -m experiments.preflight --preset=llama2-70b --topology=v5p:4x4x4
  python -m experiments.preflight --preset=llm-jp-3-172b --topology=v5p:8x8x16 --config.model.remat=full
  python -m experiments.preflight --preset=swallow-llama2-70b --topology=h100x8 --config.train.batch_size=8
  python -m experiments.preflight --preset=mixtral-8x7b --topology=v5p:4x4x2 --moe_impl=pallas

TPU topologies (v4|v5e|v5p|v6e:AxBxC) compile the real sharded `make_train_step` with libtpu and no TPU attached
(jpllm_jax/train/preflight.py); h100xN and a64fxxN use the analytic model (jpllm_jax/train/memory_model.py).
Prints a progress line per compile, the per-device breakdown, the verdict, and a JSON line (`--output` too)
with `fits`, `per_device_bytes`, `hbm_bytes`, `flops_per_step`, `mfu_ceiling` and `suggestion`: the flags that
fit, searched over remat policies, micro-batches and fsdp/tensor sizes when the given ones do not.
The train preset (experiments/configs/presets.py) gives the run's batch, sequence and mesh; flags override it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app, flags
from ml_collections import config_dict, config_flags

from experiments.configs import presets as train_presets
from jpllm_jax.train import config as run_config

_FLAG_CONFIG = run_config.defaults()


def _model_overrides() -> dict:
  """Every scalar ModelConfig field (flat names) as a placeholder: only the given ones change the preset, e.g. the
  vocabulary padded to divide the tensor axis (Megatron pads to 128 x TP), a capacity factor for dropping MoE
  layers, fewer layers for a quick compile. Compute in bf16 with fp32 masters unless told otherwise."""
  from jpllm_jax.models import config as model_config  # pylint: disable=import-outside-toplevel
  types = {}
  for cls in (model_config.ModelConfig, *model_config.GROUPS.values()):
    for f in dataclasses.fields(cls):
      kind = None if "tuple" in str(f.type) else next(
          (t for t in (bool, int, float, str) if t.__name__ in str(f.type)), None)
      types.setdefault(f.name, kind)
  names = {k: model_config.FLAT.get(k, (None, k))[1] for k in model_config.KEYS - set(model_config.GROUPS)}
  out = {k: config_dict.placeholder(types[n]) for k, n in sorted(names.items()) if types.get(n)}
  return {**out, "remat": "none", "dtype": "bfloat16", "param_dtype": "float32"}


_FLAG_CONFIG.model = _model_overrides()
config_flags.DEFINE_config_dict("config", _FLAG_CONFIG, "Overrides of the preset's run config (mesh, model, train).")
flags.DEFINE_string("preset", None, "A models.PRESETS name.", required=True)
flags.DEFINE_string("topology", "v5p:2x2x1", "v5p:8x8x8-style TPU topology, or h100x8 / a64fxx16 (analytic).")
flags.DEFINE_bool("twin", False, "The preset's scaled-down twin (models/presets.py): a fast compile, for tests.")
flags.DEFINE_integer("max_compiles", 8, "At most this many compiles (the given plan and the search).")
flags.DEFINE_string("output", None, "Also write the JSON result here.")
flags.DEFINE_float("hbm_gib", None, "Budget this much memory per chip instead of its HBM (e.g. what other work "
                   "leaves; tests use a tiny budget for a quick does-not-fit).")
flags.DEFINE_enum("moe_impl", "", ["", "ragged", "pallas"], "MoE presets on TPU: XLA's ragged_dot or the Pallas "
                  "(Mosaic) grouped matmul; default: what moe_ffn's auto picks on TPU (moe/tuning.py).")
FLAGS = flags.FLAGS


def plan_from_flags():
  from jpllm_jax import models  # pylint: disable=import-outside-toplevel
  from jpllm_jax.models.presets import twin  # pylint: disable=import-outside-toplevel
  from jpllm_jax.train import preflight  # pylint: disable=import-outside-toplevel
  target = preflight.parse_topology(FLAGS.topology, FLAGS.hbm_gib)
  config = train_presets.get_config(FLAGS.preset, target.devices)
  model = {"dtype": "bfloat16", "param_dtype": "float32"}
  with config.unlocked():
    for key, value in config_flags.get_override_values(FLAGS["config"]).items():  # "train.batch_size": 8
      section, _, name = key.partition(".")
      if section == "model":
        model[name] = value
      else:
        config[section][name] = value
  cfg = models.preset(FLAGS.preset)
  cfg = (twin(cfg) if FLAGS.twin else cfg).replace(**model)
  mesh = tuple((a, n) for a, n in config.mesh.to_dict().items() if a != "rules" and n != 1)
  seq_len = min(config.data.seq_len, cfg.max_seq_len) if FLAGS.twin else config.data.seq_len
  plan = preflight.Plan(cfg, config.train.batch_size, seq_len, config.train.micro_batches,
                        mesh or (("data", -1),), config.mesh.rules, FLAGS.moe_impl)
  return plan, target


def main(argv):
  del argv
  from jpllm_jax.train import preflight  # pylint: disable=import-outside-toplevel
  plan, target = plan_from_flags()
  if target.compiled and os.environ.get("JAX_PLATFORMS") == "cpu":
    sys.exit("error: JAX_PLATFORMS=cpu hides the TPU compiler; run with JAX_PLATFORMS='' (or 'cpu,tpu')")
  if plan.moe_impl == "pallas" and plan.cfg.moe.n_experts and dict(plan.mesh).get("expert", 1) == 1:
    sys.exit("error: --moe_impl=pallas needs --config.mesh.expert > 1: Mosaic kernels are not partitioned "
             "automatically, only inside the expert layer's shard_map")
  print(f"[preflight] {FLAGS.preset} on {target.name} ({target.devices} x {target.chip.name}, "
        f"{'XLA compile' if target.compiled else 'analytic model'}): {plan.flags()}", flush=True)
  log = lambda line: print(line, flush=True)
  r = preflight.run(plan, target, log=log, max_compiles=FLAGS.max_compiles)
  gib = lambda k: r[k] / preflight.GiB
  print(f"per device: arguments {gib('arguments_bytes'):.2f} GiB, temporaries {gib('temporaries_bytes'):.2f} GiB, "
        f"outputs {gib('outputs_bytes'):.2f} GiB (aliased {gib('aliased_bytes'):.2f}), generated code "
        f"{r.get('generated_code_bytes', 0) / 2**20:.1f} MiB; peak {gib('per_device_bytes'):.2f} of "
        f"{gib('hbm_bytes'):.0f} GiB HBM (allocated {gib('allocated_bytes'):.2f})")
  print(f"FLOPs/step/device {r['flops_per_step']:.3e} (XLA {r['xla_flops_per_step']:.3e}, model "
        f"{r['model_flops_per_step']:.3e}), bytes accessed {r['bytes_accessed']:.3e}; roofline step "
        f"{r['step_time_s'] * 1e3:.1f} ms, MFU ceiling {r['mfu_ceiling']:.2f} ({target.chip.source})")
  print(f"verdict: {'fits' if r['fits'] else 'does not fit'}; suggestion: {r['suggestion']}")
  line = json.dumps({"preset": FLAGS.preset, **r}, sort_keys=True)
  print(line, flush=True)
  if FLAGS.output:
    with open(FLAGS.output, "w", encoding="utf-8") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  # libtpu probes for a TPU host otherwise; these say "one local host" (no metadata server is asked).
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  # A deviceless compile holds no chip: a second pre-flight (or a test) may load libtpu at the same time.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  app.run(main)
