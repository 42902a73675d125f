"""Deviceless TPU compile: fp8_matmul's forward and FP8 backward (Mosaic kernels) for v5p:2x2x1, data-parallel
under shard_map, compiled ahead of time with libtpu on this CPU machine; the cost analysis goes to the output.

It runs in a subprocess so the other tests' process never loads libtpu."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from kernels_pallas.fp8_gemm import fp8_matmul
devs = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
mesh = Mesh(np.array(devs), ("data",))
rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
def loss(x, w):
  y = jax.shard_map(lambda x, w: fp8_matmul(x, w, backend="mosaic"), mesh=mesh, in_specs=(P("data"), P()),
                    out_specs=P("data"))(x, w)
  return jnp.sum(y.astype(jnp.float32) ** 2)
f = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(rows, rep), out_shardings=(rows, rep))
lowered = f.lower(jax.ShapeDtypeStruct((2048, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((1024, 768), jnp.bfloat16))
compiled = lowered.compile()
print("devices", len(devs), devs[0].device_kind)
print("mosaic_calls", lowered.as_text().count("tpu_custom_call"))
print("all_reduce", "all-reduce" in compiled.as_text())
print("cost_analysis", compiled.cost_analysis())
print("memory_analysis", compiled.memory_analysis())
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (requirements.txt pins it)")
def test_fp8_matmul_grad_compiles_for_v5p():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             TPU_WORKER_HOSTNAMES="localhost", TPU_ACCELERATOR_TYPE="v5p-8")  # quiets libtpu's host probing
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
  print(proc.stdout)
  assert proc.returncode == 0, proc.stderr[-5000:]
  out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
  assert out["devices"].startswith("4 ")
  assert out["mosaic_calls"] == "3"  # forward, dgrad and wgrad are all the Pallas kernel
  assert out["all_reduce"] == "True"  # dw summed over the data axis
  assert "flops" in out["cost_analysis"] and "temp_size_in_bytes" in out["memory_analysis"]
