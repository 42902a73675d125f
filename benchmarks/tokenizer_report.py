"""Japanese vocabulary expansion of the Mistral-7B base: tokens/char before and after, English parity, speed.

Documents of pretrain_ja.jsonl are split by a hash of their id into learn (80%), select (10%) and measure (10%).
The base is expanded with pieces learned on the learn part for a few (add, learn_vocab_size) settings (<= 16,000
pieces); the best Japanese tokens/char on the select part wins, and the reported tokens/char is that setting's
on the measure part, which chose nothing (a figure from the split that picked the winner is biased low).
English parity uses deterministic English text (the Zen of Python and CPython's LICENSE.txt). Throughput:
`encode` of the measure texts on one thread. Prints progress lines and a final JSON line.

  python benchmarks/tokenizer_report.py [--quick]   (--quick: the first two settings only)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import sentencepiece as spm

from jpllm_jax.data.jsonl import split_value
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.tokenizer.expand import english_sample_texts, expand_vocabulary

JA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "text_ja",
                  "pretrain_ja.jsonl")
SETTINGS = [(16000, 18000), (16000, 16000), (16000, 12000), (16000, 8000), (8000, 8000)]  # (add, learn_vocab_size)


def tokens_per_char(sp: spm.SentencePieceProcessor, texts: list[str]) -> float:
  return sum(len(ids) for ids in sp.encode(texts, num_threads=1)) / sum(len(t) for t in texts)


def throughput(sp: spm.SentencePieceProcessor, texts: list[str], repeats: int = 3) -> float:
  chars = sum(len(t) for t in texts)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    sp.encode(texts, num_threads=1)
    best = min(best, time.perf_counter() - t0)
  return chars / best


def split(path: str) -> tuple[list[str], list[str], list[str]]:
  """(learn, select, measure) texts, by a hash of each document's id (80/10/10)."""
  learn, select, measure = [], [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      u = split_value(str(rec["id"]))
      (select if u < 0.1 else measure if u < 0.2 else learn).append(rec["text"])
  return learn, select, measure


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="try the first two settings only")
  settings = SETTINGS[:2] if ap.parse_args().quick else SETTINGS
  learn, select, measure = split(JA)
  base = spm.SentencePieceProcessor(model_file=mistral_v1_path())
  english = english_sample_texts()
  result = {"learn_docs": len(learn), "select_docs": len(select), "measure_docs": len(measure),
            "learn_chars": sum(map(len, learn)), "select_chars": sum(map(len, select)),
            "measure_chars": sum(map(len, measure)), "base_tokens_per_char": tokens_per_char(base, measure)}
  with tempfile.TemporaryDirectory() as tmp:
    learn_path = os.path.join(tmp, "learn.jsonl")
    with open(learn_path, "w", encoding="utf-8") as f:
      for text in learn:
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    tried = []
    best = None
    for add, learn_vocab in settings:
      out = os.path.join(tmp, f"a{add}_l{learn_vocab}")
      try:
        path = expand_vocabulary(mistral_v1_path(), learn_path, add, out, learn_vocab_size=learn_vocab)
      except RuntimeError as e:  # SentencePiece refuses a vocabulary the corpus cannot fill
        tried.append({"add": add, "learn_vocab_size": learn_vocab, "error": str(e).splitlines()[0][-160:]})
        print(tried[-1], file=sys.stderr)
        continue
      sp = spm.SentencePieceProcessor(model_file=path)
      row = {"add": add, "learn_vocab_size": learn_vocab, "added": sp.GetPieceSize() - base.GetPieceSize(),
             "select_tokens_per_char": tokens_per_char(sp, select)}
      tried.append(row)
      print(row, file=sys.stderr)
      if best is None or row["select_tokens_per_char"] < best[0]["select_tokens_per_char"]:
        best = (row, sp)
    if best is None:
      raise SystemExit("no setting trained")
    row, sp = best
    english_identical = all(sp.encode(t) == base.encode(t) for t in english)
    roundtrip = all(sp.decode(ids) == t for ids, t in zip(sp.encode(measure), measure))
    result.update(tried=tried, best=row, expanded_tokens_per_char=tokens_per_char(sp, measure),
                  english_paragraphs=len(english), english_identical=english_identical,
                  japanese_roundtrip_exact=roundtrip, chars_per_s_base=throughput(base, measure),
                  chars_per_s_expanded=throughput(sp, measure))
  result["goal_tokens_per_char"] = result["expanded_tokens_per_char"] <= 0.60
  result["goal_chars_per_s"] = result["chars_per_s_expanded"] >= 1e6
  print(json.dumps(result))


if __name__ == "__main__":
  main()
