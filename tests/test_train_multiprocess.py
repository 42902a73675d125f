"""Multi-host training: 2 local processes (jax.distributed, gloo collectives on CPU) give the losses of 1."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from conftest import REPO
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


def test_two_processes_give_the_single_process_losses(tmp_path):
  multi = tmp_path / "multi"
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/default.py", f"--workdir={multi}",
       f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}", *flags],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
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
