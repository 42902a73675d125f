r"""The main job: a small Llama trained from scratch on Japanese Wikipedia text, on CPU.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/jpllm-default

A SentencePiece tokenizer (8k unigram pieces, byte fallback) is trained on the fly on the source files
when `data.tokenizer` is empty. Every field can be overridden on the command line, e.g.
`--config.train.steps=1000 --config.model.d_model=512 --config.mesh.fsdp=-1`.
"""
from __future__ import annotations

import os

import ml_collections

_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # ModelConfig fields (jpllm_jax/models/config.py); vocab_size 0 = the tokenizer's, padded to vocab_multiple.
  c.model = ml_collections.ConfigDict(dict(
      family="llama", vocab_size=0, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=768,
      max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5, init_std=0.02, scaled_out_init=True,
      scale_embedding=False, tie_embeddings=False, dtype="float32", param_dtype="float32", remat="none"))
  c.model_vocab_multiple = 128
  c.init_from_hf = ""  # continual pre-training: an HF directory whose architecture replaces `model`.

  c.data = ml_collections.ConfigDict(dict(
      # Comma-separated `path[=weight]` sources, mixed by weight (e.g. Japanese and English as in Swallow).
      sources=os.path.normpath(os.path.join(_SHARED, "text_ja", "pretrain_ja.jsonl")),
      tokenizer="",  # a SentencePiece .model; empty: train one into <workdir>/tokenizer.
      tokenizer_vocab_size=8000,
      seq_len=256,
      val_fraction=0.05,
      shards=0,  # data shards (0: one per process); the same value gives the same batches on any host count.
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=200, batch_size=16, micro_batches=1, log_every=10, eval_every=25, eval_batches=4,
      checkpoint_every=50, keep_checkpoints=3, async_checkpoint=True,
      stop_after=0,  # > 0: leave the loop after this step (the schedule still spans `steps`), with a checkpoint.
      max_bad_steps=5, spike_factor=0.0, peak_tflops=0.0,  # 0: measure the matmul peak at start-up.
  ))
  # The LLM-jp recipe (jpllm_jax/train/optimizer.py); warm-up is 2000 steps in the full-size presets.
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
      z_loss=1e-4,
      # MoE / MTP models only (DeepSeek-V3's values): router-bias step gamma of the auxiliary-loss-free balancing,
      # and the weight lambda of the multi-token-prediction loss.
      router_bias_rate=0.001, mtp_loss_coef=0.3))
  # Japanese task evaluation every `every` steps (0: off) on the first `limit` examples, logged as eval/<task>.
  c.eval = ml_collections.ConfigDict(dict(
      every=0, tasks="jcommonsenseqa,jmmlu", scoring="loglik", limit=50, shots=4, loglik_norm="char",
      batch_size=8, max_len=0, data_dir=os.path.normpath(os.path.join(_SHARED, "eval"))))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  return c
