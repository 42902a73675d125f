r"""The main job: a small Llama trained from scratch on Japanese Wikipedia text, on CPU.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/jpllm-default

A SentencePiece tokenizer (8k unigram pieces, byte fallback) is trained on the fly on the source files
when `data.tokenizer` is empty. Every field can be overridden on the command line, e.g.
`--config.train.steps=1000 --config.model.d_model=512 --config.mesh.fsdp=-1`.
"""
from __future__ import annotations

import os

import ml_collections

from jpllm_jax.train import config as run_config

_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


def get_config() -> ml_collections.ConfigDict:
  """The defaults of every field (jpllm_jax/train/config.py) with this job's model, data and schedule."""
  c = run_config.defaults()
  c.model = ml_collections.ConfigDict(dict(  # ModelConfig fields (jpllm_jax/models/config.py).
      family="llama", vocab_size=0, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=768,
      max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5, init_std=0.02, scaled_out_init=True,
      scale_embedding=False, tie_embeddings=False, dtype="float32", param_dtype="float32", remat="none",
      matmul="default", fp8_exclude="embed,lm_head,router", fp8_from_step=0, fp8_amax_history=1024))
  c.data.sources = os.path.normpath(os.path.join(_SHARED, "text_ja", "pretrain_ja.jsonl"))
  c.data.seq_len = 256
  c.train.update(steps=200, batch_size=16)
  c.optim.update(lr=3e-3, warmup_steps=20)  # the full-size presets warm up over 2000 steps.
  c.eval.data_dir = os.path.normpath(os.path.join(_SHARED, "eval"))
  return c
