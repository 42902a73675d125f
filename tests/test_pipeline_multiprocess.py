"""Multi-host pipeline: `stage=2` across 2 local processes (jax.distributed, gloo collectives on CPU; one device
each, so every ppermute between the stages crosses the processes) equals 1 process: loss and gradients within
1e-5 relative, and the parameters after two optimizer steps at a non-zero learning rate."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

from conftest import REPO
from fake_devices import rel_diff
from test_train_multiprocess import _free_port

SCRIPT = textwrap.dedent("""
    import sys, functools, jax, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec
    from jpllm_jax.models import llama
    from jpllm_jax.parallel import DEFAULT_RULES, axis_rules, initialize_distributed, make_mesh
    from jpllm_jax.train.optimizer import make_optimizer
    from jpllm_jax.train.step import (StepConfig, init_state, loss_and_grads, make_train_step,
                                      pipeline_loss_and_grads, pipeline_schedule, state_shardings)
    coordinator, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if coordinator != "-":
      initialize_distributed(coordinator, 2, pid)
    cfg = llama.llama3(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
                       rope_type="default", rope_scaling=())
    rng = np.random.default_rng(0)  # the same batch in every process (replicated over `stage`)
    B, T = 4, 16
    seg = np.ones((B, T), np.int32); seg[:, T // 2:] = 2; seg[0, -5:] = 0
    batch = dict(inputs=rng.integers(0, 64, (B, T)).astype(np.int32), targets=rng.integers(0, 64, (B, T)).astype(np.int32),
                 segment_ids=seg, positions=np.concatenate([np.arange(T // 2)] * 2)[None].repeat(B, 0).astype(np.int32),
                 weights=(seg > 0).astype(np.float32))
    tx, schedule = make_optimizer(1e-3, 0, 10)
    step_cfg = StepConfig(micro_batches=2, pipeline="1f1b")
    mesh = make_mesh({"stage": jax.device_count()})
    shard = state_shardings(cfg, tx, mesh)
    state = jax.jit(functools.partial(init_state, cfg, tx), out_shardings=shard)(jax.random.key(0))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = {k: jax.make_array_from_process_local_data(replicated, v) for k, v in batch.items()}
    sched = pipeline_schedule(cfg, mesh, step_cfg)
    if sched is None:
      fn = lambda p, b: loss_and_grads(cfg, p, b, z_loss=1e-4, micro_batches=2)
    else:
      fn = lambda p, b: pipeline_loss_and_grads(cfg, p, b, mesh=mesh, schedule=sched, z_loss=1e-4)
    with axis_rules(mesh, DEFAULT_RULES):
      m, g = jax.jit(fn, out_shardings=(replicated, shard["params"]))(state["params"], batch)
    step = make_train_step(cfg, tx, schedule, step_cfg, mesh)
    state, _ = step(state, batch)
    state, m2 = step(state, batch)
    host = lambda t: jax.tree.map(np.asarray, multihost_utils.process_allgather(t, tiled=True))
    g, params, loss = host(g), host(state["params"]), [float(m["loss"]), float(m2["loss"])]
    if pid == 0:
      leaves = {f"g{i}": x for i, x in enumerate(jax.tree.leaves(g))}
      leaves.update({f"p{i}": x for i, x in enumerate(jax.tree.leaves(params))})
      np.savez(out, loss=np.asarray(loss), processes=jax.process_count(), stage=mesh.shape["stage"], **leaves)
""")


def _run(args: list[list[str]], tmp_path) -> None:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": os.pathsep.join([str(REPO), os.path.join(str(REPO), "tests")])}
  procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, *a], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for a in args]
  for p in procs:
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out[-4000:]


def test_stage2_across_two_processes_equals_one_process(tmp_path):
  port = _free_port()
  _run([[f"localhost:{port}", str(i), str(tmp_path / "multi.npz")] for i in range(2)], tmp_path)
  _run([["-", "0", str(tmp_path / "single.npz")]], tmp_path)
  got, want = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
  assert int(got["processes"]) == 2 and int(got["stage"]) == 2 and int(want["stage"]) == 1
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  for kind in "gp":
    keys = sorted((k for k in want.files if k[0] == kind and k[1:].isdigit()), key=lambda k: int(k[1:]))
    diff = rel_diff([got[k] for k in keys], [want[k] for k in keys])
    assert diff < 1e-5, (kind, diff)
