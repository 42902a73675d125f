"""Run logs: a progress line on the terminal, a JSONL file and TensorBoard event files (process 0 only), the
throughput fields, and the console set-up of the launcher."""
from __future__ import annotations

import json
import logging as py_logging
import pathlib
import sys
from typing import Any

import jax
from absl import logging

# Libraries whose info-level absl logs (orbax: one line per save, restore and cleanup) are hidden by default.
QUIET_LIBRARIES = ("/orbax/", "/grain/")


class _LibraryFilter(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(lib in record.pathname for lib in QUIET_LIBRARIES)


def console(verbose: bool = False) -> None:
  """absl logs (progress, resume, checkpoints, evaluation) on stdout beside the progress line; the info-level
  chatter of `QUIET_LIBRARIES` hidden unless `verbose`."""
  handler = logging.get_absl_handler()
  handler.python_handler.stream = sys.stdout
  if not verbose:
    handler.addFilter(_LibraryFilter())


def throughput(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> dict[str, float]:
  """tokens/s and model TFLOP/s; MFU too when the machine's peak FLOP/s is given. An MFU above 1 means the
  given peak is wrong: it is left out with a warning rather than logged."""
  achieved = tokens_per_s * flops_per_token
  out = {"tokens_per_s": tokens_per_s, "model_tflops": achieved / 1e12}
  if peak_flops:
    mfu = achieved / peak_flops
    if mfu <= 1.0:
      out["mfu"] = mfu
    else:
      logging.log_first_n(logging.WARNING, "model FLOP/s %.3g exceed train.peak_tflops (%.3g FLOP/s): MFU not "
                          "logged; set the machine's real peak", 1, achieved, peak_flops)
  return out


class MetricsLogger:
  """Writes each record to `<workdir>/metrics.jsonl`, TensorBoard (`<workdir>/tb`) and stdout.

  `resume_step`: the step a resumed run restarts from; records logged past it by the run that died are dropped,
  so that metrics.jsonl keeps one record per step."""

  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
      drop_after(workdir / "metrics.jsonl", resume_step)
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(workdir / "tb"))

  def write(self, step: int, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
    self._jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    print(_progress_line(record), file=sys.stdout, flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def drop_after(path: pathlib.Path, step: int) -> int:
  """Removes the records with a step above `step` from a metrics.jsonl (rewritten atomically); returns how many.
  A torn last line (a crash mid-write) is dropped too."""
  if not path.exists():
    return 0
  kept, dropped = [], 0
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      keep = int(json.loads(line)["step"]) <= step
    except (ValueError, KeyError, TypeError):
      keep = False
    kept += [line] if keep else []
    dropped += not keep
  if dropped:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    tmp.replace(path)
    logging.info("metrics.jsonl: %d records past the resumed step %d dropped", dropped, step)
  return dropped


def _plain(v):
  try:
    v = v.item()
  except AttributeError:
    pass
  return float(f"{v:.8g}") if isinstance(v, float) else v  # 8 significant digits (lr can be 1e-7)


_FORMATS = (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
            ("tokens_per_s", "{:,.0f} tok/s"), ("model_tflops", "{:.3f} TFLOP/s"), ("mfu", "MFU {:.3f}"),
            ("fp8_overflow", "fp8 sat {:.1e}"), ("fp8_underflow", "fp8 flush {:.1e}"), ("skipped", "skipped {}"))


def _progress_line(record: dict[str, Any]) -> str:
  parts = [f"step {record['step']:>6}"]
  parts += [fmt.format(record[k]) for k, fmt in _FORMATS if k in record]
  return " | ".join(parts)
