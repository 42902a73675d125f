"""Random access to the documents of JSONL files: one pass indexes line offsets, reads are `pread`s.

Each line is one JSON object whose `text` field is a document (the corpus format of
/work/shared/data/text_ja/pretrain_ja.jsonl: {id, source, title, text}). The indexing pass also validates:
non-UTF-8 lines, malformed JSON, a missing or non-string `text` and empty (whitespace-only) documents are
counted in `JsonlSource.stats`, logged, and skipped, so a bad line never stops a training run.

`JsonlSource` is a grain random-access data source (`__len__`, `__getitem__`), so
`grain.MapDataset.source(JsonlSource(paths))` shuffles, shards and mixes it. It pickles without its file
descriptors (they are reopened in each process), so grain's multiprocess workers can use it.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

# How many skipped lines per file are logged one by one; the rest only appear in the per-file summary.
_MAX_LOGGED_PER_FILE = 10
STAT_KEYS = ("lines", "read", "skipped_malformed", "skipped_empty", "skipped_non_utf8")


def _paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[str, ...]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = tuple(os.fspath(p) for p in paths)
  if not out:
    raise ValueError("no JSONL paths given")
  return out


def parse_line(line: bytes, text_key: str = "text") -> tuple[str | None, dict[str, Any] | None, str]:
  """(text, record, "") for a good line, else (None, None, the stats key saying why it is skipped)."""
  if not line.strip():
    return None, None, "skipped_empty"
  try:
    s = line.decode("utf-8")
  except UnicodeDecodeError:
    return None, None, "skipped_non_utf8"
  try:
    record = json.loads(s.lstrip("\ufeff"))  # tolerate a byte-order mark on the first line
  except json.JSONDecodeError:
    return None, None, "skipped_malformed"
  text = record.get(text_key) if isinstance(record, dict) else None
  if not isinstance(text, str):
    return None, None, "skipped_malformed"
  if not text.strip():
    return None, None, "skipped_empty"
  try:
    text.encode("utf-8")  # a JSON escape like "\ud800" decodes to a lone surrogate, which is not UTF-8
  except UnicodeEncodeError:
    return None, None, "skipped_non_utf8"
  return text, record, ""


def check_index(i: int, n: int) -> int:
  """`i` as an int, or IndexError naming the document count (the sources' bounds check)."""
  i = int(i)
  if not -n <= i < n:
    raise IndexError(f"document {i} out of range for {n} documents")
  return i


def split_value(key: str) -> float:
  """A uniform number in [0, 1) from a document key, the same on every host and in every run."""
  digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64


class JsonlSource:
  """The valid documents of one or more JSONL files, by index; elements are {"text": str, "index": int}.

  `index` is the document's position among all valid documents of these files (stable under `subset`).
  `split_values[i]` is a deterministic uniform [0, 1) number hashed from the record's `id` (or
  `file name:line number` when there is none), used for the validation split.
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, text_key: str = "text",
               id_key: str = "id"):
    self.paths = _paths(paths)
    self.text_key = text_key
    self.stats = dict.fromkeys(STAT_KEYS, 0)
    files, offsets, lengths, split_values = [], [], [], []
    for file_index, path in enumerate(self.paths):
      file_stats = collections.Counter()
      with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
          text, record, reason = parse_line(line, text_key)
          file_stats["lines"] += 1
          if reason:
            file_stats[reason] += 1
            if sum(file_stats[k] for k in STAT_KEYS[2:]) <= _MAX_LOGGED_PER_FILE:
              logging.warning("%s:%d: %s, line skipped", path, lineno, reason.removeprefix("skipped_"))
          else:
            file_stats["read"] += 1
            doc_id = record.get(id_key)
            key = str(doc_id) if isinstance(doc_id, (str, int)) else f"{os.path.basename(path)}:{lineno}"
            files.append(file_index)
            offsets.append(offset)
            lengths.append(len(line))
            split_values.append(split_value(key))
          offset += len(line)
      for k in STAT_KEYS:
        self.stats[k] += file_stats[k]
      skipped = {k: file_stats[k] for k in STAT_KEYS[2:] if file_stats[k]}
      log = logging.warning if skipped else logging.info
      log("%s: %d documents from %d lines%s", path, file_stats["read"], file_stats["lines"],
          f", skipped {skipped}" if skipped else "")
    self._file = np.asarray(files, np.int32)
    self._offset = np.asarray(offsets, np.int64)
    self._length = np.asarray(lengths, np.int64)
    self.split_values = np.asarray(split_values, np.float64)
    self.doc_index = np.arange(len(files), dtype=np.int64)
    self._fds: list[int] | None = None
    self._fds_pid = -1
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.doc_index)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = check_index(i, len(self))
    line = os.pread(self._fd(self._file[i]), int(self._length[i]), int(self._offset[i]))
    text, _, reason = parse_line(line, self.text_key)
    if reason:  # the file changed since it was indexed
      raise RuntimeError(f"{self.paths[self._file[i]]} at byte {self._offset[i]}: {reason} (file modified?)")
    return {"text": text, "index": int(self.doc_index[i])}

  def subset(self, indices: np.ndarray | Sequence[int]) -> JsonlSource:
    """A view of the documents at positions `indices` of this source (sharing the files and index)."""
    indices = np.asarray(indices, np.int64)
    view = object.__new__(JsonlSource)
    view.__setstate__(self.__getstate__())
    for name in ("_file", "_offset", "_length", "split_values", "doc_index"):
      setattr(view, name, getattr(self, name)[indices])
    return view

  def __repr__(self) -> str:
    return f"JsonlSource({list(self.paths)!r}, {len(self)} documents)"

  def _fd(self, file_index: int) -> int:
    with self._lock:
      if self._fds is None or self._fds_pid != os.getpid():
        self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        self._fds_pid = os.getpid()
      return self._fds[file_index]

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state.update(_fds=None, _fds_pid=-1, _lock=None)
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __del__(self):
    fds, pid = getattr(self, "_fds", None), getattr(self, "_fds_pid", -1)
    if fds and pid == os.getpid():
      for fd in fds:
        try:
          os.close(fd)
        except OSError:
          pass


def iter_texts(paths: str | os.PathLike | Sequence[str | os.PathLike], *, text_key: str = "text") -> Iterator[str]:
  """Streams the valid documents' texts, in file order, skipping bad lines as `JsonlSource` does."""
  for path in _paths(paths):
    with open(path, "rb") as f:
      for line in f:
        text, _, reason = parse_line(line, text_key)
        if not reason:
          yield text
