"""Shared test fixtures: tiny configs of every family and the path to the shared data.

Every test process compiles with `fake_devices.COMPILE_FLAGS` (put in XLA_FLAGS here, before any backend starts;
subprocesses inherit it). The shared data (`../shared/data`, or `$JPLLM_SHARED_DATA`) is required: without it the
session stops at the start with one message naming the path, instead of tests skipping or failing one by one."""
from __future__ import annotations

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from fake_devices import COMPILE_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {COMPILE_FLAGS}".strip()

from jpllm_jax.models import gpt, llama, mistral, qwen2  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("JPLLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_sessionstart(session):
  if not SHARED_DATA.is_dir():
    raise pytest.UsageError(f"the tests read shared data from {SHARED_DATA}, which is not a directory: put the "
                            "shared data there (see the README) or set JPLLM_SHARED_DATA to where it is")

TINY = dict(vocab_size=101, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64, init_std=0.3)


def tiny_configs():
  """One small config per family and variant, with weights large enough for distinct logits."""
  return {
      "llama2": llama.llama2(**TINY, n_kv_heads=4),
      "llama3": llama.llama3(**TINY, n_kv_heads=2),
      "mistral": mistral.mistral(**TINY, n_kv_heads=2, sliding_window=5),
      "qwen2": qwen2.qwen2(**TINY, n_kv_heads=2, tie_embeddings=True),
      "gpt": gpt.gpt(**{**TINY, "d_ff": 128}, n_kv_heads=4),
  }


@pytest.fixture(params=sorted(tiny_configs()))
def tiny_config(request):
  return tiny_configs()[request.param]
