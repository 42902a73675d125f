r"""Several runs' eval_curve results on the same axes: each log-likelihood task's score against validation loss
(an MTP model's logged training loss adds the MTP term), one line and bootstrap 95% band per run, and chance.

  python -m experiments.studies.compare_curves --runs=dense=/tmp/studies/dense_vs_moe/dense,moe=... \
      --out=/tmp/studies/dense_vs_moe/score_vs_loss.png

Reads `<workdir>/eval_curve/curve.json` of each run (experiments.eval_curve) and prints one line per run and step.
"""
from __future__ import annotations

import json
import pathlib

from absl import app, flags

flags.DEFINE_list("runs", None, "name=workdir pairs.", required=True)
flags.DEFINE_string("out", None, "The PNG to write.", required=True)
FLAGS = flags.FLAGS
CHANCE = {"jcommonsenseqa/loglik": 1 / 5, "jmmlu/loglik": 1 / 4}  # 5 and 4 choices.


def main(argv):
  del argv
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  curves = {name: json.loads((pathlib.Path(w) / "eval_curve" / "curve.json").read_text())
            for name, w in (pair.split("=", 1) for pair in FLAGS.runs)}
  tasks = [k for k in next(iter(curves.values()))[0] if k.endswith("/loglik")]
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for name, rows in curves.items():
      rows = [r for r in rows if r.get("val_loss") is not None]
      xs = [r["val_loss"] for r in rows]
      ax.plot(xs, [r[task] for r in rows], marker="o", label=name)
      ax.fill_between(xs, [r[task + ":ci95"][0] for r in rows], [r[task + ":ci95"][1] for r in rows], alpha=0.15)
    if task in CHANCE:
      ax.axhline(CHANCE[task], color="gray", ls="--", lw=1, label="chance")
    ax.set(title=task, xlabel="validation loss (nats/token)", ylabel="accuracy")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(FLAGS.out, dpi=90)
  plt.close(fig)
  for name, rows in curves.items():
    for r in rows:
      print(name, r["step"], r["loss"], r["val_loss"], {t: round(r[t], 3) for t in tasks})
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
