"""The pipelined train step (mesh `stage` > 1) equals the single-device step on 8 fake CPU devices: loss and
gradients within 1e-5 relative, and the parameters after two optimizer steps at a non-zero learning rate."""
from __future__ import annotations

import textwrap

import pytest

from fake_devices import run_on_fake_devices, xla_flags

SCRIPT = textwrap.dedent("""
    from fake_devices import packed_batch, rel_diff
    import functools, jax, numpy as np
    from jpllm_jax import models
    from jpllm_jax.models import llama, gpt
    from jpllm_jax.parallel import DEFAULT_RULES, axis_rules, make_mesh
    from jpllm_jax.train.optimizer import make_optimizer
    from jpllm_jax.train.step import (StepConfig, batch_sharding, init_state, loss_and_grads, make_train_step,
                                      pipeline_loss_and_grads, pipeline_schedule, state_shardings)

    tiny = dict(vocab_size=64, d_model=32, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)
    MODELS = {"llama": llama.llama3(**tiny, rope_type="default", rope_scaling=()),
              "gpt": gpt.gpt(**{**tiny, "n_kv_heads": 4}),  # biases, LayerNorm, learned positions, tied head
              # DeepSeek-style: 1 dense + 3 MoE layers (uneven over 2 stages), MLA, MTP on the last stage, dropless.
              "deepseek": models.preset("deepseek-v3", **{**tiny, "n_layers": 4}, q_lora_rank=16, kv_lora_rank=16,
                                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_d_ff=8,
                                        first_k_dense=1, n_experts=8, n_group=4, topk_group=2, n_experts_per_tok=2,
                                        mtp_depth=1, rope_type="default", rope_scaling=(), moe_aux_loss_coef=1e-2,
                                        router_z_loss_coef=1e-3)}
    tx, schedule = make_optimizer(1e-3, 0, 10)  # no warm-up: both steps update the parameters

    def run(cfg, sizes, step_cfg, batch):
      mesh = make_mesh(sizes, jax.devices()[:1] if sizes == {"data": 1} else jax.devices())
      shard = state_shardings(cfg, tx, mesh)
      state = jax.jit(functools.partial(init_state, cfg, tx), out_shardings=shard)(jax.random.key(0))
      sched = pipeline_schedule(cfg, mesh, step_cfg)
      mtp = dict(mtp_loss_coef=step_cfg.mtp_loss_coef)
      if sched is None:
        fn = lambda p, b: loss_and_grads(cfg, p, b, z_loss=1e-4, micro_batches=step_cfg.micro_batches, **mtp)
      else:
        fn = lambda p, b: pipeline_loss_and_grads(cfg, p, b, mesh=mesh, schedule=sched, z_loss=1e-4, **mtp)
      grads_fn = jax.jit(fn, in_shardings=(shard["params"], batch_sharding(mesh)), out_shardings=(None, shard["params"]))
      with axis_rules(mesh, DEFAULT_RULES):
        m, g = grads_fn(state["params"], batch)
      step = make_train_step(cfg, tx, schedule, step_cfg, mesh)
      state, _ = step(state, batch)
      state, m2 = step(state, batch)
      keys = [k for k in ("loss", "ce", "moe_loss", "mtp_loss") if k in m]
      return ([float(m[k]) for k in keys] + [float(m2["loss"])], jax.tree.map(np.asarray, g),
              jax.tree.map(np.asarray, state["params"]), np.asarray(m.get("expert_load", 0.0)))

    REFS = {}  # the one-device runs, shared by the cases of a model (same batch, same reference micro-batches)
    def check(name, sizes, pipeline="1f1b", micro=4, virtual=1):
      cfg = MODELS[name]
      batch = packed_batch(np.random.default_rng(0), cfg.vocab_size)
      # MoE statistics are per micro-batch: the reference accumulates the same micro-batches on one device.
      ref_micro = micro if cfg.moe.n_experts else 1
      if (name, ref_micro) not in REFS:
        REFS[name, ref_micro] = run(cfg, {"data": 1}, StepConfig(micro_batches=ref_micro), batch)
      ref = REFS[name, ref_micro]
      got = run(cfg, sizes, StepConfig(micro_batches=micro, pipeline=pipeline, virtual_stages=virtual), batch)
      dl = max(abs(a - b) / abs(b) for a, b in zip(got[0], ref[0]))
      dg, dp, dload = rel_diff(got[1], ref[1]), rel_diff(got[2], ref[2]), float(np.abs(got[3] - ref[3]).max())
      print(name, sizes, pipeline, "M", micro, "V", virtual, "loss rel diff %.1e grad %.1e params after 2 steps %.1e"
            " expert load %.1e" % (dl, dg, dp, dload))
      assert len(got[0]) == len(ref[0]) and dl < 1e-5 and dg < 1e-5 and dp < 1e-5 and dload < 1e-6, (
          name, sizes, pipeline, dl, dg, dp, dload)

    CASES
    print("OK")
""")


def _run(cases: str) -> None:
  run_on_fake_devices(SCRIPT.replace("CASES", textwrap.dedent(cases)), devices=8, timeout=900)


@pytest.mark.slow
def test_pipelined_steps_equal_one_device():
  """1F1B over 8 stages, GPipe and interleaved (V=2) over stage 4 x data 2, and 1F1B over stage 2 x fsdp 2 x
  tensor 2 (the GPT block): one subprocess, the one-device reference of each model computed once."""
  _run("""
    check("llama", {"stage": 8}, "1f1b", micro=8)
    check("llama", {"stage": 4, "data": 2}, "gpipe")
    check("llama", {"stage": 4, "data": 2}, "interleaved", micro=4, virtual=2)
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
  with pytest.raises(ValueError, match=r"n_layers=61 does not split .* use n_layers=60 or 64"):  # dense + MoE
    pipeline_schedule(deepseek.PRESETS["deepseek-v3"](), FakeMesh(), StepConfig(micro_batches=4))
  fp8_cfg = cfg.replace(n_layers=8, matmul="fp8_blockwise")
  with pytest.raises(ValueError, match="model.matmul=default only"):
    pipeline_schedule(fp8_cfg, FakeMesh(), StepConfig(micro_batches=4))


@pytest.mark.slow
def test_experiments_train_stage4_data2_gives_the_one_device_losses(tmp_path, monkeypatch):
  """`experiments.train --config.mesh.stage=4 --config.mesh.data=2` (8 fake devices, 1F1B over 4 micro-batches)
  logs the loss curve of the same run on one device within 1e-4 relative."""
  from jpllm_jax.tokenizer import mistral_v1_path
  from train_subprocess import launch_train, logged_losses

  run = {"data.tokenizer": mistral_v1_path(), "data.seq_len": 32, "model.d_model": 32, "model.n_layers": 4,
         "model.n_heads": 2, "model.n_kv_heads": 2, "model.d_ff": 64, "train.steps": 4, "train.batch_size": 8,
         "train.log_every": 1, "train.eval_every": 0, "train.checkpoint_every": 1000, "train.peak_tflops": 1.0,
         "optim.warmup_steps": 2}
  procs = {}
  for name, devices, extra in (("one", 1, {}), ("pipelined", 8, {"mesh.stage": 4, "mesh.data": 2,
                                                                   "train.micro_batches": 4})):
    monkeypatch.setenv("XLA_FLAGS", xla_flags(devices))
    procs[name] = launch_train(tmp_path / name, {**run, **extra})
  for name, proc in procs.items():
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, (name, out[-4000:])
    if name == "pipelined":
      assert "pipeline 1f1b: S=4 V=1 M=4" in out, out[-4000:]
  got, want = logged_losses(tmp_path / "pipelined"), logged_losses(tmp_path / "one")
  assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
  for (step, g), (_, w) in zip(got, want):
    assert abs(g - w) <= 1e-4 * abs(w), (step, g, w)
