"""Multi-device checks on one CPU: a script run in a subprocess with N fake XLA host devices.

The scripts import `rel_diff` from here (the subprocess has the repository and this folder on its path)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def run_on_fake_devices(script: str, devices: int = 8, timeout: int = 900) -> str:
  """Runs `script` with `devices` fake CPU devices; asserts it exits 0 and prints OK; returns its stdout."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO, TESTS]))
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
  print(proc.stdout)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
  assert "OK" in proc.stdout
  return proc.stdout


def rel_diff(a, b) -> float:
  """Relative L2 distance |a - b| / |b| over all leaves of two pytrees (or two arrays), in float64."""
  import jax  # the scripts' jax, configured by their environment
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in zip(a, b))
  den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in b)
  return (num / max(den, 1e-60)) ** 0.5
