"""The NaN/Inf and loss-spike guard: bad steps are skipped and logged; K in a row stop the run, naming the
step and the first non-finite tensor."""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import default
from jpllm_jax.data import pipeline
from jpllm_jax.models import llama
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.train import step as step_lib
from jpllm_jax.train.loop import TrainingDiverged, train
from jpllm_jax.train.optimizer import make_optimizer

CFG = llama.llama2(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16)


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (2, 16)).astype(np.int32)
  return dict(inputs=tokens, targets=np.roll(tokens, -1, 1), segment_ids=np.ones((2, 16), np.int32),
              positions=np.tile(np.arange(16, dtype=np.int32), (2, 1)), weights=np.ones((2, 16), np.float32))


def _run_step(state, batch, step_cfg=step_lib.StepConfig()):
  tx, schedule = make_optimizer(1e-2, 1, 10)
  if state is None:
    state = step_lib.init_state(CFG, tx, jax.random.key(0))
  return state, *jax.jit(lambda s, b: step_lib.train_step(s, b, cfg=CFG, tx=tx, schedule=schedule,
                                                          step_cfg=step_cfg))(state, batch)


def _assert_same_tree(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_good_step_updates_the_parameters():
  old, new, m = _run_step(None, _batch())
  assert int(m["skipped"]) == 0 and int(m["first_nonfinite_leaf"]) == -1
  # The first step runs at the warm-up's learning rate 0 (as Megatron's): the moments move, then the weights.
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(old["opt_state"]), jax.tree.leaves(new["opt_state"])))
  _, newer, m = _run_step(new, _batch())
  assert int(m["skipped"]) == 0 and float(m["lr"]) > 0
  assert not np.array_equal(np.asarray(new["params"]["lm_head"]["kernel"]),
                            np.asarray(newer["params"]["lm_head"]["kernel"]))


def test_a_non_finite_gradient_skips_the_step_and_names_the_tensor(monkeypatch):
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(step_lib.models.param_shapes(CFG))]
  target = names.index("['layers']['mlp']['down']['kernel']")
  real = step_lib.loss_and_grads

  def poisoned(*args, **kwargs):  # one tensor's gradient gets an Inf, as from an overflow in its backward.
    metrics, grads = real(*args, **kwargs)
    leaves, treedef = jax.tree.flatten(grads)
    leaves[target] = leaves[target].at[(0,) * leaves[target].ndim].set(jnp.inf)
    return metrics, jax.tree.unflatten(treedef, leaves)

  monkeypatch.setattr(step_lib, "loss_and_grads", poisoned)
  old, new, m = _run_step(None, _batch())
  assert int(m["skipped"]) == 1 and int(m["nonfinite"]) == 1
  assert int(m["first_nonfinite_leaf"]) == target
  assert step_lib.nonfinite_leaf_name(CFG, target) == names[target]
  _assert_same_tree(new["params"], old["params"])
  _assert_same_tree(new["opt_state"], old["opt_state"])
  assert int(new["step"]) == 1  # the step counter moves on; the optimizer's update count does not.


def test_a_loss_spike_skips_the_step():
  tx, _ = make_optimizer(1e-2, 1, 10)
  state = step_lib.init_state(CFG, tx, jax.random.key(0))
  state["loss_ema"] = jnp.float32(1.0)  # the running mean; this batch's loss (~4.2) is > 2x it.
  old, new, m = _run_step(state, _batch(), step_lib.StepConfig(spike_factor=2.0))
  assert int(m["skipped"]) == 1 and int(m["nonfinite"]) == 0
  _assert_same_tree(new["params"], old["params"])
  assert float(new["loss_ema"]) == 1.0


# ------------------------------------------------------------------------------ in the training loop
def _config(steps: int, max_bad: int):
  c = default.get_config()
  c.data.tokenizer = mistral_v1_path()
  c.data.seq_len = 32
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
  c.train.update(steps=steps, batch_size=2, log_every=1, eval_every=0, checkpoint_every=100,
                 peak_tflops=1.0, max_bad_steps=max_bad)
  c.optim.warmup_steps = 1
  return c


class _Poison:
  """Wraps a data iterator: the batches numbered in `bad` (from 0) get a NaN loss weight."""

  def __init__(self, it, bad):
    self.it, self.bad, self.n = it, bad, 0

  def __next__(self):
    batch = next(self.it)
    if self.n in self.bad:
      batch["weights"] = batch["weights"].copy()
      batch["weights"][0, 0] = np.nan
    self.n += 1
    return batch

  def __getattr__(self, name):
    return getattr(self.it, name)


def _poison_data(monkeypatch, bad) -> list[_Poison]:
  """Poisons every data iterator made from now on; returns them as they are made."""
  real, made = pipeline.make_iterator, []
  monkeypatch.setattr(pipeline, "make_iterator", lambda *a, **k: made.append(_Poison(real(*a, **k), bad)) or made[-1])
  return made


def test_the_loop_skips_a_bad_step_logs_it_and_goes_on(tmp_path, monkeypatch, caplog):
  _poison_data(monkeypatch, {3})
  with caplog.at_level(logging.WARNING):
    train(_config(6, max_bad=2), str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["skipped"] for r in records] == [0, 0, 0, 1, 0, 0]
  assert records[-1]["skipped_total"] == 1
  assert all(np.isfinite(r["loss"]) for i, r in enumerate(records) if i != 3)
  assert any("step 4 skipped: non-finite" in r.getMessage() for r in caplog.records)


def test_the_loop_stops_after_k_bad_steps_naming_step_and_tensor(tmp_path, monkeypatch):
  _poison_data(monkeypatch, {2, 3, 4})
  with pytest.raises(TrainingDiverged, match=r"3 consecutive bad steps, the last at step 5: non-finite "
                                             r"gradient, first in params\['embed'\]\['embedding'\]"):
    train(_config(10, max_bad=3), str(tmp_path))
