"""Expert parallelism inside pipeline stages (8 fake CPU devices): a DeepSeek-style tiny MoE (1 dense layer, 3 MoE
layers cut unevenly over 2 stages, MTP depth 1 on the last, MLA, dropless sigmoid router) at stage 2 x expert 4
equals the single-device step: loss, gradients and expert load, and the parameters after two optimizer steps.

Inside the pipeline's shard_map `expert` is manual like `data`: it splits each micro-batch's rows, the experts'
E is sharded over it, and a MoE layer exchanges tokens with all_to_all over `expert` inside its stage's branch.
The checks are `tests/test_train_pipeline.py`'s (its SCRIPT), with 2 micro-batches of 4 rows (one per expert
rank)."""
from __future__ import annotations

import textwrap

import pytest

from fake_devices import run_on_fake_devices
from test_train_pipeline import SCRIPT


@pytest.mark.slow
def test_deepseek_moe_mtp_at_stage2_expert4_equals_one_device():
  out = run_on_fake_devices(SCRIPT.replace("CASES", textwrap.dedent("""
      check("deepseek", {"stage": 2, "expert": 4}, "1f1b", micro=2)
      """)), devices=8, timeout=900)
  assert "deepseek {'stage': 2, 'expert': 4}" in out
