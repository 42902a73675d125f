"""Pre-tokenised corpora: JSONL documents encoded once, in parallel, into memory-mapped numpy arrays that
the grain pipeline reads instead of running SentencePiece in the loader.

A token directory holds

    tokens.npy        uint16 (vocabularies < 65,536) or uint32: every document's [bos] + ids + [eos], concatenated
    offsets.npy       int64 [documents + 1]: document i is tokens[offsets[i]:offsets[i + 1]]
    split_values.npy  float64 [documents]: the validation-split hash of each document's id (as JsonlSource)
    meta.json         tokenizer path, vocabulary size, bos/eos ids, counts, source files

Pass the directory wherever the pipeline takes a JSONL source (`pipeline.make_dataset(token_dir, ...)`,
`config.data.sources`): documents, split, shuffling, packing and batches are the same as from the JSONL.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
from absl import logging

from jpllm_jax.data.jsonl import JsonlSource, _paths, check_index

META = "meta.json"


def _encode_chunk(source: JsonlSource, start: int, stop: int, model_file: str) -> list[np.ndarray]:
  sp = spm.SentencePieceProcessor(model_file=model_file)
  texts = [source[i]["text"] for i in range(start, stop)]
  bos, eos = sp.bos_id(), sp.eos_id()
  return [np.asarray([bos, *ids, eos], np.int64) for ids in sp.encode(texts)]


def write_token_shards(jsonl_paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer_path: str,
                       out_dir: str | os.PathLike, *, workers: int | None = None,
                       chunk_docs: int = 2000) -> dict[str, Any]:
  """Encodes the valid documents of `jsonl_paths` (the same ones, in the same order, as `JsonlSource`)
  with `workers` processes; returns the meta dict (also written to `out_dir/meta.json`, last)."""
  t0 = time.perf_counter()
  source = JsonlSource(jsonl_paths)
  sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
  if sp.bos_id() < 0 or sp.eos_id() < 0:
    raise ValueError(f"{tokenizer_path} has no bos/eos pieces")
  n = len(source)
  chunks = [(source, s, min(s + chunk_docs, n), tokenizer_path) for s in range(0, n, chunk_docs)]
  workers = min(workers or os.cpu_count() or 1, max(len(chunks), 1))
  if workers > 1:
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      parts = pool.starmap(_encode_chunk, chunks)
  else:
    parts = [_encode_chunk(*c) for c in chunks]
  docs = [d for part in parts for d in part]
  lengths = np.asarray([len(d) for d in docs], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  dtype = np.uint16 if sp.get_piece_size() <= 1 << 16 else np.uint32
  tokens = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / META).unlink(missing_ok=True)  # an interrupted rewrite is never mistaken for a finished one.
  for name, array in (("tokens", tokens), ("offsets", offsets), ("split_values", source.split_values)):
    tmp = out / f"{name}.tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, out / f"{name}.npy")
  seconds = time.perf_counter() - t0
  chars = sum(len(source[i]["text"]) for i in range(n))
  meta = {"tokenizer": os.path.abspath(tokenizer_path), "vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(),
          "eos_id": sp.eos_id(), "documents": n, "tokens": int(len(tokens)), "characters": chars,
          "sources": [os.path.abspath(p) for p in _paths(jsonl_paths)], "skipped": source.stats,
          "workers": workers, "seconds": round(seconds, 3)}
  (out / META).write_text(json.dumps(meta, indent=1) + "\n")
  logging.info("encoded %d documents, %d tokens in %.1f s (%.0f characters/s)", n, len(tokens), seconds,
               chars / max(seconds, 1e-9))
  return meta


def is_token_dir(path: str | os.PathLike) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, META))


class TokenSource:
  """A token directory by index, like `JsonlSource`: elements are {"tokens": int32 array, "index": int}."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.path.abspath(directory)
    if not is_token_dir(self.directory):
      raise FileNotFoundError(f"{directory} is not a finished token directory (no {META})")
    self.meta = json.loads(pathlib.Path(self.directory, META).read_text())
    offsets = np.load(os.path.join(self.directory, "offsets.npy"))
    self._start, self._stop = offsets[:-1], offsets[1:]
    self.split_values = np.load(os.path.join(self.directory, "split_values.npy"))
    self.doc_index = np.arange(len(self._start), dtype=np.int64)
    self._tokens = None

  @property
  def tokens(self) -> np.ndarray:
    if self._tokens is None:  # opened lazily, so that the source pickles small to grain workers.
      self._tokens = np.load(os.path.join(self.directory, "tokens.npy"), mmap_mode="r")
    return self._tokens

  def __len__(self) -> int:
    return len(self.doc_index)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = check_index(i, len(self))
    return {"tokens": np.asarray(self.tokens[self._start[i]:self._stop[i]], np.int32),
            "index": int(self.doc_index[i])}

  def subset(self, indices: np.ndarray | Sequence[int]) -> "TokenSource":
    indices = np.asarray(indices, np.int64)
    view = object.__new__(TokenSource)
    view.__dict__.update(self.__dict__)
    for name in ("_start", "_stop", "split_values", "doc_index"):
      setattr(view, name, getattr(self, name)[indices])
    return view

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_tokens": None}

  def __repr__(self) -> str:
    return f"TokenSource({self.directory!r}, {len(self)} documents)"
