r"""Train presets: the published training settings of the seed's runs, for `experiments.preflight` and launches.

  python -m experiments.preflight --preset=llm-jp-3-172b --topology=v5p:8x8x16

`TRAIN[name]` holds run-config fields (jpllm_jax/train/config.py) where the run's settings are public; a preset
without an entry pre-flights at one 4k sequence per device (2k for the GPT-shaped v1 models).
"""
from __future__ import annotations

from typing import Any

import ml_collections

from jpllm_jax.train import config as run_config

# LLM-jp-3 (llm-jp/llm-jp-3-172b model card and LLM-jp's report arXiv:2407.03963): AdamW b1 0.9, b2 0.95,
# eps 1e-5, warm-up 2000 steps, cosine decay to 10% of the peak, global batch 1728 x 4096 tokens, TP4 x PP16.
LLM_JP = dict(optim=dict(b1=0.9, b2=0.95, eps=1e-5, warmup_steps=2000, min_lr_ratio=0.1),
              train=dict(batch_size=1728), data=dict(seq_len=4096))
TRAIN: dict[str, dict[str, Any]] = {
    # TP4 as published; its PP16 maps to `stage` once the pipeline layout is in the train step (fsdp until then).
    "llm-jp-3-172b": {**LLM_JP, "mesh": dict(tensor=4, data=1, fsdp=-1)},
    # Fugaku-LLM (DeepSpeedFugaku launch script): global batch 2016 x 2048, TP6 x PP8 x DP288 on 13,824 nodes.
    "fugaku-llm-13b": dict(train=dict(batch_size=2016), data=dict(seq_len=2048)),
}


def get_config(name: str, devices: int) -> ml_collections.ConfigDict:
  """The run config of preset `name` on `devices` chips: the defaults with the run's published settings."""
  from jpllm_jax import models  # pylint: disable=import-outside-toplevel
  cfg = models.preset(name)
  seq = 2048 if cfg.max_seq_len <= 2048 else 4096
  base = {"train": dict(batch_size=devices), "data": dict(seq_len=seq), "mesh": dict(data=1, fsdp=-1)}
  user = {k: {**base.get(k, {}), **v} for k, v in TRAIN.get(name, {}).items()}
  return run_config.with_defaults({**base, **user})
