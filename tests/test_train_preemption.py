"""Preemption: SIGTERM to the launcher saves a checkpoint and exits cleanly; the restarted run continues
with exactly the loss curve of an uninterrupted run."""
from __future__ import annotations

import signal
import time

from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.train.loop import train
from train_subprocess import launch_train, logged_losses

from experiments.configs import default

OVERRIDES = {
    "data.tokenizer": mistral_v1_path(), "data.seq_len": 32,
    "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 2, "model.d_ff": 64,
    "train.steps": 120, "train.batch_size": 2, "train.log_every": 1, "train.eval_every": 0,
    "train.checkpoint_every": 1000, "train.peak_tflops": 1.0, "optim.warmup_steps": 5,
}


def _launch(workdir):
  return launch_train(workdir, OVERRIDES)


def test_sigterm_saves_and_the_restart_equals_the_uninterrupted_run(tmp_path):
  run = tmp_path / "preempted"
  proc = _launch(run)
  deadline = time.time() + 300
  while len(logged_losses(run)) < 3 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-4000:]
  cut = len(logged_losses(run))
  assert 3 <= cut < OVERRIDES["train.steps"], "the run ended before the signal arrived"
  assert "SIGTERM: saving step" in out
  # The checkpoint of the step the run stopped at (not on the save interval) is there.
  assert (run / "checkpoints" / str(cut)).is_dir()

  proc = _launch(run)  # resumes from it.
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-4000:]

  config = default.get_config()
  for k, v in OVERRIDES.items():
    group, field = k.split(".")
    config[group][field] = v
  train(config, str(tmp_path / "uninterrupted"))
  assert logged_losses(run) == logged_losses(tmp_path / "uninterrupted")
