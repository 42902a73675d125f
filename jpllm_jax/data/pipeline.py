"""The pre-training input pipeline on grain: JSONL documents -> split, sharded, shuffled, mixed, packed batches.

Stages, each a grain building block:

  JsonlSource per source (jsonl.py)
  -> train/validation split by a hash of the document id       (JsonlSource.subset)
  -> this host's shard                                         (MapDataset slice [shard_index::shard_count])
  -> train: shuffle(seed) + repeat (reshuffled every epoch)    (MapDataset.shuffle / .repeat)
  -> train: weighted mixture / validation: concatenation       (MapDataset.mix / .concatenate)
  -> tokenize [bos] + ids + [eos], lazily in read threads      (MapDataset.map, to_iter_dataset)
  -> split into (input, target) chunks of <= seq_len pairs     (grain.experimental.FlatMapIterDataset)
  -> first-fit pack into rows of seq_len                       (grain.experimental.FirstFitPackIterDataset)
  -> batch, padding a last partial batch with empty rows       (IterDataset.batch)
  -> one process reading several shards: rows side by side     (ShardsIterator)

Inputs and targets are shifted per document *before* packing, so no target crosses a document boundary and
every real position has weight 1. A document of L tokens gives its L - 1 (input, target) pairs exactly once
per epoch; a long one is cut into chunks of `seq_len` pairs (consecutive chunks share one token, and
`positions` restart at 0 in each chunk).

Batch: a dict of numpy arrays, each [batch_size, seq_len]:
  inputs, targets  int32   token ids (0 on padding)
  segment_ids      int32   1, 2, 3, ... per packed chunk in a row; 0 on padding
  positions        int32   position within the chunk, from 0
  weights          float32 1 where `targets` is a real next token, else 0 (== segment_ids > 0)

Mixture weights are per document (a weight of 0.7 means 70% of the documents drawn), not per token.

Resuming: the iterator is a `grain.DatasetIterator`. `get_state()` returns a small JSON-serializable dict
(indices into the index-addressed document stream, not data); `set_state(state)` on a fresh iterator made
with the same arguments continues with exactly the batches the uninterrupted iterator would give. With
orbax, save it as an item of a CheckpointManager with `grain.checkpoint.CheckpointSave(iterator)` and
restore with `grain.checkpoint.CheckpointRestore(iterator)` (one JSON file per process); `state_to_bytes`
/ `restore_state` do the same by hand.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
import sentencepiece as spm

from jpllm_jax.data.jsonl import STAT_KEYS, JsonlSource, _paths
from jpllm_jax.data.token_shards import TokenSource, is_token_dir

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")
SPLITS = ("train", "validation")

# A source is a path, or (path or paths, mixture weight).
SourceSpec = str | os.PathLike | tuple[str | os.PathLike | Sequence[str | os.PathLike], float]


def normalize_sources(sources: SourceSpec | Sequence[SourceSpec]) -> list[tuple[tuple[str, ...], float]]:
  """`"a.jsonl"`, `[("a.jsonl", 0.7), (["b1.jsonl", "b2.jsonl"], 0.3)]`, ... -> [(paths, weight), ...]."""
  if isinstance(sources, (str, os.PathLike)) or (
      isinstance(sources, tuple) and len(sources) == 2 and isinstance(sources[1], (int, float))):
    sources = [sources]
  out = []
  for spec in sources:
    paths, weight = (spec, 1.0) if isinstance(spec, (str, os.PathLike)) else spec
    if not weight > 0:
      raise ValueError(f"mixture weight of {paths} must be positive, got {weight}")
    out.append((_paths(paths), float(weight)))
  if not out:
    raise ValueError("no data sources given")
  return out


@functools.lru_cache(maxsize=32)
def _indexed(paths_sizes_mtimes: tuple[tuple[str, int, int], ...]) -> JsonlSource:
  return JsonlSource([p for p, _, _ in paths_sizes_mtimes])


def open_source(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> JsonlSource | TokenSource:
  """The indexed `JsonlSource` of `paths`, cached while the files are unchanged (see its `stats`), or the
  `TokenSource` of a pre-tokenised directory (token_shards.py)."""
  paths = _paths(paths)
  if len(paths) == 1 and is_token_dir(paths[0]):
    return TokenSource(paths[0])
  key = []
  for p in _paths(paths):
    st = os.stat(p)
    key.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
  return _indexed(tuple(key))


def _skipped(stats: dict[str, int]) -> dict[str, int]:
  return {k: v for k, v in stats.items() if k.startswith("skipped_") and v}


def source_stats(sources: SourceSpec | Sequence[SourceSpec]) -> dict[str, int]:
  """Lines read and skipped (by reason) over the JSONL sources, as `data_<key>` log fields: bad lines are
  skipped with a warning naming file and line, and these totals go to metrics.jsonl."""
  total = dict.fromkeys(STAT_KEYS, 0)
  for paths, _ in normalize_sources(sources):
    source = open_source(paths)
    for k in STAT_KEYS:
      total[k] += getattr(source, "stats", {}).get(k, 0)
  return {f"data_{k}": v for k, v in total.items()}


def split_indices(source: JsonlSource, split: str, val_fraction: float) -> np.ndarray:
  """Positions in `source` of the documents of `split`: validation holds those whose id hashes below
  `val_fraction`, so the split is the same on every host and does not move when files are appended to."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  is_val = source.split_values < val_fraction
  return np.flatnonzero(is_val if split == "validation" else ~is_val)


class _Tag:
  """Adds the source number to a document (a class, not a lambda, so that datasets pickle)."""

  def __init__(self, source: int):
    self.source = source

  def __call__(self, doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "source": self.source}


def documents(sources: SourceSpec | Sequence[SourceSpec], *, split: str = "train", seed: int = 0,
              val_fraction: float = 0.0, shard_index: int | None = None, shard_count: int | None = None,
              num_epochs: int | None = None) -> grain.MapDataset:
  """This host's documents, {"text", "index", "source"}, in training order (before tokenization).

  train: each source is shuffled by `seed` (differently every epoch), repeated `num_epochs` times (None:
  forever) and the sources are mixed by weight. validation: each source's held-out documents once, in file
  order, one source after another. `index` is the document's number in its source, `source` its position
  in `sources`. Hosts get disjoint documents: shard k of n takes every n-th document of each split. With a
  finite `num_epochs`, a mixture ends when its first source runs out (grain's `mix`).
  """
  if shard_index is None:
    shard_index = jax.process_index()
  if shard_count is None:
    shard_count = jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  train = split == "train"
  parts, weights = [], []
  for k, (paths, weight) in enumerate(normalize_sources(sources)):
    source = open_source(paths)
    if len(source) == 0:
      raise ValueError(f"data source {', '.join(paths)} has no documents"
                       + (f" (lines skipped: {_skipped(source.stats)})" if _skipped(source.stats) else " (empty)"))
    ds = grain.MapDataset.source(source.subset(split_indices(source, split, val_fraction)))
    ds = ds[shard_index::shard_count]
    if len(ds) == 0:
      if train:
        raise ValueError(f"no {split} documents in {list(paths)} for shard {shard_index} of {shard_count} "
                         f"(val_fraction={val_fraction})")
      continue
    ds = ds.map(_Tag(k))
    if train:
      ds = ds.shuffle(seed).repeat(num_epochs)
    parts.append(ds)
    weights.append(weight)
  if not parts:
    raise ValueError(f"no {split} documents for shard {shard_index} of {shard_count} (val_fraction={val_fraction})")
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, weights) if train else grain.MapDataset.concatenate(parts)


class _Tokenize:
  """A document -> int32 [bos] + ids + [eos]."""

  def __init__(self, tokenizer: spm.SentencePieceProcessor):
    self.tokenizer = tokenizer
    self.bos, self.eos = tokenizer.bos_id(), tokenizer.eos_id()
    if self.bos < 0 or self.eos < 0:
      raise ValueError(f"the tokenizer needs bos and eos pieces (bos_id={self.bos}, eos_id={self.eos})")

  def __call__(self, doc: dict[str, Any]) -> np.ndarray:
    if "tokens" in doc:  # pre-tokenised (TokenSource): [bos] + ids + [eos] already.
      return doc["tokens"]
    return np.asarray([self.bos, *self.tokenizer.encode(doc["text"]), self.eos], np.int32)


class _Chunk(grain.experimental.FlatMapTransform):
  """Tokens t[0..L) -> chunks {"inputs": t[s:e], "targets": t[s+1:e+1]} of at most seq_len pairs."""

  max_fan_out = sys.maxsize  # only FlatMapMapDataset needs a bound; FlatMapIterDataset does not

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
    n = len(tokens) - 1
    return [{"inputs": tokens[s:min(s + self.seq_len, n)], "targets": tokens[s + 1:min(s + self.seq_len, n) + 1]}
            for s in range(0, n, self.seq_len)]


def _stack_rows(rows: Sequence[dict[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
  """Packed rows -> a batch; a short (last) batch is filled with empty rows so shapes never change."""
  def stack(key):
    x = np.stack([r[key] for r in rows]).astype(np.int32)
    return np.pad(x, ((0, batch_size - len(rows)), (0, 0)))
  segment_ids = stack("inputs_segment_ids")
  return {"inputs": stack("inputs"), "targets": stack("targets"), "segment_ids": segment_ids,
          "positions": stack("inputs_positions"), "weights": (segment_ids > 0).astype(np.float32)}


def make_dataset(sources: SourceSpec | Sequence[SourceSpec], tokenizer: spm.SentencePieceProcessor, *,
                 seq_len: int, batch_size: int, split: str = "train", seed: int = 0, val_fraction: float = 0.0,
                 shard_index: int | None = None, shard_count: int | None = None, num_epochs: int | None = None,
                 packing_bins: int | None = None, num_threads: int = 4,
                 prefetch_buffer_size: int = 256) -> grain.IterDataset:
  """The packed-batch dataset of this host (see the module docstring for the batch format).

  Args:
    sources: a JSONL path, or a list of (path or paths, mixture weight).
    tokenizer: a SentencePiece processor with bos and eos (`jpllm_jax.tokenizer.load_tokenizer`).
    seq_len: tokens per row. batch_size: rows per batch (per host).
    split: "train" (shuffled, repeated `num_epochs` times, None = forever, mixed by weight) or
      "validation" (each held-out document once, finite).
    seed: the document shuffle seed. val_fraction: the fraction of documents held out for validation.
    shard_index, shard_count: this host's shard; default jax.process_index() and jax.process_count().
    packing_bins: rows packed at once by first fit (more bins, less padding); default max(batch_size, 128).
    num_threads, prefetch_buffer_size: grain read threads and documents read ahead (tokenization runs
      there); results do not depend on them.
  """
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
  for paths, _ in normalize_sources(sources):
    source = open_source(paths)
    if isinstance(source, TokenSource) and (
        source.meta["vocab_size"], source.meta["bos_id"], source.meta["eos_id"]) != (
            tokenizer.get_piece_size(), tokenizer.bos_id(), tokenizer.eos_id()):
      raise ValueError(f"{source.directory} was encoded with {source.meta['tokenizer']}, which differs from the "
                       "tokenizer given (vocabulary size or bos/eos ids)")
  docs = documents(sources, split=split, seed=seed, val_fraction=val_fraction, shard_index=shard_index,
                   shard_count=shard_count, num_epochs=num_epochs if split == "train" else 1)
  ds = docs.map(_Tokenize(tokenizer)).to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
  ds = grain.experimental.FlatMapIterDataset(ds, _Chunk(seq_len))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=packing_bins or max(batch_size, 128), shuffle_bins=False)
  return ds.batch(batch_size, batch_fn=functools.partial(_stack_rows, batch_size=batch_size))


def make_iterator(sources: SourceSpec | Sequence[SourceSpec], tokenizer: spm.SentencePieceProcessor,
                  **kwargs: Any) -> grain.DatasetIterator:
  """`iter(make_dataset(...))`: yields batches; supports `get_state()` / `set_state()` for exact resume."""
  return iter(make_dataset(sources, tokenizer, **kwargs))


class ShardsIterator:
  """Batches of several data shards read side by side: rows of shard `shards[0]` first, then the next.

  A process that owns shards k..k+m-1 of n feeds the same global batch rows as m processes with one
  shard each, so a run gives the same batches (and losses) on 1 host as on m hosts (`data.shards` in
  the training config). A finite split ends when every shard has ended; shards that end earlier give
  empty rows (segment id 0, weight 0). Resumable like a grain iterator: `get_state()` / `set_state()`.
  """

  def __init__(self, sources: SourceSpec | Sequence[SourceSpec], tokenizer: spm.SentencePieceProcessor, *,
               shards: Sequence[int], shard_count: int, batch_size: int, seq_len: int, **kwargs: Any):
    if not shards or batch_size % len(shards):
      raise ValueError(f"batch_size {batch_size} must be a positive multiple of the {len(shards)} local shards")
    self.rows = batch_size // len(shards)
    self.seq_len = seq_len
    self.iterators = [make_iterator(sources, tokenizer, shard_index=k, shard_count=shard_count,
                                    batch_size=self.rows, seq_len=seq_len, **kwargs) for k in shards]
    self._ended = [False] * len(self.iterators)

  def __iter__(self) -> "ShardsIterator":
    return self

  def _empty(self) -> dict[str, np.ndarray]:
    shape = (self.rows, self.seq_len)
    return {k: np.zeros(shape, np.float32 if k == "weights" else np.int32) for k in BATCH_KEYS}

  def __next__(self) -> dict[str, np.ndarray]:
    parts = []
    for i, it in enumerate(self.iterators):
      if not self._ended[i]:
        try:
          parts.append(next(it))
          continue
        except StopIteration:
          self._ended[i] = True
      parts.append(self._empty())
    if all(self._ended):
      raise StopIteration
    return {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}

  def get_state(self) -> dict[str, Any]:
    return {"shards": [it.get_state() for it in self.iterators], "ended": list(self._ended)}

  def set_state(self, state: bytes | str | dict[str, Any]) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if len(state["shards"]) != len(self.iterators):
      raise ValueError(f"the saved data state has {len(state['shards'])} shards, this process reads "
                       f"{len(self.iterators)}: resume with the same data.shards and process count")
    for it, s in zip(self.iterators, state["shards"]):
      it.set_state(s)
    self._ended = list(state["ended"])

  def start_prefetch(self) -> None:  # called by grain.checkpoint.CheckpointRestore.
    for it in self.iterators:
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()


def local_shards(shard_count: int | None = None) -> list[int]:
  """The data shards this process reads: `shard_count` (default: one per process) split evenly in order."""
  n, k = jax.process_count(), jax.process_index()
  shard_count = shard_count or n
  if shard_count % n:
    raise ValueError(f"data.shards={shard_count} must be a multiple of the process count {n}")
  per = shard_count // n
  return list(range(k * per, (k + 1) * per))


def state_to_bytes(iterator: grain.DatasetIterator) -> bytes:
  """The iterator's position as JSON bytes (what grain.checkpoint.CheckpointSave writes per process)."""
  return json.dumps(iterator.get_state()).encode()


def restore_state(iterator: grain.DatasetIterator, state: bytes | str | dict[str, Any]) -> grain.DatasetIterator:
  """Moves a fresh iterator (same `make_iterator` arguments) to a saved position; returns it."""
  if isinstance(state, (bytes, str)):
    state = json.loads(state)
  iterator.set_state(state)
  return iterator
