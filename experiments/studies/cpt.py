r"""Study 2: continual pre-training (CPT) vs training from scratch on Japanese, with and without vocabulary
expansion, and what CPT forgets of English. One config, the arm after the colon; run_cpt.sh runs them all.

  W=/tmp/studies/cpt
  python -m experiments.tokenizer train --model_type=bpe --vocab_size=2000 \
      --input=../shared/data/text_en/pretrain_en.jsonl --output=$W/tok_en
  python -m experiments.train --config=experiments/studies/cpt.py:en --workdir=$W/en \
      --config.data.tokenizer=$W/tok_en/tokenizer.model --config.export_hf=$W/en_hf
  python -m experiments.train --config=experiments/studies/cpt.py:scratch --workdir=$W/scratch
  python -m experiments.train --config=experiments/studies/cpt.py:cpt --workdir=$W/cpt --config.init_from_hf=$W/en_hf
  python -m experiments.train --config=experiments/studies/cpt.py:cpt_expand --workdir=$W/cpt_expand \
      --config.init_from_hf=$W/en_hf
  python -m experiments.train --config=experiments/studies/cpt.py:cpt_mix_expand --workdir=$W/cpt_mix_expand \
      --config.init_from_hf=$W/en_hf
  python -m experiments.studies.char_loss --runs=en=$W/en,scratch=$W/scratch,... --out=$W/char_loss

Arms:
- en: a small Llama (d_model 128, 2 layers) trained 150 steps on the English text with a 2,000-piece English
  BPE tokenizer (byte fallback: Japanese costs about 3 tokens a character), exported as an HF model: the
  "English base model".
- scratch: the same architecture trained 100 steps on Japanese from random weights, with a 3,000-piece
  tokenizer trained on the Japanese text.
- cpt: the English model continued 100 steps on Japanese with its English tokenizer.
- cpt_expand: the same with 1,000 Japanese BPE pieces added (learned on the Japanese text; new embedding and head
  rows the mean of their base pieces', Swallow's method), 3,000 pieces in all.
- cpt_mix_expand: cpt_expand on Swallow's 9:1 Japanese/English mix.
Every Japanese arm has the same budget: 100 steps of 8 x 128 tokens, lr 3e-3 peak, 10 warm-up steps, the recipe
(AdamW b2 0.95, weight decay 0.1, clipping 1.0, cosine to 10%). Since the tokenizers differ, the arms are
compared by loss per character on the held-out 5% of each text (char_loss), not by loss per token.
"""
from __future__ import annotations

import os

import ml_collections

from jpllm_jax.train import config as run_config

_SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))
JA = os.path.join(_SHARED, "text_ja", "pretrain_ja.jsonl")
EN = os.path.join(_SHARED, "text_en", "pretrain_en.jsonl")
ARMS = ("en", "scratch", "cpt", "cpt_expand", "cpt_mix_expand")
MODEL = dict(family="llama", vocab_size=0, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384,
             max_seq_len=512, rope_theta=10000.0, norm_eps=1e-5, init_std=0.02, scaled_out_init=True,
             tie_embeddings=False, dtype="float32", param_dtype="float32", remat="none")


def get_config(arm: str = "scratch") -> ml_collections.ConfigDict:
  if arm not in ARMS:
    raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
  c = run_config.defaults()
  if arm in ("en", "scratch"):
    c.model = ml_collections.ConfigDict(MODEL)
  else:  # the architecture comes from --config.init_from_hf (the en arm's export).
    c.model = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32", remat="none"))
  c.data.sources = {"en": EN, "cpt_mix_expand": f"{JA}=0.9,{EN}=0.1"}.get(arm, JA)
  c.data.tokenizer_vocab_size = 3000  # scratch: trained on the fly on the Japanese text.
  if arm in ("cpt_expand", "cpt_mix_expand"):
    c.expand_vocab = 1000
    c.expand_vocab_from = JA
  c.data.seq_len = 128
  c.train.update(steps=150 if arm == "en" else 100, batch_size=8, log_every=10, eval_every=25, eval_batches=4,
                 checkpoint_every=50, keep_checkpoints=1)
  c.optim.update(lr=3e-3, warmup_steps=10)
  c.eval.data_dir = os.path.join(_SHARED, "eval")
  return c
