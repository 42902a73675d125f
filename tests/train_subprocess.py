"""A real `experiments.train` process for the interruption tests (SIGTERM, kill -9), and its logged losses."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from conftest import REPO


def logged_losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
  """(step, loss) of every record in `workdir/metrics.jsonl` so far ([] before the first)."""
  path = workdir / "metrics.jsonl"
  lines = path.read_text().splitlines() if path.exists() else []
  return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def launch_train(workdir: pathlib.Path, overrides: dict) -> subprocess.Popen:
  """Starts the default config with `--config.<k>=<v>` overrides on CPU, stdout and stderr piped together."""
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/default.py", f"--workdir={workdir}",
       *[f"--config.{k}={v}" for k, v in overrides.items()]],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
