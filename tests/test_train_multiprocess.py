"""Multi-host training: 2 local processes (jax.distributed, gloo collectives on CPU) give the losses of 1."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from fake_devices import xla_flags
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.train.loop import train

from experiments.configs import default

# The same run as config overrides (for the launcher) and as a ConfigDict (for the in-process reference).
OVERRIDES = {
    "data.tokenizer": mistral_v1_path(), "data.seq_len": 64, "data.shards": 2,
    "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.d_ff": 128,
    "train.steps": 4, "train.batch_size": 4, "train.log_every": 1, "train.eval_every": 2, "train.eval_batches": 2,
    "train.checkpoint_every": 2, "train.peak_tflops": 1.0, "optim.warmup_steps": 2,
}


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, flags: list[str]) -> list[subprocess.Popen]:
  """Two `experiments.train` processes of one run on this host."""
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices=1)}
  return [subprocess.Popen(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/default.py", f"--workdir={workdir}",
       f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}", *flags],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def test_two_processes_give_the_single_process_losses(tmp_path):
  multi = tmp_path / "multi"
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  procs = _launch(multi, flags)
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  assert "process 1 of 2" in outputs[1]

  config = default.get_config()
  for k, v in OVERRIDES.items():
    group, field = k.split(".")
    config[group][field] = v
  single = tmp_path / "single"
  train(config, str(single))

  got, want = _records(multi), _records(single)
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  for g, w in zip(got, want):
    for key in ("loss", "grad_norm", "val_loss"):
      if key in w:
        assert abs(g[key] - w[key]) <= 1e-5 * abs(w[key]), (g["step"], key, g[key], w[key])
  # Both processes wrote their data iterator state with the checkpoint.
  data_files = sorted(p.name for p in (multi / "checkpoints" / "4" / "data").glob("process_*"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_a_killed_process_stops_the_other_at_once_and_the_run_restarts(tmp_path):
  run = {**OVERRIDES, "model.d_model": 16, "model.n_heads": 2, "model.d_ff": 32, "data.seq_len": 16, "train.steps": 400,
         "train.eval_every": 0, "train.checkpoint_every": 2}
  flags = [f"--config.{k}={v}" for k, v in run.items()]
  procs = _launch(tmp_path, flags)
  deadline = time.time() + 600
  while not ((tmp_path / "metrics.jsonl").exists() and len(_records(tmp_path)) >= 5) and time.time() < deadline:
    assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  out = procs[0].communicate(timeout=300)[0]
  waited = time.monotonic() - killed
  assert procs[0].returncode == 3, "\n".join(l for l in out.splitlines() if "Error" in l or "error" in l)[-5000:]
  assert waited < 60, waited  # a collective with the dead process fails at once (gloo); not the 100 s heartbeat.
  assert "error: a process of this 2-process run is gone (" in out and "restart every process" in out, out[-3000:]
  procs[1].communicate()
  last = max(r["step"] for r in _records(tmp_path))
  procs = _launch(tmp_path, flags + [f"--config.train.stop_after={last + 2}"])
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:]
  assert "resumed from step" in outputs[0]
  assert [r["step"] for r in _records(tmp_path)] == list(range(1, last + 3))
