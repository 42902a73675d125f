"""Trains a SentencePiece model on the `text` field of JSONL files (streamed, never loaded whole).

Settings follow the Llama / Mistral / LLM-jp family so that Japanese text round-trips exactly: identity
normalization (no NFKC: full-width characters stay full-width), whitespace kept as is, byte fallback for
characters outside the vocabulary, digits split one per piece, and unk=0, bos=1, eos=2, no pad piece.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import sentencepiece as spm

from jpllm_jax.data.jsonl import iter_texts


def _sentences(jsonl_paths: Sequence[str | os.PathLike]) -> Iterator[str]:
  # One training sentence per non-empty line: SentencePiece drops sentences longer than
  # max_sentence_length bytes, and a document's lines are its natural units.
  for text in iter_texts(jsonl_paths):
    for line in text.split("\n"):
      if line.strip():
        yield line


def train_sentencepiece(jsonl_paths: str | os.PathLike | Sequence[str | os.PathLike], output_prefix: str,
                        vocab_size: int, *, model_type: str = "unigram", max_sentences: int = 2_000_000,
                        character_coverage: float = 0.9995, add_dummy_prefix: bool = False,
                        num_threads: int | None = None) -> str:
  """Trains `<output_prefix>.model` (and `.vocab`) and returns the .model path.

  `max_sentences` lines are sampled (reservoir sampling over the whole stream) for training.
  `add_dummy_prefix` is off by default: Japanese does not separate words by spaces, so a "▁" before every
  document would only cost a piece (Llama's tokenizer has it on).
  """
  if isinstance(jsonl_paths, (str, os.PathLike)):
    jsonl_paths = [jsonl_paths]
  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
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
  return output_prefix + ".model"
