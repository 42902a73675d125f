"""Sharded training (8 fake CPU devices: dp, fsdp, tp and combinations) equals the single-device step."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent("""
    import functools, jax, jax.numpy as jnp, numpy as np
    from jpllm_jax.models import llama, gpt
    from jpllm_jax.parallel import DEFAULT_RULES, axis_rules, make_mesh
    from jpllm_jax.train.optimizer import make_optimizer
    from jpllm_jax.train.step import (StepConfig, batch_sharding, init_state, loss_and_grads, make_train_step,
                                  state_shardings)

    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    B, T = 8, 32
    def batch_for(vocab):
      seg = np.ones((B, T), np.int32); seg[:, T // 2:] = 2; seg[0, -5:] = 0  # two packed docs + padding
      pos = np.concatenate([np.arange(T // 2)] * 2)[None].repeat(B, 0).astype(np.int32)
      w = (seg > 0).astype(np.float32); w[:, T // 2 - 1] = 0
      return dict(inputs=rng.integers(0, vocab, (B, T)).astype(np.int32),
                  targets=rng.integers(0, vocab, (B, T)).astype(np.int32),
                  segment_ids=seg, positions=pos, weights=w)

    tiny = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64)
    models_ = {"llama": llama.llama3(**tiny, rope_type="default", rope_scaling=()),
               "gpt": gpt.gpt(**{**tiny, "n_kv_heads": 4})}
    layouts = [{"data": 8}, {"fsdp": 8}, {"tensor": 2, "data": 4}, {"data": 2, "fsdp": 2, "tensor": 2},
               {"fsdp": 4, "tensor": 2}]
    tx, schedule = make_optimizer(1e-3, 1, 10)

    def rel(a, b):
      a, b = jax.tree.leaves(a), jax.tree.leaves(b)
      num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in zip(a, b))
      den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in b)
      return (num / den) ** 0.5

    for name, cfg in models_.items():
      batch = batch_for(cfg.vocab_size)
      ref = None
      # Every layout for llama; the GPT block (biases, LayerNorm, tied head) on the 3-axis layout.
      runs = [(l, 1) for l in layouts] + [({"fsdp": 4, "tensor": 2}, 4)] if name == "llama" else [(layouts[3], 2)]
      for sizes, micro in [({"data": 1}, 1)] + runs:
        devices = jax.devices()[:1] if sizes == {"data": 1} else jax.devices()
        mesh = make_mesh(sizes, devices)
        shard = state_shardings(cfg, tx, mesh)
        state = jax.jit(functools.partial(init_state, cfg, tx), out_shardings=shard)(jax.random.key(0))
        grads_fn = jax.jit(lambda p, b: loss_and_grads(cfg, p, b, z_loss=1e-4, micro_batches=micro),
                           in_shardings=(shard["params"], batch_sharding(mesh)), out_shardings=(None, shard["params"]))
        with axis_rules(mesh, DEFAULT_RULES):
          m, g = grads_fn(state["params"], batch)
        step = make_train_step(cfg, tx, schedule, StepConfig(micro_batches=micro), mesh)
        state, _ = step(state, batch)
        _, m2 = step(state, batch)
        got = (float(m["loss"]), float(m2["loss"]), jax.tree.map(np.asarray, g))
        if ref is None:
          ref = got
        dl = max(abs(got[0] - ref[0]) / ref[0], abs(got[1] - ref[1]) / ref[1])
        dg = rel(got[2], ref[2])
        print(name, sizes, "micro", micro, "loss rel diff %.1e" % dl, "grad rel diff %.1e" % dg)
        assert dl < 1e-5 and dg < 1e-5, (name, sizes, micro, dl, dg)
    print("OK")
""")


def test_sharded_train_steps_equal_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
  print(proc.stdout)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
  assert "OK" in proc.stdout
