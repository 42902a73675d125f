"""A sweep's results: one row per run from its `metrics.jsonl` (and `eval.json` when it was evaluated),
written as `results.csv` and `summary.md`, and the plots `loss_curves.png` (validation loss against tokens,
one line per run) and `final_loss_vs_<field>.png` (final validation loss against each swept field)."""
from __future__ import annotations

import csv
import json
import pathlib
import statistics
from collections.abc import Sequence

from jpllm_jax.sweep.executors import Launch, read_state

LOSS_KEYS = ("final_val_loss", "best_val_loss", "best_val_step", "final_loss", "steps", "tokens_seen", "wall_s",
             "step_time_s", "tokens_per_s")


def metrics(directory: pathlib.Path) -> list[dict]:
  """The records of `<directory>/metrics.jsonl` by step (a resumed run's later lines win)."""
  path, by_step = directory / "metrics.jsonl", {}
  if path.exists():
    for line in path.read_text(encoding="utf-8").splitlines():
      try:
        record = json.loads(line)
        by_step[int(record["step"])] = record
      except (ValueError, KeyError, TypeError):
        continue
  return [by_step[s] for s in sorted(by_step)]


def status(launch: Launch, records: list[dict]) -> str:
  state = read_state(launch.directory)
  last = records[-1]["step"] if records else 0
  if state["done"] or last >= launch.steps:
    return "done"
  if state["launches"] and state["launches"][-1]["rc"] != 0:
    return f"failed (exit {state['launches'][-1]['rc']}, see {launch.directory.name}/train.log)"
  return f"unfinished (step {last}/{launch.steps})" if records else "not started"


def row(launch: Launch) -> dict:
  """One run's overrides, status, losses, tokens, times and evaluation scores."""
  records = metrics(launch.directory)
  out = {"run": launch.run.name, **launch.run.overrides, "status": status(launch, records)}
  vals = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
  losses = [r["loss"] for r in records if "loss" in r]
  if vals:
    best = min(vals, key=lambda sv: sv[1])
    out.update(final_val_loss=vals[-1][1], best_val_loss=best[1], best_val_step=best[0])
  if losses:
    out["final_loss"] = losses[-1]
  if records:
    out.update(steps=records[-1]["step"], tokens_seen=records[-1].get("tokens_seen"))
  wall = [la["wall_s"] for la in read_state(launch.directory)["launches"]]
  if wall:
    out["wall_s"] = round(sum(wall), 2)
  rates = [r for r in records if r.get("tokens_per_s") and r.get("tokens_seen")]
  if rates:  # each logged window's seconds per step (tokens per step over tokens/s), the median of them.
    out["step_time_s"] = statistics.median(r["tokens_seen"] / r["step"] / r["tokens_per_s"] for r in rates)
    out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rates)
  for r in records:  # in-training task scores (eval/<task>), the latest of each.
    out.update({k: v for k, v in r.items() if k.startswith("eval/")})
  eval_json = launch.directory / "eval.json"  # `python -m experiments.eval --output=<run>/eval.json`.
  if eval_json.exists():
    results = json.loads(eval_json.read_text(encoding="utf-8"))
    out.update({f"final_eval/{k}": v["score"] for k, v in results.get("scores", {}).items()})
    if results.get("average"):
      out["final_eval/AVG"] = results["average"]["score"]
  return out


def _columns(rows: Sequence[dict], fields: Sequence[str]) -> list[str]:
  extra = sorted({k for r in rows for k in r} - {"run", "status", *fields, *LOSS_KEYS})
  return ["run", *fields, "status", *LOSS_KEYS, *extra]


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)


def _mean_std(xs: Sequence[float]) -> str:
  return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def summary(rows: Sequence[dict], fields: Sequence[str], common: dict[str, str], title: str) -> str:
  """Markdown: the runs by final validation loss, then the mean and spread per value of each swept field
  and, with repeated seeds, across the seeds of each setting."""
  done = sorted((r for r in rows if "final_val_loss" in r), key=lambda r: r["final_val_loss"])
  lines = [f"# Sweep {title}", "", f"{len(rows)} runs, {sum(r['status'] == 'done' for r in rows)} done."
           + (f" Common overrides: `{';'.join(f'{k}={v}' for k, v in common.items())}`." if common else ""), ""]
  cols = ["run", *fields, "final val", "best val (step)", "final train", "tokens", "wall s", "step s", "status"]
  lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in done + [r for r in rows if "final_val_loss" not in r]:
    best = f"{r['best_val_loss']:.4f} ({r['best_val_step']})" if "best_val_loss" in r else ""
    loss = lambda k: f"{r[k]:.4f}" if k in r else ""
    cells = [r["run"], *[r.get(f, "") for f in fields], loss("final_val_loss"), best, loss("final_loss"),
             _fmt(r.get("tokens_seen")), _fmt(r.get("wall_s")),
             _fmt(r.get("step_time_s")), r["status"]]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  if done:
    lines += ["", f"Best: `{done[0]['run']}`, final validation loss {done[0]['final_val_loss']:.4f}."]
  for field in [f for f in fields if f != "seed"]:
    groups = {}
    for r in done:
      groups.setdefault(r[field], []).append(r["final_val_loss"])
    if len(groups) > 1:
      lines += ["", f"## {field}", "", "| value | runs | final val (mean ± std) | min |", "|---|---|---|---|"]
      lines += [f"| {v} | {len(xs)} | {_mean_std(xs)} | {min(xs):.4f} |" for v, xs in groups.items()]
  if "seed" in fields:
    others = [f for f in fields if f != "seed"]
    groups = {}
    for r in done:
      groups.setdefault(tuple(r[f] for f in others), []).append(r["final_val_loss"])
    lines += ["", "## Across seeds", "", "| setting | seeds | final val (mean ± std) | min | max |",
              "|---|---|---|---|---|"]
    lines += [f"| {', '.join(f'{f}={v}' for f, v in zip(others, k)) or 'base'} | {len(xs)} | {_mean_std(xs)} | "
              f"{min(xs):.4f} | {max(xs):.4f} |" for k, xs in groups.items()]
  return "\n".join(lines) + "\n"


def _number(text: str) -> float | None:
  try:
    return float(text)
  except (TypeError, ValueError):
    return None


def plot_curves(launches: Sequence[Launch], path: pathlib.Path) -> None:
  """Validation loss against tokens seen, one line per run, the legend its overrides."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for la in launches:
    records = metrics(la.directory)
    points = [(r["tokens_seen"], r["val_loss"]) for r in records if "val_loss" in r and "tokens_seen" in r]
    if points:
      ax.plot(*zip(*points), marker=".", label=la.run.name)
  ax.set(xlabel="tokens seen", ylabel="validation loss", title="validation loss")
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_field(rows: Sequence[dict], field: str, path: pathlib.Path) -> bool:
  """Final validation loss against one swept numeric field (log scale when it spans 3x, the swept values as
  ticks); False when the field is not numeric or has one value."""
  points = [(_number(r[field]), r["final_val_loss"]) for r in rows if "final_val_loss" in r]
  if len({x for x, _ in points}) < 2 or any(x is None for x, _ in points):
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.scatter(*zip(*points), alpha=0.7, label="runs")
  xs = sorted({x for x, _ in points})
  ax.plot(xs, [statistics.mean(y for x2, y in points if x2 == x) for x in xs], color="k", lw=1, label="mean")
  if xs[0] > 0 and xs[-1] / xs[0] >= 3:
    ax.set_xscale("log")
  if len(xs) <= 10:  # the swept values themselves as ticks, written as given.
    labels = {_number(r[field]): r[field] for r in rows}
    ax.set_xticks(xs, [labels[x] for x in xs], minor=False)
    ax.minorticks_off()
  ax.set(xlabel=field, ylabel="final validation loss", title=f"final validation loss vs {field}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write(launches: Sequence[Launch], workdir: pathlib.Path, common: dict[str, str]) -> list[dict]:
  """results.csv, summary.md and the plots in `workdir`; returns the rows."""
  rows = [row(la) for la in launches]
  fields = list(dict.fromkeys(k for la in launches for k in la.run.overrides))
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "results.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, _columns(rows, fields), restval="")
    writer.writeheader()
    writer.writerows(rows)
  (workdir / "summary.md").write_text(summary(rows, fields, common, str(workdir)), encoding="utf-8")
  plot_curves(launches, workdir / "loss_curves.png")
  for field in fields:
    if field != "seed":
      plot_field(rows, field, workdir / f"final_loss_vs_{field}.png")
  return rows


def progress(i: int, n: int, launch: Launch, outcome: dict) -> str:
  """The line printed as a run ends: its outcome and losses."""
  head = f"[{i}/{n}] {launch.run.name}:"
  if outcome.get("skipped"):
    return f"{head} finished before, skipped"
  r = row(launch)
  losses = (f", final val {r['final_val_loss']:.4f} (best {r['best_val_loss']:.4f} at step {r['best_val_step']})"
            if "final_val_loss" in r else "")
  what = "done" if outcome["done"] else r["status"] if outcome["rc"] else f"stopped at step {r.get('steps', 0)}"
  return f"{head} {what} in {outcome['wall_s']:.1f} s{losses}"
