r"""Loss per character of trained runs on held-out text, so that models with different tokenizers compare.

  python -m experiments.studies.char_loss --runs=en=/tmp/studies/cpt/en,scratch=/tmp/studies/cpt/scratch \
      --texts=ja=../shared/data/text_ja/pretrain_ja.jsonl,en=../shared/data/text_en/pretrain_en.jsonl \
      --max_chars=20000 --out=/tmp/studies/cpt/char_loss

Each text is the validation split of its JSONL (the documents training holds out, by the same id hash and
val_fraction), in file order, cut at --max_chars characters. Each document is scored as BOS + its tokens in
windows of --window tokens (a window after the first sees no earlier context). Per run and text: characters,
tokens, tokens per character, loss per token and per character (nats; the sum of -log p over the text's tokens
divided by its tokens or characters) and bits per character. Writes `<out>.json`, `<out>.md` and `<out>.png`.
"""
from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jpllm_jax import eval as jeval
from jpllm_jax import models
from jpllm_jax.data import jsonl, pipeline

flags.DEFINE_list("runs", None, "name=workdir pairs (the latest checkpoint of each).", required=True)
flags.DEFINE_list("texts", None, "name=file.jsonl pairs.", required=True)
flags.DEFINE_integer("max_chars", 20000, "Characters of each text's validation split scored.")
flags.DEFINE_float("val_fraction", 0.05, "The training runs' data.val_fraction.")
flags.DEFINE_integer("window", 128, "Tokens per scored window.")
flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
flags.DEFINE_string("out", None, "Output path prefix (.json, .md, .png).", required=True)
FLAGS = flags.FLAGS


def held_out_docs(path: str, val_fraction: float, max_chars: int) -> list[str]:
  source = jsonl.JsonlSource(path)
  docs, total = [], 0
  for i in pipeline.split_indices(source, "validation", val_fraction):
    text = source[int(i)]["text"][:max_chars - total]
    docs.append(text)
    total += len(text)
    if total >= max_chars:
      break
  return docs


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll_sum(cfg, params, inputs_BT, targets_BT, mask_BT):
  logits = models.forward(cfg, params, inputs_BT, segment_ids=mask_BT.astype(jnp.int32))
  logp = models.token_log_probs(logits, targets_BT)
  return -jnp.sum(jnp.where(mask_BT, logp, 0.0)), jnp.sum(mask_BT)


def score(cfg, params, sp, docs: list[str], window: int, batch_size: int) -> dict:
  rows = []  # (inputs, targets) of at most `window` tokens.
  for text in docs:
    ids = [sp.bos_id()] + sp.encode(text)
    for start in range(0, len(ids) - 1, window):
      chunk = ids[start:start + window + 1]
      rows.append((chunk[:-1], chunk[1:]))
  nll, tokens = 0.0, 0
  for b in range(0, len(rows), batch_size):
    batch = rows[b:b + batch_size]
    inputs = np.zeros((batch_size, window), np.int32)
    targets = np.zeros((batch_size, window), np.int32)
    mask = np.zeros((batch_size, window), bool)
    for r, (x, y) in enumerate(batch):
      inputs[r, :len(x)], targets[r, :len(y)], mask[r, :len(y)] = x, y, True
    n, t = _nll_sum(cfg, params, jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(mask))
    nll, tokens = nll + float(n), tokens + int(t)
  chars = sum(len(d) for d in docs)
  return {"chars": chars, "tokens": tokens, "tokens_per_char": tokens / chars, "loss_per_token": nll / tokens,
          "loss_per_char": nll / chars, "bits_per_char": nll / chars / math.log(2)}


def plot(results: dict, texts: list[str], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = list(results)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for ax, key, label in ((axes[0], "loss_per_char", "loss per character (nats)"),
                         (axes[1], "tokens_per_char", "tokens per character")):
    width = 0.8 / len(texts)
    for j, text in enumerate(texts):
      xs = [i + (j - (len(texts) - 1) / 2) * width for i in range(len(runs))]
      ax.bar(xs, [results[r][text][key] for r in runs], width, label=text)
    ax.set_xticks(range(len(runs)), runs, rotation=20, fontsize=8)
    ax.set_ylabel(label)
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_yscale("log")  # the English model on Japanese is far above the rest.
  axes[0].legend(title="held-out text")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv):
  del argv
  runs = dict(pair.split("=", 1) for pair in FLAGS.runs)
  texts = {name: held_out_docs(path, FLAGS.val_fraction, FLAGS.max_chars)
           for name, path in (pair.split("=", 1) for pair in FLAGS.texts)}
  results = {}
  for name, workdir in runs.items():
    cfg, params, sp, info = jeval.load_model(workdir=workdir)
    results[name] = {"step": info["step"], "pieces": sp.get_piece_size(),
                     **{t: score(cfg, params, sp, docs, FLAGS.window, FLAGS.batch_size) for t, docs in texts.items()}}
    print(name, json.dumps(results[name]), flush=True)
  out = pathlib.Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
  head = "| run | step | pieces | " + " | ".join(f"{t} tok/char | {t} loss/tok | {t} loss/char" for t in texts) + " |"
  lines = [head, "|" + "---|" * (3 + 3 * len(texts))]
  for name, r in results.items():
    cells = [f"{r[t]['tokens_per_char']:.3f} | {r[t]['loss_per_token']:.3f} | {r[t]['loss_per_char']:.3f}"
             for t in texts]
    lines.append(f"| {name} | {r['step']} | {r['pieces']} | " + " | ".join(cells) + " |")
  table = "\n".join(lines) + "\n"
  out.with_suffix(".md").write_text(table)
  plot(results, list(texts), out.with_suffix(".png"))
  print(table + f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
  app.run(main)
