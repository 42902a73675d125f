r"""Fugaku-LLM 13B's run as our config: the GPT preset (hidden 5184, 36 heads, 40 layers), global batch 2016 x
2048 tokens, and its TP6 x PP8 x DP288 layout as our mesh (tensor=6, stage=8, data=288; 13,824 processes):
7 sequences per data-parallel rank as 7 micro-batches of one through the 1F1B pipeline (40 layers, 5 per stage),
with full activation checkpointing: the seed's run hit "abnormal memory consumption" until it turned activation
checkpointing on. The analytic model agrees (experiments.fugaku.job, modelled): without it the 1F1B slots hold
7 + 3 micro-batches of every stored residual of a 5-layer stage, 43.0 GiB per process (does not fit 32 GiB);
with it 10.0 GiB.

  python -m experiments.train --config=experiments/fugaku/fugaku_llm_13b.py --workdir=DIR   # inside job.sh
  python -m experiments.fugaku.job --out=DIR   # writes job.sh and the rank map, checks the memory first
"""
from __future__ import annotations

import ml_collections

LAYOUT = dict(tensor=6, stage=8, data=288)
BATCH, SEQ, MICRO_BATCHES = 2016, 2048, 7
REMAT = "full"


def get_config() -> ml_collections.ConfigDict:
  from experiments.configs import presets  # pylint: disable=import-outside-toplevel
  from jpllm_jax import models  # pylint: disable=import-outside-toplevel
  c = presets.get_config("fugaku-llm-13b", 6 * 8 * 288)
  c.model = ml_collections.ConfigDict(models.preset("fugaku-llm-13b").to_dict())
  c.mesh.update(dict(fsdp=1, **LAYOUT))
  c.train.batch_size, c.data.seq_len = BATCH, SEQ
  c.train.micro_batches, c.train.pipeline = MICRO_BATCHES, "1f1b"
  c.model.remat = REMAT
  return c
