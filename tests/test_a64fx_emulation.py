"""tools/a64fx/run.sh: the aarch64 environment built from package registries, the SVE batched-GEMM FFI kernel
cross-compiled (SVE `fmla z` in its object code), a tiny GPT's forward, one train step and the batched GEMM path
(on the SVE kernel there) under `qemu-aarch64-static -cpu a64fx`, equal to the native XLA results (1e-5).

Slow: minutes (XLA compiling under emulation), plus about one to three minutes of downloads the first time (cached
under $JPLLM_A64FX_CACHE, default ~/.cache/jpllm-a64fx). Without the registries the environment cannot be built and the
test fails with the script's reason."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO


@pytest.mark.slow
def test_a64fx_smoke_under_emulation_equals_native():
  proc = subprocess.run(["bash", "tools/a64fx/run.sh"], cwd=REPO, capture_output=True, text=True, timeout=1800)
  tail = (proc.stdout + proc.stderr)[-3000:]
  assert proc.returncode == 0, f"tools/a64fx/run.sh exited {proc.returncode}:\n{tail}"
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  print(summary)
  assert summary["ok"] and summary["max_rel_diff"] <= 1e-5, tail
  assert summary["sve_fmla"] >= 1, tail
