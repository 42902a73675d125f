"""Injected checkpoint faults: bit flips, truncation and an emptied data state are detected, named, and the
previous good step restored; a failed save raises at once with path and cause; a second run on a workdir
refuses; kill -9 at several points during and between asynchronous saves resumes with the exact loss curve."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging as absl_logging

from jpllm_jax.models.config import ModelConfig
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.train import checkpointing
from jpllm_jax.train.checkpointing import (CheckpointSaveError, CorruptCheckpoint, TrainCheckpointer, WorkdirLock,
                                           WorkdirLocked)
from jpllm_jax.train.loop import train

from experiments.configs import default
from train_subprocess import launch_train, logged_losses

CFG = ModelConfig.from_dict(dict(family="llama", vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                 d_ff=32, max_seq_len=32))


class _Iter:
  """The part of a grain iterator that checkpoints use."""

  def __init__(self, pos=0):
    self.pos = pos

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state: bytes):
    self.pos = json.loads(state)["pos"]

  def start_prefetch(self):
    pass


def _state(step: int):
  rng = np.random.default_rng(step)
  return {"params": {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(32,)), jnp.bfloat16)},
          "opt_state": {"mu": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)},
          "step": jnp.int32(step)}


def _saved(tmp_path, steps=(2, 4)):
  """A checkpoint directory with one synchronous save per step in `steps`; the iterator at 10 x step."""
  ckpt = TrainCheckpointer(tmp_path / "ck", CFG, save_every=1, keep=5, async_save=False)
  for s in steps:
    ckpt.save(s, _state(s), _Iter(10 * s), force=True)
  ckpt.close()
  return tmp_path / "ck"


def _restore(directory):
  ckpt = TrainCheckpointer(directory, CFG, save_every=1, keep=5, async_save=False)
  it = _Iter()
  try:
    state = ckpt.restore(ckpt.latest_step(), _state(0), it)
  finally:
    ckpt.close()
  return state, it


@pytest.fixture
def warnings(monkeypatch):
  seen = []
  real = absl_logging.warning
  monkeypatch.setattr(checkpointing.logging, "warning", lambda msg, *a: (seen.append(msg % a), real(msg, *a)))
  return seen


def _check_fell_back(directory, warnings, what):
  state, it = _restore(directory)
  assert int(state["step"]) == 2 and it.pos == 20
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_state(2)["params"]["w"]))
  assert any("checkpoint" in w and str(directory / "4") in w and what in w for w in warnings), warnings
  assert (directory / "4.corrupt").is_dir() and not (directory / "4").exists()


def _params_files(step_dir):
  return sorted((p for p in (step_dir / "params").rglob("*") if p.is_file() and p.stat().st_size > 1000),
                key=lambda p: -p.stat().st_size)


def test_single_bit_flips_in_params_are_detected_and_the_previous_step_restored(tmp_path, warnings):
  base = _saved(tmp_path / "base")
  data = _params_files(base / "4")[0]  # the largest file: the arrays' bytes.
  size = data.stat().st_size
  rng = np.random.default_rng(0)
  for trial in range(6):
    directory = shutil.copytree(base, tmp_path / f"trial{trial}")
    target = directory / data.relative_to(base)
    raw = bytearray(target.read_bytes())
    pos, bit = int(rng.integers(size // 4, size)), int(rng.integers(8))
    raw[pos] ^= 1 << bit
    target.write_bytes(bytes(raw))
    warnings.clear()
    _check_fell_back(directory, warnings, "")
    print(f"trial {trial}: byte {pos} bit {bit}:", warnings[0].split(": ", 1)[1][:160])


def test_truncated_latest_checkpoint_falls_back(tmp_path, warnings):
  directory = _saved(tmp_path)
  target = _params_files(directory / "4")[0]
  with open(target, "r+b") as f:
    f.truncate(target.stat().st_size // 2)
  _check_fell_back(directory, warnings, "")


def test_emptied_data_state_names_file_and_step(tmp_path, warnings):
  directory = _saved(tmp_path)
  [f] = (directory / "4" / "data").glob("*.json")
  f.write_text("")
  _check_fell_back(directory, warnings, f"data/{f.name} of step 4 is not valid JSON")
  # The only step left emptied too: a clear error listing each step tried.
  [f] = (directory / "2" / "data").glob("*.json")
  f.write_text("")
  with pytest.raises(CorruptCheckpoint, match=f"step 2 .*data/{f.name} of step 2 is not valid JSON"):
    _restore(directory)


def test_a_different_model_state_is_refused_by_name(tmp_path):
  directory = _saved(tmp_path)
  other = CFG.replace(d_model=32)
  with pytest.raises(ValueError, match="different model.*d_model"):
    TrainCheckpointer(directory, other, save_every=1, keep=5)
  ckpt = TrainCheckpointer(directory, CFG, save_every=1, keep=5, async_save=False)
  wrong = _state(0)
  wrong["params"]["w"] = jnp.zeros((64, 16), jnp.float32)
  with pytest.raises(ValueError, match=r"different model state.*\['params'\]\['w'\].*\[64, 32\].*\[64, 16\]"):
    ckpt.restore(4, wrong, _Iter())
  ckpt.close()
  assert (directory / "4").is_dir()  # nothing set aside: the checkpoint is good, the run is wrong.


def test_a_failed_save_raises_at_once_with_path_and_cause(tmp_path, monkeypatch):
  directory = _saved(tmp_path, steps=(2,))
  ckpt = TrainCheckpointer(directory, CFG, save_every=1, keep=5, async_save=True)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory / "3"))
  monkeypatch.setattr(ckpt.manager, "save", full)
  t = time.monotonic()
  with pytest.raises(CheckpointSaveError, match=f"step 3 to {directory / '3'} failed: OSError.*No space left"):
    ckpt.save(3, _state(3), _Iter(30), force=True)
  assert time.monotonic() - t < 30
  monkeypatch.undo()

  # A background write that fails is raised by the next call to save (the next step), not an interval later.
  def broken():
    raise OSError(errno.EROFS, "Read-only file system")
  monkeypatch.setattr(ckpt.manager, "check_for_errors", broken)
  with pytest.raises(CheckpointSaveError, match=f"{directory} failed: OSError.*Read-only"):
    ckpt.save(4, _state(4), _Iter(40))
  monkeypatch.undo()
  ckpt.close()
  state, it = _restore(directory)  # the last good checkpoint is intact.
  assert int(state["step"]) == 2 and it.pos == 20


def test_a_second_run_on_a_workdir_refuses_and_a_dead_ones_lock_is_taken_over(tmp_path):
  other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename}))
    with pytest.raises(WorkdirLocked, match=f"in use by pid {other.pid} on .*run.lock"):
      WorkdirLock(tmp_path)
  finally:
    other.kill()
    other.wait()
  mine = WorkdirLock(tmp_path)  # the holder is dead now: taken over.
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  mine.release()
  assert not (tmp_path / "run.lock").exists()


OVERRIDES = {
    "data.seq_len": 16, "model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 2,
    "model.d_ff": 32, "train.steps": 14, "train.batch_size": 2, "train.log_every": 1, "train.eval_every": 0,
    "train.checkpoint_every": 4, "train.keep_checkpoints": 2, "optim.warmup_steps": 3,
}


def _launch(workdir, **extra):
  return launch_train(workdir, {**OVERRIDES, "data.tokenizer": mistral_v1_path(), **extra})


def test_kill_9_during_and_between_async_saves_resumes_with_the_same_loss_curve(tmp_path):
  run = tmp_path / "killed"
  # Kill points by logged steps (saves every 4, asynchronous): just after the save of step 4 starts, and at step
  # 10 (after the save of 8, often still in flight); the lock of each killed run is taken over by the next.
  for kill_at in (4, 10):
    proc = _launch(run)
    deadline = time.time() + 300
    while (len(logged_losses(run)) == 0 or logged_losses(run)[-1][0] < kill_at) and proc.poll() is None \
        and time.time() < deadline:
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    print("killed at logged step", logged_losses(run)[-1][0], "checkpoints", sorted(os.listdir(run / "checkpoints")))
  proc = _launch(run)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-4000:]
  ref = tmp_path / "uninterrupted"
  config = default.get_config()
  for k, v in {**OVERRIDES, "data.tokenizer": mistral_v1_path()}.items():
    group, field = k.split(".")
    config[group][field] = v
  train(config, str(ref))
  assert [s for s, _ in logged_losses(run)] == list(range(1, OVERRIDES["train.steps"] + 1))  # one record per step.
  assert logged_losses(run) == logged_losses(ref)


def test_a_save_whose_path_cannot_be_created_stops_the_run_with_the_last_good_step_intact(tmp_path):
  config = default.get_config()
  for k, v in {**OVERRIDES, "data.tokenizer": mistral_v1_path(), "train.steps": 6, "train.checkpoint_every": 2}.items():
    group, field = k.split(".")
    config[group][field] = v
  blocker = tmp_path / "checkpoints" / checkpointing.CHECKSUMS / "4.json"
  blocker.mkdir(parents=True)  # a directory where step 4's file must go: the OS refuses, as a full disk would.
  with pytest.raises(CheckpointSaveError, match=f"step 4 to {tmp_path / 'checkpoints' / '4'} failed: "
                                                f"IsADirectoryError: .*Is a directory: '{blocker}'"):
    train(config, str(tmp_path))
  assert not (tmp_path / "run.lock").exists()  # a clean stop: the lock released, the save of step 2 complete.
  steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert steps[-1] == 2 and not list((tmp_path / "checkpoints").glob("4*")), steps
  blocker.rmdir()
  train(config, str(tmp_path))  # the restart resumes from step 2.
  assert [s for s, _ in logged_losses(tmp_path)] == [1, 2, 3, 4, 5, 6]
