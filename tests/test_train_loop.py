"""The training loop on real Japanese text: loss falls, and a resumed run equals the uninterrupted one."""
from __future__ import annotations

import json

from experiments.configs import default
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.train.loop import train


def _config(steps: int):
  c = default.get_config()
  c.data.tokenizer = mistral_v1_path()
  c.data.seq_len = 64
  c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
  c.train.update(steps=steps, batch_size=4, log_every=1, eval_every=0, checkpoint_every=3,
                 async_checkpoint=True, peak_tflops=1.0)
  c.optim.warmup_steps = 2
  return c


def _losses(workdir):
  return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
  full, split = tmp_path / "full", tmp_path / "split"
  train(_config(8), str(full))
  train(_stop_at(3), str(split))
  train(_config(8), str(split))  # resumes from the checkpoint at step 3.
  assert _losses(split) == _losses(full)
  assert len(_losses(full)) == 8 and _losses(full)[-1] < _losses(full)[0]


def _stop_at(step: int):
  c = _config(8)
  c.train.stop_after = step  # the run is cut short at `step`; its schedule still spans 8 steps.
  return c
