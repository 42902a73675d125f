r"""Score against training loss and tokens seen: every checkpoint of a run evaluated, then PNG plots.

  python -m experiments.eval_curve --workdir=/tmp/jpllm-default --limit=100

For each saved step (all of `<workdir>/checkpoints`, or --steps) this writes `<out>/step_<N>.json` (the results
of experiments.eval; steps already evaluated with the same settings are skipped on a re-run), then
`<out>/curve.json` (one row per step: train loss, validation loss, tokens seen, category scores, average and
multiple-choice log-likelihood accuracies) and two charts: `score_vs_loss.png` and `score_vs_tokens.png`.
`<out>` defaults to `<workdir>/eval_curve`. All flags of experiments.eval apply (--tasks, --limit, --shots, ...).
"""
from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, no display.
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from experiments import eval as eval_cli  # noqa: E402  (defines the shared evaluation flags)
from jpllm_jax import checkpoint  # noqa: E402
from jpllm_jax import eval as jeval  # noqa: E402

flags.DEFINE_string("out_dir", None, "Where the per-step results, curve.json and the PNGs go "
                    "(default <workdir>/eval_curve).")
flags.DEFINE_list("steps", None, "Steps to evaluate (default: every saved checkpoint).")
FLAGS = flags.FLAGS


def training_log(workdir: pathlib.Path) -> dict[int, dict]:
  """The records of `<workdir>/metrics.jsonl` by step (later lines win: a resumed run rewrites steps)."""
  path = workdir / "metrics.jsonl"
  records = {}
  if path.exists():
    for line in path.read_text().splitlines():
      if line.strip():
        record = json.loads(line)
        records[int(record["step"])] = record
  return records


def at_step(log: dict[int, dict], step: int, key: str) -> float | None:
  """`key` at `step`, else at the closest earlier logged step that has it."""
  for s in sorted((s for s in log if s <= step), reverse=True):
    if key in log[s]:
      return log[s][key]
  return None


def curve_row(step: int, results: dict, log: dict[int, dict]) -> dict:
  row = {"step": step, "loss": at_step(log, step, "loss"), "val_loss": at_step(log, step, "val_loss"),
         "tokens_seen": at_step(log, step, "tokens_seen")}
  entries = dict(results["categories"])
  if results["average"]:
    entries["AVG"] = results["average"]
  entries.update({name: r for name, r in results["scores"].items() if r["scoring"] == "loglik"})
  for name, entry in entries.items():
    row[name] = entry["score"]
    row[f"{name}{CI}"] = entry["ci95"]
  return row


CI = ":ci95"


def plot(rows: list[dict], x_key: str, x_label: str, path: pathlib.Path, title: str) -> None:
  """One panel per series (categories, AVG, log-likelihood accuracies) against `x_key`."""
  series = [k for k in rows[0] if k not in ("step", "loss", "val_loss", "tokens_seen") and not k.endswith(CI)]
  cols = min(3, len(series))
  nrows = -(-len(series) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
  points = [r for r in rows if r.get(x_key) is not None]
  for ax, key in zip(axes.flat, series):
    xs = [r[x_key] for r in points]
    ys = [r.get(key) for r in points]
    ax.plot(xs, ys, marker="o")
    cis = [r.get(key + CI) for r in points]
    if all(ci is not None for ci in cis):  # the bootstrap 95% interval: do not over-read small differences.
      ax.fill_between(xs, [ci[0] for ci in cis], [ci[1] for ci in cis], alpha=0.2, label="95% CI")
    for r, x, y in zip(points, xs, ys):
      ax.annotate(str(r["step"]), (x, y), fontsize=7, textcoords="offset points", xytext=(2, 3))
    ax.set_title(key)
    ax.set_xlabel(x_label)
    ax.set_ylabel("score")
    if x_key == "loss":
      ax.invert_xaxis()  # training progresses to the right.
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(series):]:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def settings_key() -> dict:
  return {k: getattr(FLAGS, k) for k in ("tasks", "limit", "shots", "scoring", "loglik_norm", "data_dir")}


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  workdir = pathlib.Path(FLAGS.workdir).absolute()
  out = pathlib.Path(FLAGS.out_dir or workdir / "eval_curve")
  out.mkdir(parents=True, exist_ok=True)
  steps = [int(s) for s in FLAGS.steps] if FLAGS.steps else jeval.checkpoint_steps(workdir)
  if not steps:
    raise app.UsageError(f"no checkpoints in {workdir}")
  cfg = checkpoint.load_config(jeval.loading.checkpoint_dir(workdir))
  log = training_log(workdir)
  lm, rows = None, []
  for step in steps:
    path = out / f"step_{step}.json"
    results = json.loads(path.read_text()) if path.exists() else None
    if results is None or results.get("curve_settings") != settings_key():
      _, params, sp, info = jeval.load_model(workdir=str(workdir), step=step, tokenizer=FLAGS.tokenizer)
      if lm is None:
        lm = jeval.LanguageModel(cfg, params, sp, batch_size=FLAGS.batch_size, max_len=FLAGS.max_len)
      lm.params = params  # same shapes: the compiled functions are reused across steps.
      results = eval_cli.run_eval(lm, info, path)
      results["curve_settings"] = settings_key()
      path.write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
      logging.info("step %d: AVG %s", step, results["average"] and round(results["average"]["score"], 4))
    rows.append(curve_row(step, results, log))
  (out / "curve.json").write_text(json.dumps(rows, indent=1) + "\n")
  title = f"{workdir.name}: shots={FLAGS.shots}, limit={FLAGS.limit}"
  plot(rows, "loss", "training loss", out / "score_vs_loss.png", title)
  plot(rows, "tokens_seen", "tokens seen", out / "score_vs_tokens.png", title)
  for row in rows:
    print(json.dumps(row))
  print(f"wrote {out}/curve.json, score_vs_loss.png and score_vs_tokens.png")


if __name__ == "__main__":
  app.run(main)
