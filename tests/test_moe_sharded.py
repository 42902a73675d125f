"""Expert parallelism in the model: a DeepSeek-style and a Mixtral model on 8 fake CPU devices (experts sharded
over the `expert` axis, with data, FSDP and tensor axes) give the single-device loss and gradients."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fake_devices import run_bounded, run_on_fake_devices

SCRIPT = textwrap.dedent("""
    from fake_devices import packed_batch, rel_diff
    import functools, jax, numpy as np
    from jpllm_jax import models
    from jpllm_jax.parallel import DEFAULT_RULES, axis_rules, make_mesh
    from jpllm_jax.train.optimizer import make_optimizer
    from jpllm_jax.train.step import (StepConfig, batch_sharding, init_state, loss_and_grads, make_train_step,
                                      state_shardings)

    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    B, T = 8, 16
    tiny = dict(vocab_size=128, d_model=32, n_heads=4, d_ff=48, max_seq_len=64, init_std=0.3)
    cfgs = {
        "deepseek": models.preset("deepseek-v3", **tiny, n_layers=3, q_lora_rank=16, kv_lora_rank=16,
                                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_d_ff=8, first_k_dense=1,
                                  n_experts=16, n_group=4, topk_group=2, n_experts_per_tok=4, mtp_depth=1,
                                  rope_type="default", rope_scaling=(), moe_aux_loss_coef=1e-2),
        "mixtral": models.preset("mixtral-8x7b", **tiny, n_layers=2, n_kv_heads=2, router_z_loss_coef=1e-3),
    }
    tx, schedule = make_optimizer(1e-3, 1, 10)


    layouts = {"deepseek": [{"expert": 8}, {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}],
               "mixtral": [{"fsdp": 2, "expert": 4}]}
    for name, cfg in cfgs.items():
      batch = packed_batch(rng, 128, B, T, pad=3)
      ref = None
      for sizes in [{"data": 1}] + layouts[name]:
        devices = jax.devices()[:1] if sizes == {"data": 1} else jax.devices()
        mesh = make_mesh(sizes, devices)
        shard = state_shardings(cfg, tx, mesh)
        state = jax.jit(functools.partial(init_state, cfg, tx), out_shardings=shard)(jax.random.key(0))
        fn = jax.jit(lambda p, b: loss_and_grads(cfg, p, b, z_loss=1e-4, micro_batches=1, mtp_loss_coef=0.3),
                     in_shardings=(shard["params"], batch_sharding(mesh)), out_shardings=(None, shard["params"]))
        with axis_rules(mesh, DEFAULT_RULES):
          m, g = fn(state["params"], batch)
        got = ({k: np.asarray(m[k]) for k in ("loss", "moe_loss", "expert_load")}, jax.tree.map(np.asarray, g))
        if ref is None:
          ref = got
          step = make_train_step(cfg, tx, schedule, StepConfig(), mesh)
          ref_state, _ = step(state, batch)
          ref_state, ref_metrics = step(ref_state, batch)  # the first step has learning rate 0
          continue
        dl = max(abs(float(got[0][k]) - float(ref[0][k])) / abs(float(ref[0][k])) for k in ("loss", "moe_loss"))
        dload = float(np.abs(got[0]["expert_load"] - ref[0]["expert_load"]).max())
        dg = rel_diff(got[1], ref[1])
        print(name, sizes, "loss rel diff %.1e" % dl, "load diff %.1e" % dload, "grad rel diff %.1e" % dg)
        assert dl < 1e-5 and dload < 1e-6 and dg < 1e-5, (name, sizes, dl, dload, dg)
      # Two full train steps with expert parallelism (optimizer, bias rule) equal the single-device steps.
      step = make_train_step(cfg, tx, schedule, StepConfig(), mesh)
      new_state, _ = step(state, batch)
      new_state, metrics = step(new_state, batch)
      dp = rel_diff(jax.tree.map(np.asarray, new_state["params"]), jax.tree.map(np.asarray, ref_state["params"]))
      print(name, sizes, "train step params rel diff %.1e" % dp)
      assert dp < 1e-5 and abs(float(metrics["loss"]) - float(ref_metrics["loss"])) < 1e-5 * float(ref_metrics["loss"])
    print("OK")
""")


def test_expert_parallel_model_equals_single_device():
  run_on_fake_devices(SCRIPT, timeout=900)  # CPU work, not wall time: a busy machine slows it, never fails it.


def test_subprocess_bound_is_the_work_with_a_wall_cap():
  python = [sys.executable, "-c"]
  slow = run_bounded(python + ["import time; time.sleep(1.5); print('done')"], 1.0)  # waits, does no work.
  assert slow.returncode == 0 and slow.stdout.strip() == "done"
  with pytest.raises(subprocess.TimeoutExpired):  # busy forever: its CPU time (or the cap on a busy machine).
    run_bounded(python + ["while True: pass"], 1.0)
  with pytest.raises(subprocess.TimeoutExpired) as hung:  # waits forever: the wall-clock cap.
    run_bounded(python + ["import time; time.sleep(60)"], 0.5)
  assert "stopped at the wall-clock cap" in hung.value.stderr
