r"""Study 1: Adam eps 1e-8 vs 1e-5 (LLM-jp's change) with the LLM-jp recipe, 3 seeds each.

  python -m experiments.tokenizer train --input=../shared/data/text_ja/pretrain_ja.jsonl --vocab_size=8000 \
      --output=/tmp/studies/tok_ja8k
  nice -n 10 timeout 3600 python -m experiments.sweep --config=experiments/studies/adam_eps.py \
      --workdir=/tmp/studies/adam_eps --grid='optim.eps=1e-8,1e-5' --seeds=3 \
      --set='data.tokenizer=/tmp/studies/tok_ja8k/tokenizer.model'

The default config (Japanese Wikipedia text, the 8k unigram tokenizer, the recipe of jpllm_jax/train/optimizer.py:
AdamW b1 0.9, b2 0.95, weight decay 0.1, clipping 1.0, cosine to 10%) with the model cut to d_model 128 and
2 layers, batch 8 x 128 tokens and 100 steps, so that six runs fit in the study's CPU budget. The tokenizer is
trained once and shared (`--set`), so that the runs differ only in eps and seed. Validation loss every 10 steps
on the same 4 batches (16k tokens) of the held-out 5%.
"""
from __future__ import annotations

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model.update(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384)
  c.data.seq_len = 128
  c.train.update(steps=100, batch_size=8, log_every=10, eval_every=10, eval_batches=4, checkpoint_every=100,
                 keep_checkpoints=1)
  c.optim.update(lr=3e-3, warmup_steps=10)
  return c
