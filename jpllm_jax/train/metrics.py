"""Run logs: a progress line on the terminal, a JSONL file and TensorBoard event files (process 0 only)."""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import jax


class MetricsLogger:
  """Writes each record to `<workdir>/metrics.jsonl`, TensorBoard (`<workdir>/tb`) and stdout."""

  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
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


def _plain(v):
  try:
    v = v.item()
  except AttributeError:
    pass
  return float(f"{v:.8g}") if isinstance(v, float) else v  # 8 significant digits (lr can be 1e-7)


_FORMATS = (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
            ("tokens_per_s", "{:,.0f} tok/s"), ("model_tflops", "{:.3f} TFLOP/s"), ("mfu", "MFU {:.3f}"),
            ("skipped", "skipped {}"))


def _progress_line(record: dict[str, Any]) -> str:
  parts = [f"step {record['step']:>6}"]
  parts += [fmt.format(record[k]) for k, fmt in _FORMATS if k in record]
  return " | ".join(parts)
