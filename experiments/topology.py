r"""Modelled data-parallel AllReduce of one step's gradient: the scheduler's rank order vs the mapped placement.

  python -m experiments.topology --system=fugaku --layout=tp6,pp8,dp288
  python -m experiments.topology --system=tpu_v5p --shape=8x8x16 --layout=tp4,pp4,dp64
  python -m experiments.topology --system=gpu --shape=128x8 --layout=tp8,pp8,dp16

Prints a table (placement x algorithm: seconds, steps, busiest link's bytes per step, longest route) and ends with
a JSON line holding `naive_s`, `mapped_s` and `allreduce_speedup` (the best algorithm of each placement).
The gradient is that of one tensor x pipeline shard, params / (TP * PP) values of --grad_bytes each (default 4:
fp32 gradients, an assumption; Fugaku-LLM's gradient dtype is not stated here). The model defaults to
Fugaku-LLM 13B's shape: the GPT preset with hidden 5184, 36 heads, 40 layers, FFN 4 x 5184 (13.17 B
parameters with the preset's 50,570-token vocabulary, also an assumption). --rank_file writes the mapped
placement for the launcher (parallel/topology.py: write_rank_file).
"""
from __future__ import annotations

import json
import math

import jax
from absl import app, flags

from jpllm_jax import models
from jpllm_jax.parallel import topology as T

flags.DEFINE_enum("system", "fugaku", ["fugaku", "tpu_v5p", "gpu"], "The network.")
flags.DEFINE_string("layout", "tp6,pp8,dp288", "Logical axes: tp<N>,pp<N>,dp<N> (their product = nodes).")
flags.DEFINE_string("shape", None, "Network shape, e.g. 24x2x24x2x3x2 (fugaku), 8x8x16 (tpu_v5p), "
                    "128x8 (gpu: nodes x GPUs); default: the system's own.")
flags.DEFINE_float("params", None, "Model parameters (default: counted from Fugaku-LLM 13B's shape).")
flags.DEFINE_integer("grad_bytes", 4, "Bytes per gradient value in the AllReduce.")
flags.DEFINE_string("rank_file", None, "Write the mapped placement's rank file here.")
FLAGS = flags.FLAGS


def fugaku_llm_13b_params() -> int:
  """Parameters of the GPT preset at Fugaku-LLM 13B's width, heads and depth (40 layers)."""
  cfg = models.preset("llm-jp-13b-v1", d_model=5184, n_heads=36, n_kv_heads=36, d_ff=4 * 5184)
  return sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(models.param_shapes(cfg)))


def network(system: str, shape: str | None) -> T.Network:
  dims = tuple(int(n) for n in shape.lower().split("x")) if shape else None
  if system == "fugaku":
    return T.tofu_d(dims) if dims else T.tofu_d()
  if system == "tpu_v5p":
    return T.tpu_v5p(dims) if dims else T.tpu_v5p()
  return T.gpu_cluster(*dims) if dims else T.gpu_cluster(128)


def allreduce_table(net: T.Network, placement: T.Placement, nbytes: float) -> dict[str, T.Cost]:
  """Data-parallel AllReduce of `nbytes` by each algorithm, every data-parallel group at once."""
  members = T.groups(placement, "dp")
  return {"ring": T.ring_allreduce(net, members, nbytes), "tree": T.tree_allreduce(net, members, nbytes),
          "torus": T.torus_allreduce(net, placement, "dp", nbytes)}


def main(argv):
  del argv
  net, layout = network(FLAGS.system, FLAGS.shape), T.parse_layout(FLAGS.layout)
  params = FLAGS.params or fugaku_llm_13b_params()
  nbytes = params / (layout["tp"] * layout["pp"]) * FLAGS.grad_bytes
  print(f"{net.name}: {'x'.join(map(str, net.shape))} ({','.join(a.name for a in net.axes)}), {net.size} nodes; "
        f"layout {FLAGS.layout}; {params / 1e9:.2f} B params -> {nbytes / 1e9:.3f} GB of gradient per "
        f"data-parallel rank")
  placements = {"naive": T.naive_placement(net, layout), "mapped": T.map_axes(net, layout)}
  for name, placement in placements.items():
    print(f"  {name} pieces: " + "; ".join(f"{a}=" + "*".join(f"{p or 'rank'}{n}" for p, n in parts)
                                          for a, parts in placement.pieces.items()))
  print(f"{'placement':<10}{'algorithm':<10}{'seconds':>10}{'steps':>7}{'link MB/step':>14}{'max hops':>10}")
  best = {}
  for name, placement in placements.items():
    table = allreduce_table(net, placement, nbytes)
    for algo, cost in table.items():
      print(f"{name:<10}{algo:<10}{cost.seconds:>10.4f}{cost.steps:>7}{cost.max_link_bytes / 1e6:>14.2f}"
            f"{cost.max_hops:>10}")
    best[name] = min(table.items(), key=lambda kv: kv[1].seconds)
  if FLAGS.rank_file:
    T.write_rank_file(FLAGS.rank_file, net, placements["mapped"])
    print(f"rank file: {FLAGS.rank_file}")
  naive_s, mapped_s = best["naive"][1].seconds, best["mapped"][1].seconds
  print(json.dumps({"system": net.name, "shape": list(net.shape), "layout": FLAGS.layout, "params": params,
                    "grad_bytes_per_rank": nbytes, "naive_algorithm": best["naive"][0],
                    "mapped_algorithm": best["mapped"][0], "naive_s": round(naive_s, 6),
                    "mapped_s": round(mapped_s, 6), "allreduce_speedup": round(naive_s / mapped_s, 3)}))


if __name__ == "__main__":
  app.run(main)
