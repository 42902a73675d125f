r"""Validation curves of a `--seeds=K` sweep grouped by point: mean and min-max band across seeds, and whether the
final validation losses of two points differ by more than the seeds do (Welch's t-test).

  python -m experiments.studies.seed_spread --workdir=/tmp/studies/adam_eps --out=/tmp/studies/adam_eps/spread

Reads `<workdir>/<run>/metrics.jsonl` of every run named `..._seed=<s>` and writes `<out>.png` (validation loss
against step, one band per point) and `<out>.md` (per point and step: mean ± std; per pair of points: the
difference of the final means, Welch's t and its two-sided p).
"""
from __future__ import annotations

import itertools
import json
import pathlib
import re

import numpy as np
from absl import app, flags

flags.DEFINE_string("workdir", None, "The sweep's directory.", required=True)
flags.DEFINE_string("out", None, "Output prefix (default <workdir>/seed_spread).")
FLAGS = flags.FLAGS


def curves(workdir: pathlib.Path) -> dict[str, dict[str, dict[int, float]]]:
  """{point: {seed: {step: val_loss}}} of the runs named <point>_seed=<s>."""
  out: dict[str, dict[str, dict[int, float]]] = {}
  for path in sorted(workdir.glob("*/metrics.jsonl")):
    m = re.fullmatch(r"(.*)_seed=(\w+)", path.parent.name)
    if not m:
      continue
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out.setdefault(m[1], {})[m[2]] = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
  return out


def welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  from scipy import stats
  t, p = stats.ttest_ind(a, b, equal_var=False)
  return float(t), float(p)


def main(argv):
  del argv
  workdir = pathlib.Path(FLAGS.workdir)
  out = pathlib.Path(FLAGS.out or workdir / "seed_spread")
  data = curves(workdir)
  if not data:
    raise app.UsageError(f"no <point>_seed=<s> runs in {workdir}")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.6))
  lines, finals = [], {}
  for point, seeds in data.items():
    steps = sorted(set.intersection(*(set(c) for c in seeds.values())))
    values = np.array([[seeds[s][t] for t in steps] for s in sorted(seeds)])
    mean = values.mean(0)
    ax.plot(steps, mean, marker=".", label=f"{point} (mean of {len(seeds)} seeds)")
    ax.fill_between(steps, values.min(0), values.max(0), alpha=0.25)
    finals[point] = values[:, -1]
    lines.append(f"| {point} | " + " | ".join(
        f"{m:.4f} ± {s:.4f}" for m, s in zip(mean, values.std(0, ddof=1) if len(seeds) > 1 else 0 * mean)) + " |")
    header = "| point | " + " | ".join(f"step {t}" for t in steps) + " |"
  ax.set(xlabel="step", ylabel="validation loss (nats/token)", title=f"{workdir.name}: mean, min-max over seeds")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  lo = min(v.min() for v in finals.values())
  ax.set_ylim(lo - 0.2, None)
  fig.tight_layout()
  fig.savefig(out.with_suffix(".png"), dpi=90)
  plt.close(fig)
  text = [header, "|" + "---|" * (header.count("|") - 1), *lines, "",
          "| a | b | final mean a - b | seeds' std a, b | Welch t | p |", "|---|---|---|---|---|---|"]
  for a, b in itertools.combinations(finals, 2):
    t, p = welch(finals[a], finals[b]) if min(len(finals[a]), len(finals[b])) > 1 else (float("nan"),) * 2
    text.append(f"| {a} | {b} | {finals[a].mean() - finals[b].mean():+.4f} | {finals[a].std(ddof=1):.4f}, "
                f"{finals[b].std(ddof=1):.4f} | {t:.2f} | {p:.3f} |")
  out.with_suffix(".md").write_text("\n".join(text) + "\n")
  print("\n".join(text))
  print(f"wrote {out}.png and {out}.md")


if __name__ == "__main__":
  app.run(main)
