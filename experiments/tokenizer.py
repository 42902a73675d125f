"""Tokenizer command line: train a SentencePiece model, expand a base vocabulary, or report statistics.

  python -m experiments.tokenizer train --input=GLOB_OR_LIST --vocab_size=N --output=DIR [--model_type=bpe]
  python -m experiments.tokenizer expand [--base=BASE.model] --input=... --add=N --output=DIR
  python -m experiments.tokenizer report --tokenizer=MODEL --input=... [--english=...]
  python -m experiments.tokenizer encode --tokenizer=MODEL --input=... --output=DIR [--workers=N]

`encode` writes a pre-tokenised directory (jpllm_jax/data/token_shards.py) that `--config.data.sources`
of the training launcher accepts in place of the JSONL files.

`expand` writes DIR/tokenizer.model plus the Hugging Face export (tokenizer.json, tokenizer_config.json) and
prints a JSON line; `report` prints one JSON line. --input takes comma-separated paths or globs.
"""
from __future__ import annotations

import glob
import json
import os

from absl import app, flags

from jpllm_jax.data.token_shards import write_token_shards
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.tokenizer.expand import expand_vocabulary, export_hf, report
from jpllm_jax.tokenizer.train import train_sentencepiece

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "JSONL files: comma-separated paths or globs.")
flags.DEFINE_string("output", None, "Output directory (train, expand).")
flags.DEFINE_integer("vocab_size", 32000, "train: vocabulary size.")
flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "train: SentencePiece model type.")
flags.DEFINE_integer("max_sentences", 2_000_000, "Lines sampled for training.")
flags.DEFINE_string("base", None, "expand: base SentencePiece BPE model (default: Mistral-7B v1).")
flags.DEFINE_integer("add", 16000, "expand: at most this many pieces are appended.")
flags.DEFINE_integer("learn_vocab_size", None, "expand: learned BPE vocabulary size (default add + 1000).")
flags.DEFINE_string("tokenizer", None, "report: SentencePiece model (default: Mistral-7B v1).")
flags.DEFINE_integer("workers", None, "encode: processes (default: all cores).")
flags.DEFINE_string("english", None, "report: English JSONL files (comma-separated paths or globs).")


def _expand_inputs(spec: str | None) -> list[str]:
  """Comma-separated paths or globs to a sorted, de-duplicated list of existing files."""
  if not spec:
    raise app.UsageError("--input is required")
  paths: list[str] = []
  for part in spec.split(","):
    part = part.strip()
    if not part:
      continue
    matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
    for p in matches:
      if not os.path.exists(p):
        raise app.UsageError(f"no such input: {p}")
      if p not in paths:
        paths.append(p)
  if not paths:
    raise app.UsageError(f"--input {spec!r} matched no files")
  return paths


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in ("train", "expand", "report", "encode"):
    raise app.UsageError("usage: python -m experiments.tokenizer {train,expand,report,encode} --flags")
  command = argv[1]
  if command == "report":
    english = _expand_inputs(FLAGS.english) if FLAGS.english else None
    print(json.dumps(report(FLAGS.tokenizer or mistral_v1_path(), _expand_inputs(FLAGS.input),
                            english_paths=english), ensure_ascii=False))
    return
  if not FLAGS.output:
    raise app.UsageError("--output is required")
  inputs = _expand_inputs(FLAGS.input)
  if command == "encode":
    meta = write_token_shards(inputs, FLAGS.tokenizer or mistral_v1_path(), FLAGS.output, workers=FLAGS.workers)
    print(json.dumps({k: meta[k] for k in ("documents", "tokens", "characters", "workers", "seconds")}))
    return
  if command == "train":
    path = train_sentencepiece(inputs, os.path.join(FLAGS.output, "tokenizer"), FLAGS.vocab_size,
                               model_type=FLAGS.model_type, max_sentences=FLAGS.max_sentences)
    print(json.dumps({"tokenizer": path}))
    return
  path = expand_vocabulary(FLAGS.base or mistral_v1_path(), inputs, FLAGS.add, FLAGS.output,
                           learn_vocab_size=FLAGS.learn_vocab_size, max_sentences=FLAGS.max_sentences)
  export_hf(path, FLAGS.output)
  print(json.dumps({"tokenizer": path, "hf_dir": FLAGS.output, **report(path, inputs)}, ensure_ascii=False))


if __name__ == "__main__":
  app.run(main)
