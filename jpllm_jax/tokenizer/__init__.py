"""Tokenizer loading: the one place that knows where SentencePiece models come from.

The default base tokenizer is Mistral-7B's SentencePiece model (32,000 pieces, Apache-2.0), shipped in
the PyPI package `mistral-common`, so nothing is downloaded at run time.
"""
from __future__ import annotations

import os

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
