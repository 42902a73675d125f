"""Tokenizer loading: the one place that knows where SentencePiece models come from.

The default base tokenizer is Mistral-7B's SentencePiece model (32,000 pieces, Apache-2.0), shipped in
the PyPI package `mistral-common`, so nothing is downloaded at run time.
"""
from __future__ import annotations

import os

import numpy as np
import sentencepiece as spm


def mistral_v1_path() -> str:
  """Path of `mistral_common/data/tokenizer.model.v1` (the Mistral-7B / Llama-2-style base vocabulary)."""
  try:
    import mistral_common
  except ImportError as e:  # pragma: no cover - mistral-common is in requirements.txt
    raise RuntimeError("the default tokenizer ships in the package mistral-common: pip install mistral-common") from e
  path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
  if not os.path.exists(path):
    raise FileNotFoundError(f"mistral-common is installed but has no {path}")
  return path


def load_tokenizer(path: str | None = None) -> spm.SentencePieceProcessor:
  """Loads a SentencePiece model file, or the Mistral-7B base tokenizer when `path` is None."""
  path = path or mistral_v1_path()
  if not os.path.exists(path):
    raise FileNotFoundError(f"no tokenizer model at {path}")
  return spm.SentencePieceProcessor(model_file=path)


def special_token_ids(sp: spm.SentencePieceProcessor) -> dict[str, int]:
  """`bos_token_id`, `eos_token_id` and `pad_token_id` (where the model defines them) for HF config files."""
  ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
  return {k: int(v) for k, v in ids.items() if v >= 0}


def piece_texts(sp: spm.SentencePieceProcessor) -> list[str]:
  """The text each piece contributes when decoded inside a sequence ("▁" as a space; a byte piece as its
  character when it is ASCII, "" for bytes of multi-byte characters; control pieces "")."""
  texts = []
  for i in range(sp.get_piece_size()):
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):
      byte = int(piece[3:-1], 16)
      texts.append(chr(byte) if byte < 128 else "")
    elif sp.is_control(i) or sp.is_unknown(i):
      texts.append("")
    else:
      texts.append(piece.replace("\u2581", " "))
  return texts


def stop_string_table(sp: spm.SentencePieceProcessor, stop: str, vocab_size: int | None = None) -> np.ndarray:
  """The [V, 3] table of `generate(stop_table=...)` for a two-character stop string such as "\\n\\n".

  Columns: the piece contains `stop`; it ends with `stop[0]`; it starts with `stop[1]`. Rows past the tokenizer's
  pieces (vocabulary padding) are all False.
  """
  if len(stop) != 2:
    raise ValueError(f"stop_string_table handles two-character stop strings, got {stop!r}")
  texts = piece_texts(sp)
  table = np.zeros((vocab_size or len(texts), 3), bool)
  for i, text in enumerate(texts[:table.shape[0]]):
    table[i] = (stop in text, text.endswith(stop[0]), text.startswith(stop[1]))
  return table
