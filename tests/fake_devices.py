"""Multi-device checks on one CPU: a script run in a subprocess with N fake XLA host devices.

The scripts import `rel_diff` and `packed_batch` from here (the subprocess has the repository and this folder on
its path). Every test process compiles with `COMPILE_FLAGS` (conftest sets them for the session, `xla_flags` for a
subprocess that sets its own device count). Subprocesses are bounded by the work they do, not by the wall clock
(`run_bounded`), so a busy machine slows a test down without failing it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
WALL_FACTOR = 4  # the hard cap: `WALL_FACTOR` x the budget in wall-clock seconds, whatever the load.
# XLA:CPU's LLVM backend at -O0: the tests' tiny programs spend most of their time compiling, and LLVM's
# optimisations (vectorisation, unrolling) cost about half of that CPU time (expert-parallel test: 243 -> 133 CPU s).
# No fast-math either way; the equality tests' measured differences stay as they were (e.g. 1.4e-6 -> 1.5e-6).
# tools/a64fx/run.sh runs at -O0 for the same reason.
COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test process: `COMPILE_FLAGS`, and `devices` fake host devices where given."""
  return COMPILE_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")


def _cpu_seconds(pid: int) -> float | None:
  """User + system CPU seconds of a running process (all its threads), from /proc; None where there is none."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15).


def run_bounded(args: list[str], budget_s: float, **popen_kwargs) -> subprocess.CompletedProcess:
  """Runs `args` (stdout and stderr captured as text) until it exits; raises subprocess.TimeoutExpired when it
  has used `budget_s` seconds of every core's CPU time (`budget_s` x cores: the work an idle machine does in
  `budget_s`), or ran `WALL_FACTOR` x `budget_s` wall-clock seconds (a hang, or a machine too busy to test on).

  A fixed wall-clock timeout fails a test on a shared machine where the suite runs several times slower; its
  CPU time is what the test's work costs, whatever the load.
  """
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  cpu_budget, wall_cap = budget_s * cores, WALL_FACTOR * budget_s
  start = time.monotonic()
  with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs) as proc:
    while True:
      try:
        out, err = proc.communicate(timeout=1.0)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)
      except subprocess.TimeoutExpired:
        cpu, wall = _cpu_seconds(proc.pid), time.monotonic() - start
        reason = ("wall-clock cap" if wall > wall_cap else
                  "CPU budget" if (cpu if cpu is not None else wall) > cpu_budget else None)
        if reason:
          proc.kill()
          out, err = proc.communicate()
          used = f"{wall:.0f} s wall, {cpu or 0:.0f} CPU s"
          raise subprocess.TimeoutExpired(args, wall, out, f"{err}\nstopped at the {reason} after {used} (budget "
                                          f"{budget_s} s: {cpu_budget:.0f} CPU s, {wall_cap:.0f} s wall)") from None


def run_on_fake_devices(script: str, devices: int = 8, timeout: int = 900) -> str:
  """Runs `script` with `devices` fake CPU devices; asserts it exits 0 and prints OK; returns its stdout.
  `timeout`: the script's budget on an idle machine (`run_bounded`)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO, TESTS]))
  proc = run_bounded([sys.executable, "-c", script], timeout, env=env)
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


def packed_batch(rng: np.random.Generator, vocab: int, batch: int = 8, length: int = 16, pad: int = 5) -> dict:
  """A packed int32 batch of random tokens: two documents per row (segments 1 and 2, positions restarting at
  `length // 2`), the last `pad` tokens of row 0 padding (segment 0, weight 0), and the first document's last
  token unweighted (its target would be the next document's first token)."""
  if length % 2 or not 0 <= pad < length // 2:
    raise ValueError(f"packed_batch needs an even length and 0 <= pad < length // 2; got length={length}, pad={pad}")
  seg = np.ones((batch, length), np.int32)
  seg[:, length // 2:] = 2
  seg[0, length - pad:] = 0
  pos = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(batch, 0).astype(np.int32)
  w = (seg > 0).astype(np.float32)
  w[:, length // 2 - 1] = 0
  return dict(inputs=rng.integers(0, vocab, (batch, length)).astype(np.int32),
              targets=rng.integers(0, vocab, (batch, length)).astype(np.int32), segment_ids=seg, positions=pos,
              weights=w)
