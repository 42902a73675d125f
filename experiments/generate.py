r"""Forward pass and KV-cache generation demo on Japanese text (the main job is experiments.train).

Loads a model (a small random Llama-3-style model by default; with --hf_dir a Hugging Face directory of any
family `jpllm_jax.hf` imports; with --ckpt_dir an orbax checkpoint from experiments.convert or a training run's
WORKDIR/checkpoints), measures its loss on the first --num_docs documents of
../shared/data/text_ja/pretrain_ja.jsonl, and continues Japanese prompts with greedy or sampled decoding
(`jpllm_jax.generate.generate`), printing forward tokens/s and generation time.

  python -m experiments.generate                         # tiny random Llama, Mistral tokenizer, on CPU
  python -m experiments.generate --hf_dir=/models/Swallow-7b-hf --prompt='日本で一番高い山は' \
      --max_new_tokens=32 --tokenizer=/models/Swallow-7b-hf/tokenizer.model
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from jpllm_jax import models
from jpllm_jax.generate import generate
from jpllm_jax.models import llama
from jpllm_jax.tokenizer import load_tokenizer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_DATA = os.path.join(_REPO, "..", "shared", "data", "text_ja", "pretrain_ja.jsonl")

flags.DEFINE_string("hf_dir", None, "Hugging Face model directory to import (config.json + safetensors).")
flags.DEFINE_string("ckpt_dir", None, "Orbax checkpoint directory written by experiments.convert or training.")
flags.DEFINE_string("tokenizer", None, "SentencePiece model; default: Mistral-7B's from mistral-common.")
flags.DEFINE_string("data", _DEFAULT_DATA, "JSONL file with a `text` field, for the loss measurement.")
flags.DEFINE_integer("num_docs", 8, "Documents of --data to measure the loss on.")
flags.DEFINE_integer("seq_len", 256, "Tokens per document for the loss measurement.")
flags.DEFINE_multi_string("prompt", ["日本で一番高い山は", "東京大学は"], "Prompts to continue (repeatable).")
flags.DEFINE_integer("max_new_tokens", 24, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 for greedy decoding.")
flags.DEFINE_integer("top_k", None, "Top-k sampling.")
flags.DEFINE_float("top_p", None, "Nucleus sampling.")
flags.DEFINE_string("dtype", "float32", "Compute dtype (float32 or bfloat16).")
flags.DEFINE_integer("seed", 0, "Seed for the random model and for sampling.")
FLAGS = flags.FLAGS


def _load_model(vocab_size: int):
  if FLAGS.hf_dir:
    from jpllm_jax import hf
    cfg, params = hf.load_pretrained(FLAGS.hf_dir)
  elif FLAGS.ckpt_dir:
    from jpllm_jax import checkpoint
    cfg, params = checkpoint.load_params(FLAGS.ckpt_dir)
  else:
    cfg = llama.llama3(vocab_size=vocab_size, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=768,
                       max_seq_len=2048, rope_type="default", rope_scaling=())
    params = models.init(cfg, jax.random.key(FLAGS.seed))
  return cfg.replace(dtype=FLAGS.dtype), jax.tree.map(jnp.asarray, params)


def main(argv):
  del argv
  sp = load_tokenizer(FLAGS.tokenizer)
  cfg, params = _load_model(sp.vocab_size())
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  logging.info("model %s: %.1fM parameters", cfg.family, n_params / 1e6)

  texts = []
  with open(FLAGS.data, encoding="utf-8") as f:
    for line in f:
      texts.append(json.loads(line)["text"])
      if len(texts) == FLAGS.num_docs:
        break
  ids = [[sp.bos_id()] + sp.encode(t)[:FLAGS.seq_len - 1] for t in texts]
  tokens = np.zeros((len(ids), FLAGS.seq_len), np.int32)
  segments = np.zeros((len(ids), FLAGS.seq_len), np.int32)  # 0 marks padding.
  weights = np.zeros((len(ids), FLAGS.seq_len), np.float32)  # loss on predicting real next tokens.
  for i, row in enumerate(ids):
    tokens[i, :len(row)] = row
    segments[i, :len(row)] = 1
    weights[i, :len(row) - 1] = 1.0

  @jax.jit
  def loss_fn(params, tokens, segments, weights):
    logits = models.forward(cfg, params, tokens, segment_ids=segments)
    return models.cross_entropy(logits[:, :-1], tokens[:, 1:], weights[:, :-1])[1]["ce"]

  loss_fn(params, tokens, segments, weights).block_until_ready()
  t0 = time.perf_counter()
  loss = float(loss_fn(params, tokens, segments, weights))
  dt = time.perf_counter() - t0
  print(f"loss on {len(ids)} Japanese documents: {loss:.4f} "
        f"({weights.sum() / dt:,.0f} tokens/s forward on {jax.devices()[0].platform})")

  prompts = [[sp.bos_id()] + sp.encode(p) for p in FLAGS.prompt]
  gen_kwargs = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                    top_p=FLAGS.top_p, eos_id=sp.eos_id(), rng=jax.random.key(FLAGS.seed))
  generate(cfg, params, prompts, **gen_kwargs)  # compile
  t0 = time.perf_counter()
  outs = generate(cfg, params, prompts, **gen_kwargs)
  dt = time.perf_counter() - t0
  for p, o in zip(FLAGS.prompt, outs):
    print(f"{p} → {sp.decode(o)!r}")
  print(f"generated {sum(map(len, outs))} tokens in {dt:.2f}s")


if __name__ == "__main__":
  app.run(main)
