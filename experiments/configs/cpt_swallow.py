r"""Swallow-style continual pre-training in one command: grow an HF Llama's vocabulary with Japanese pieces and
continue training on a 9:1 Japanese/English mix.

  python -m experiments.train --config=experiments/configs/cpt_swallow.py --workdir=/tmp/jpllm-cpt \
      --config.export_hf=/tmp/jpllm-cpt-hf
  python -m experiments.train --config=experiments/configs/cpt_swallow.py:/models/Llama-2-7b-hf --workdir=DIR \
      --config.expand_vocab=11176 --config.train.steps=25000 ...

Without a directory after the colon the base is a tiny random HF Llama with the Mistral-7B tokenizer, built
locally once into $TMPDIR/jpllm-tiny-llama (`tiny_hf_llama`), so the whole path runs on CPU in minutes.

Settings (Fujii et al. 2024, "Continual Pre-Training for Cross-Lingual LLM Adaptation", arXiv:2404.17790):
- from the paper: vocabulary expansion of Llama 2's tokenizer by Japanese BPE pieces with each new embedding
  and head row the mean of its base pieces' rows; a Japanese:English mix of 9:1; AdamW (b1 0.9, b2 0.95,
  eps 1e-8), weight decay 0.1, gradient clipping 1.0, cosine schedule with linear warm-up, peak lr 1e-4 for
  7B/13B. These are our optimizer's RECIPE values too (jpllm_jax/train/optimizer.py). We could not recheck
  the paper's hyperparameter table with our search tool (only its abstract and the 9:1 mix came back), so
  check the lr and warm-up there before a large run.
- our choices: the decay floor (min_lr_ratio 0.1), the tiny model, N = 500 pieces, 100 steps of batch 8 x 256
  tokens with a 10-step warm-up, and the data (../shared/data's pretrain_ja.jsonl and pretrain_en.jsonl).
"""
from __future__ import annotations

import os
import shutil

import ml_collections

from jpllm_jax.train import config as run_config

_SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))
JA = os.path.join(_SHARED, "text_ja", "pretrain_ja.jsonl")
EN = os.path.join(_SHARED, "text_en", "pretrain_en.jsonl")


def tiny_hf_llama(path: str, seed: int = 0) -> str:
  """A random float32 HF Llama (2 layers, d_model 64) with the Mistral-7B tokenizer (32,000 pieces) and its
  tokenizer.model, written to `path` unless it is there; returns `path`."""
  if os.path.exists(os.path.join(path, "config.json")):
    return path
  import torch
  import transformers
  from jpllm_jax.tokenizer import mistral_v1_path
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                    bos_token_id=1, eos_token_id=2)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  tmp = path + ".partial"
  model.save_pretrained(tmp)
  shutil.copyfile(mistral_v1_path(), os.path.join(tmp, "tokenizer.model"))
  os.replace(tmp, path)
  return path


def get_config(hf_dir: str | None = None) -> ml_collections.ConfigDict:
  """The run-config defaults with Swallow's settings; `hf_dir` (after the colon of --config) is the base."""
  c = run_config.defaults()
  tmp = os.environ.get("TMPDIR", "/tmp")
  c.init_from_hf = hf_dir or tiny_hf_llama(os.path.join(tmp, "jpllm-tiny-llama"))
  c.model = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32", remat="none"))
  c.expand_vocab = 500  # Swallow added 11,176 pieces to Llama 2's 32,000 (43,176).
  c.expand_vocab_from = JA  # the pieces are learned on Japanese text only.
  c.data.sources = f"{JA}=0.9,{EN}=0.1"  # Japanese:English 9:1, as Swallow mixed them.
  c.data.seq_len = 256
  c.train.update(steps=100, batch_size=8, log_every=10, eval_every=50, checkpoint_every=50)
  c.optim.update(lr=1e-4, warmup_steps=10, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                 clip_norm=1.0)
  c.eval.data_dir = os.path.join(_SHARED, "eval")
  return c
