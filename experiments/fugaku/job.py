r"""Writes a Fugaku job for a layout: the memory check, the rank map from the topology mapper, and job.sh.

  python -m experiments.fugaku.job --out=/tmp/fugaku-job                       # Fugaku-LLM 13B, 13,824 nodes
  python -m experiments.fugaku.job --out=DIR --procs_per_node=4 --shape=12x2x12x2x3x2   # one process per CMG
  pjsub DIR/job.sh                                                               # on a Fugaku login node

1. Memory: the analytic model (jpllm_jax/train/memory_model.py, as experiments.preflight's a64fx target) of the
   config's train step per process, times the processes per node, against --node_gib (32 GiB of HBM2 per
   A64FX node, 8 GiB per CMG). Over the budget: exit 1 before anything is written (--force writes anyway).
2. Placement: map_axes puts tensor innermost on the tightest links (the CMGs of a node, then Tofu-D's b, c, a),
   then pipeline, then data on the long X/Y/Z rings (parallel/topology.py); DIR/rankmap is its Fujitsu MPI rank
   map (`(x,y,z)` per rank in the 3D shape pjsub is given) and DIR/ranks.txt our 6D/7D rank file.
3. DIR/job.sh from job.sh.in: node shape, processes and processes per node, one process per CMG bound with
   numactl (or one per node with memory interleaved), threads per process from the A64FX profile, and
   experiments.fugaku.launch starting jax.distributed under the scheduler.
The last line printed is JSON: per-process and per-node GiB, the budget, fits, and the files.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from jpllm_jax import cpu
from jpllm_jax.parallel import topology as T

flags.DEFINE_string("out", None, "Directory for job.sh, rankmap and ranks.txt.")
flags.DEFINE_string("config", "experiments/fugaku/fugaku_llm_13b.py", "The run config (a get_config() file).")
flags.DEFINE_string("shape", None, "Tofu-D job shape XxYxZx2x3x2 (default 24x2x24x2x3x2, or 12x2x12x2x3x2 with "
                    "4 processes per node: 13,824 processes either way).")
flags.DEFINE_integer("procs_per_node", 1, "1 (one process per node, 48 threads, as Fugaku-LLM) or 4 (per CMG).")
flags.DEFINE_float("node_gib", 32.0, "Memory per node in GiB (A64FX: 32 GiB HBM2).")
flags.DEFINE_bool("force", False, "Write the job even if the memory model says it does not fit.")
flags.DEFINE_string("rscgrp", "large", "pjsub resource group.")
flags.DEFINE_string("elapse", "24:00:00", "pjsub elapse limit.")
flags.DEFINE_string("group", "GROUP", "pjsub -g group (your project).")
flags.DEFINE_string("gfscache", "/vol0004", "PJM_LLIO_GFSCACHE: the data volume the job reads.")
flags.DEFINE_string("venv", "$HOME/jpllm-venv", "The aarch64 Python 3.11 virtual environment on the nodes.")
flags.DEFINE_string("workdir", "$HOME/runs/fugaku-llm-13b", "--workdir of the run.")
flags.DEFINE_string("rendezvous", "$HOME/.jpllm-rendezvous", "Shared directory for the coordinator address.")
flags.DEFINE_integer("numa_base", 4, "NUMA node of CMG 0 on a compute node (Fugaku: 4..7; see numactl -H).")
FLAGS = flags.FLAGS
GiB = 2**30
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "job.sh.in")


def load_config(path: str):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("fugaku_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def mesh_of(config) -> dict[str, int]:
  return {k: int(v) for k, v in config.mesh.items() if k != "rules" and int(v) != 1}


def layout_of(mesh: dict[str, int]) -> dict[str, int]:
  """Our mesh as the mapper's logical axes: tensor -> tp, stage -> pp, the rest (data, fsdp) -> dp."""
  dp = 1
  for k, v in mesh.items():
    if k not in ("tensor", "stage"):
      dp *= v
  return {"tp": mesh.get("tensor", 1), "pp": mesh.get("stage", 1), "dp": dp}


def memory_check(config, procs_per_node: int, node_gib: float) -> dict:
  """Per-process bytes of the train step by the analytic model, and whether procs_per_node of them fit."""
  from jpllm_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from jpllm_jax.train import memory_model  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig.from_dict(config.model.to_dict())
  mesh = mesh_of(config)
  devices = 1
  for v in mesh.values():
    devices *= v
  m = memory_model.estimate(cfg, config.train.batch_size, config.data.seq_len, config.train.micro_batches, mesh,
                            devices, config.mesh.rules)
  per_proc = m["arguments"] + m["temporaries"] + m["outputs"] - m["aliased"]
  per_node = per_proc * procs_per_node
  return dict(processes=devices, per_process_gib=round(per_proc / GiB, 2), per_node_gib=round(per_node / GiB, 2),
              node_gib=node_gib, fits=per_node <= node_gib * GiB,
              breakdown_gib={k: round(v / GiB, 2) for k, v in m.items() if k != "hbm_traffic"})


def render(values: dict[str, str]) -> str:
  with open(TEMPLATE, encoding="utf-8") as f:
    text = f.read()
  for k, v in values.items():
    text = text.replace(f"@{k}@", str(v))
  if "@" in text.replace("%/1000r", ""):
    missing = sorted({p.split("@")[0] for p in text.split("@")[1::2] if p.isupper()})
    if missing:
      raise ValueError(f"unfilled template fields: {missing}")
  return text


def main(argv):
  del argv
  config = load_config(FLAGS.config)
  ppn = FLAGS.procs_per_node
  if ppn not in (1, 4):
    raise app.UsageError("--procs_per_node is 1 or 4")
  shape = tuple(int(v) for v in FLAGS.shape.split("x")) if FLAGS.shape else \
      ((24, 2, 24, 2, 3, 2) if ppn == 1 else (12, 2, 12, 2, 3, 2))
  net = T.tofu_d(shape) if ppn == 1 else T.tofu_d_cmg(shape, ppn)
  mesh = mesh_of(config)
  layout = layout_of(mesh)
  mem = memory_check(config, ppn, FLAGS.node_gib)
  nodes = net.size // ppn
  summary = dict(config=FLAGS.config, mesh=mesh, nodes=nodes, procs_per_node=ppn, memory=mem)
  if not mem["fits"] and not FLAGS.force:
    print(json.dumps(dict(summary, written=False)))
    raise SystemExit(1)
  placement = T.map_axes(net, layout)
  os.makedirs(FLAGS.out, exist_ok=True)
  rankmap, ranks = os.path.join(FLAGS.out, "rankmap"), os.path.join(FLAGS.out, "ranks.txt")
  T.write_fujitsu_rank_map(rankmap, net, placement)
  T.write_rank_file(ranks, net, placement)
  prof = cpu.PRESETS["a64fx"]
  threads = prof.cores // ppn
  numa_last = FLAGS.numa_base + prof.numa_nodes - 1
  train_args = f"--config={FLAGS.config} --workdir={FLAGS.workdir}"
  job = render(dict(NODES=nodes, SHAPE6="x".join(map(str, shape)), SHAPE3="x".join(map(str, T.node_shape_3d(net))),
                    PROCS=net.size, PPN=ppn, THREADS=threads, LAYOUT=",".join(f"{k}{v}" for k, v in layout.items()),
                    MESH=",".join(f"{k}={v}" for k, v in mesh.items()), RSCGRP=FLAGS.rscgrp, ELAPSE=FLAGS.elapse,
                    RANKMAP="rankmap", GROUP=FLAGS.group, GFSCACHE=FLAGS.gfscache, VENV=FLAGS.venv, RENDEZVOUS=FLAGS.rendezvous,
                    NUMA_BASE=FLAGS.numa_base, NUMA_LAST=numa_last, TRAIN_ARGS=train_args))
  path = os.path.join(FLAGS.out, "job.sh")
  with open(path, "w", encoding="utf-8") as f:
    f.write(job)
  pieces = {a: "*".join(f"{p}{n}" for p, n in parts) for a, parts in placement.pieces.items()}
  print(json.dumps(dict(summary, written=True, threads_per_process=threads, pieces=pieces,
                        files=[path, rankmap, ranks])))


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  app.run(main)
