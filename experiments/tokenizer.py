"""Tokenizer command line: train a SentencePiece model, expand a base vocabulary, or report statistics.

  python -m experiments.tokenizer train --input=GLOB_OR_LIST --vocab_size=N --output=DIR [--model_type=bpe]
  python -m experiments.tokenizer expand [--base=BASE.model | --hf_dir=HF_DIR] --input=... --add=N --output=DIR
  python -m experiments.tokenizer report --tokenizer=MODEL --input=... [--english=...]
  python -m experiments.tokenizer encode --tokenizer=MODEL --input=... --output=DIR [--workers=N]

`encode` writes a pre-tokenised directory (jpllm_jax/data/token_shards.py) that `--config.data.sources`
of the training launcher accepts in place of the JSONL files.

`expand` writes DIR/tokenizer.model plus the Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json; they encode `[bos] + ids + [eos]` as training does) and prints a JSON line. The base is
--base, else with --hf_dir the model's own HF_DIR/tokenizer.model, else (logged) Mistral-7B v1. With --hf_dir,
DIR becomes a complete expanded HF model: the weights with embedding and head grown to the new vocabulary (new
rows the mean of their base pieces, padded to a multiple of 128), config.json and generation_config.json with
the special token ids, and the tokenizer files. `report` prints one JSON line. --input takes comma-separated
paths or globs; unreadable lines (broken JSON, no text field, invalid UTF-8) are skipped, logged as file:line
and counted, as in training.
"""
from __future__ import annotations

import glob
import json
import os

from absl import app, flags, logging

from jpllm_jax.data.token_shards import write_token_shards
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.tokenizer.expand import expand_vocabulary, export_hf, report
from jpllm_jax.tokenizer.hf_model import base_tokenizer_of, expand_hf_model
from jpllm_jax.tokenizer.train import corpus, skipped_lines, train_sentencepiece

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "JSONL files: comma-separated paths or globs.")
flags.DEFINE_string("output", None, "Output directory (train, expand).")
flags.DEFINE_integer("vocab_size", 32000, "train: vocabulary size.")
flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "train: SentencePiece model type.")
flags.DEFINE_integer("max_sentences", 2_000_000, "Lines sampled for training.")
flags.DEFINE_string("base", None, "expand: base SentencePiece BPE model (default: HF_DIR/tokenizer.model with "
                    "--hf_dir, else Mistral-7B v1).")
flags.DEFINE_string("hf_dir", None, "expand: base Hugging Face model directory; --output becomes the expanded "
                    "model (weights and tokenizer files).")
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


def _log_skipped(inputs: list[str]) -> dict[str, int]:
  """Logs and returns the input line counts: how many lines were read and skipped, by reason."""
  stats = corpus(inputs).stats
  log = logging.warning if skipped_lines(stats) else logging.info
  log("input: %d documents from %d lines, %d lines skipped %s (each logged above as file:line)", stats["read"],
      stats["lines"], skipped_lines(stats), {k: v for k, v in stats.items() if k.startswith("skipped_")})
  return stats


def _base_tokenizer() -> str:
  """--base, else the --hf_dir model's own tokenizer, else Mistral-7B v1; logs which."""
  if FLAGS.base:
    base, why = FLAGS.base, "--base"
  elif FLAGS.hf_dir:
    try:
      base, why = base_tokenizer_of(FLAGS.hf_dir), "the --hf_dir model's own tokenizer"
    except FileNotFoundError as e:
      raise app.UsageError(f"{e} with --base") from None
  else:
    base, why = mistral_v1_path(), "the default Mistral-7B v1 (mistral-common); pass --base or --hf_dir for another"
  logging.info("base tokenizer: %s (%s)", base, why)
  return base


def _expand(inputs: list[str]) -> dict:
  if FLAGS.hf_dir and os.path.abspath(FLAGS.hf_dir) == os.path.abspath(FLAGS.output):
    raise app.UsageError("--output must differ from --hf_dir (the base model is read from it)")
  base = _base_tokenizer()
  try:
    path = expand_vocabulary(base, inputs, FLAGS.add, FLAGS.output, learn_vocab_size=FLAGS.learn_vocab_size,
                             max_sentences=FLAGS.max_sentences)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  out = {"tokenizer": path, "base": base, "output": FLAGS.output}
  if FLAGS.hf_dir:
    cfg = expand_hf_model(FLAGS.hf_dir, path, FLAGS.output, base_tokenizer=base)
    out["model_vocab_size"] = cfg.vocab_size
  else:
    export_hf(path, FLAGS.output)
  return {**out, **report(path, inputs)}


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in ("train", "expand", "report", "encode"):
    raise app.UsageError("usage: python -m experiments.tokenizer {train,expand,report,encode} --flags")
  command = argv[1]
  if command == "report":
    english = _expand_inputs(FLAGS.english) if FLAGS.english else None
    out = report(FLAGS.tokenizer or mistral_v1_path(), _expand_inputs(FLAGS.input), english_paths=english)
    _log_skipped(_expand_inputs(FLAGS.input))
    print(json.dumps(out, ensure_ascii=False))
    return
  if not FLAGS.output:
    raise app.UsageError("--output is required")
  inputs = _expand_inputs(FLAGS.input)
  if command == "encode":
    meta = write_token_shards(inputs, FLAGS.tokenizer or mistral_v1_path(), FLAGS.output, workers=FLAGS.workers)
    print(json.dumps({k: meta[k] for k in ("documents", "tokens", "characters", "workers", "seconds")}))
    return
  if command == "train":
    try:
      path = train_sentencepiece(inputs, os.path.join(FLAGS.output, "tokenizer"), FLAGS.vocab_size,
                                 model_type=FLAGS.model_type, max_sentences=FLAGS.max_sentences,
                                 size_name="--vocab_size")
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    _log_skipped(inputs)
    print(json.dumps({"tokenizer": path}))
    return
  out = _expand(inputs)
  _log_skipped(inputs)
  print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
  app.run(main)
