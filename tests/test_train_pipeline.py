"""The pipelined train step (mesh `stage` > 1) equals the single-device step on 8 fake CPU devices: loss and
gradients within 1e-5 relative, and the parameters after two optimizer steps at a non-zero learning rate."""
from __future__ import annotations

import textwrap

import pytest

from fake_devices import run_on_fake_devices

SCRIPT = textwrap.dedent("""
    from fake_devices import rel_diff
    import functools, jax, numpy as np
    from jpllm_jax.models import llama, gpt
    from jpllm_jax.parallel import DEFAULT_RULES, axis_rules, make_mesh
    from jpllm_jax.train.optimizer import make_optimizer
    from jpllm_jax.train.step import (StepConfig, batch_sharding, init_state, loss_and_grads, make_train_step,
                                      pipeline_loss_and_grads, pipeline_schedule, state_shardings)

    rng = np.random.default_rng(0)
    B, T = 8, 16
    def batch_for(vocab):
      seg = np.ones((B, T), np.int32); seg[:, T // 2:] = 2; seg[0, -5:] = 0  # two packed docs + padding
      pos = np.concatenate([np.arange(T // 2)] * 2)[None].repeat(B, 0).astype(np.int32)
      w = (seg > 0).astype(np.float32); w[:, T // 2 - 1] = 0
      return dict(inputs=rng.integers(0, vocab, (B, T)).astype(np.int32),
                  targets=rng.integers(0, vocab, (B, T)).astype(np.int32),
                  segment_ids=seg, positions=pos, weights=w)

    tiny = dict(vocab_size=64, d_model=32, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)
    MODELS = {"llama": llama.llama3(**tiny, rope_type="default", rope_scaling=()),
              "gpt": gpt.gpt(**{**tiny, "n_kv_heads": 4})}  # biases, LayerNorm, learned positions, tied head
    tx, schedule = make_optimizer(1e-3, 0, 10)  # no warm-up: both steps update the parameters

    def run(cfg, sizes, step_cfg, batch):
      mesh = make_mesh(sizes, jax.devices()[:1] if sizes == {"data": 1} else jax.devices())
      shard = state_shardings(cfg, tx, mesh)
      state = jax.jit(functools.partial(init_state, cfg, tx), out_shardings=shard)(jax.random.key(0))
      sched = pipeline_schedule(cfg, mesh, step_cfg)
      if sched is None:
        fn = lambda p, b: loss_and_grads(cfg, p, b, z_loss=1e-4, micro_batches=step_cfg.micro_batches)
      else:
        fn = lambda p, b: pipeline_loss_and_grads(cfg, p, b, mesh=mesh, schedule=sched, z_loss=1e-4)
      grads_fn = jax.jit(fn, in_shardings=(shard["params"], batch_sharding(mesh)), out_shardings=(None, shard["params"]))
      with axis_rules(mesh, DEFAULT_RULES):
        m, g = grads_fn(state["params"], batch)
      step = make_train_step(cfg, tx, schedule, step_cfg, mesh)
      state, _ = step(state, batch)
      state, m2 = step(state, batch)
      return (float(m["loss"]), float(m["ce"]), float(m2["loss"]), jax.tree.map(np.asarray, g),
              jax.tree.map(np.asarray, state["params"]))

    def check(name, sizes, pipeline="1f1b", micro=4, virtual=1):
      cfg = MODELS[name]
      batch = batch_for(cfg.vocab_size)
      ref = run(cfg, {"data": 1}, StepConfig(micro_batches=1), batch)
      got = run(cfg, sizes, StepConfig(micro_batches=micro, pipeline=pipeline, virtual_stages=virtual), batch)
      dl = max(abs(a - b) / abs(b) for a, b in zip(got[:3], ref[:3]))
      dg, dp = rel_diff(got[3], ref[3]), rel_diff(got[4], ref[4])
      print(name, sizes, pipeline, "M", micro, "V", virtual, "loss rel diff %.1e grad %.1e params after 2 steps %.1e"
            % (dl, dg, dp))
      assert dl < 1e-5 and dg < 1e-5 and dp < 1e-5, (name, sizes, pipeline, dl, dg, dp)

    CASES
    print("OK")
""")


def _run(cases: str) -> None:
  run_on_fake_devices(SCRIPT.replace("CASES", textwrap.dedent(cases)), devices=8, timeout=900)


def test_pipelined_step_stage8_and_stage4_data2():
  _run("""
    check("llama", {"stage": 8}, "1f1b", micro=8)
    check("llama", {"stage": 4, "data": 2}, "gpipe")
    """)


def test_pipelined_step_interleaved():
  _run("""
    check("llama", {"stage": 4, "data": 2}, "interleaved", micro=4, virtual=2)
    """)


@pytest.mark.xfail(strict=True, reason="XLA's SPMD partitioner aborts (spmd_partitioner_util.cc:497, replica "
                   "groups) on the stage 2 x fsdp 2 x tensor 2 pipelined step; not yet fixed")
def test_pipelined_step_with_fsdp_and_tensor():
  _run("""
    check("gpt", {"stage": 2, "fsdp": 2, "tensor": 2}, "1f1b")
    """)


def test_unsupported_pipelines_fail_before_compiling():
  from jpllm_jax.models import deepseek, llama
  from jpllm_jax.train.step import StepConfig, pipeline_schedule

  class FakeMesh:  # only the mesh's shape is read
    shape = {"stage": 4}

  cfg = llama.llama3(vocab_size=64, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)
  with pytest.raises(ValueError, match=r"n_layers=4 or 8, or mesh.stage in \[1, 2, 3, 6\]"):
    pipeline_schedule(cfg, FakeMesh(), StepConfig(micro_batches=4))
  with pytest.raises(ValueError, match="dense models"):
    pipeline_schedule(deepseek.PRESETS["deepseek-v3"](), FakeMesh(), StepConfig(micro_batches=4))
