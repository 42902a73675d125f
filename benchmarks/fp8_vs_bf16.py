r"""Training and validation loss of two runs (BF16 and FP8) in one PNG, and a final JSON line comparing them.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/bf16 \
      --config.model.dtype=bfloat16
  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/fp8 \
      --config.model.dtype=bfloat16 --config.model.matmul=fp8_blockwise \
      --config.data.tokenizer=/tmp/bf16/tokenizer/tokenizer.model
  python -m benchmarks.fp8_vs_bf16 /tmp/bf16 /tmp/fp8 --out benchmarks/fp8_vs_bf16.png

The comparison is at the last step with a validation loss in both runs (a run still going counts what it has).
"""
from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def records(workdir: str) -> list[dict]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
  return [json.loads(line) for line in lines if line.strip()]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("bf16")
  ap.add_argument("fp8")
  ap.add_argument("--out", default="benchmarks/fp8_vs_bf16.png")
  ap.add_argument("--labels", default="bf16,fp8_blockwise")
  args = ap.parse_args()
  runs = {label: records(d) for label, d in zip(args.labels.split(","), (args.bf16, args.fp8))}
  fig, ax = plt.subplots(figsize=(7, 4))
  for (label, recs), color in zip(runs.items(), ("tab:blue", "tab:red")):
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    ax.plot(*zip(*train), color=color, alpha=0.6, label=f"{label} train")
    if val:
      ax.plot(*zip(*val), "o-", color=color, label=f"{label} validation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title("default config (7.3M Llama), CPU: BF16 vs FP8 blockwise")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  vals = [{r["step"]: r["val_loss"] for r in recs if "val_loss" in r} for recs in runs.values()]
  common = sorted(set(vals[0]) & set(vals[1]))
  out = {"benchmark": "fp8_vs_bf16", "png": args.out}
  if common:
    s = common[-1]
    out.update(step=s, val_loss={k: v[s] for k, v in zip(runs, vals)},
               relative_gap=round((vals[1][s] - vals[0][s]) / vals[0][s], 5))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
