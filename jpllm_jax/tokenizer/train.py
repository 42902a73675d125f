"""Trains a SentencePiece model on the `text` field of JSONL files (streamed, never loaded whole).

Settings follow the Llama / Mistral / LLM-jp family so that Japanese text round-trips exactly: identity
normalization (no NFKC: full-width characters stay full-width), whitespace kept as is, byte fallback for
characters outside the vocabulary, digits split one per piece, and unk=0, bos=1, eos=2, no pad piece.

Documents are read as training reads them (`corpus_texts`): broken JSON, a missing `text` field and invalid
UTF-8 are skipped, counted and logged with file:line, never a crash.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import sentencepiece as spm

from jpllm_jax.data.jsonl import JsonlSource
from jpllm_jax.data.pipeline import open_source


def corpus(jsonl_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> JsonlSource:
  """The valid documents of JSONL files, indexed once per process by the training pipeline's `open_source`
  (which logs each skipped line as file:line and counts them in `.stats`)."""
  source = open_source(jsonl_paths)
  if not isinstance(source, JsonlSource):
    raise ValueError(f"{jsonl_paths} is a pre-tokenised directory; the tokenizer tools read JSONL text")
  return source


def corpus_texts(jsonl_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> Iterator[str]:
  """The texts of `corpus(jsonl_paths)`, in file order."""
  source = corpus(jsonl_paths)
  for i in range(len(source)):
    yield source[i]["text"]


def skipped_lines(stats: dict[str, int]) -> int:
  """How many lines a `JsonlSource.stats` counts as skipped."""
  return sum(v for k, v in stats.items() if k.startswith("skipped_"))


def _sentences(jsonl_paths: Sequence[str | os.PathLike]) -> Iterator[str]:
  # One training sentence per non-empty line: SentencePiece drops sentences longer than
  # max_sentence_length bytes, and a document's lines are its natural units.
  for text in corpus_texts(jsonl_paths):
    for line in text.split("\n"):
      if line.strip():
        yield line


def _vocab_size_error(error: RuntimeError, size_name: str, size: int) -> ValueError | None:
  """SentencePiece's vocabulary-size errors, restated with our setting's name (None for other errors)."""
  msg = str(error)
  if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
    return ValueError(f"vocabulary size {size} ({size_name}) is too large for this corpus: at most {m[2]} pieces "
                      "can be learned from it; lower it or give more text")
  if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg):
    return ValueError(f"vocabulary size {size} ({size_name}) is smaller than the {m[2]} characters and control "
                      f"pieces of this corpus; raise it to at least {m[2]}")
  return None


def train_sentencepiece(jsonl_paths: str | os.PathLike | Sequence[str | os.PathLike], output_prefix: str,
                        vocab_size: int, *, model_type: str = "unigram", max_sentences: int = 2_000_000,
                        character_coverage: float = 0.9995, add_dummy_prefix: bool = False,
                        num_threads: int | None = None, size_name: str = "vocab_size") -> str:
  """Trains `<output_prefix>.model` (and `.vocab`) and returns the .model path.

  `max_sentences` lines are sampled (reservoir sampling over the whole stream) for training.
  `add_dummy_prefix` is off by default: Japanese does not separate words by spaces, so a "▁" before every
  document would only cost a piece (Llama's tokenizer has it on). A `vocab_size` this corpus cannot give
  raises ValueError naming `size_name` (the caller's name for the setting, e.g. a flag).
  """
  if isinstance(jsonl_paths, (str, os.PathLike)):
    jsonl_paths = [jsonl_paths]
  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(jsonl_paths),
        model_prefix=output_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=1,
    )
  except RuntimeError as e:
    if (error := _vocab_size_error(e, size_name, vocab_size)) is not None:
      raise error from None
    raise
  return output_prefix + ".model"
