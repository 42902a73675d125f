"""The corpus pipeline: WARC shards in, clean deduplicated Japanese JSONL(.zst) shards and accounting out.

Three phases, each idempotent (a finished shard is skipped on re-run; every file is written to a temporary
name and renamed, so a crash never leaves a half-written file that looks finished):

  1. per input shard (in parallel): read WARC -> Japanese pre-detection on raw bytes -> extraction ->
     language check of the text -> quality rules -> NG words and hosts; the survivors and their MinHash band
     keys go to `<out>/work/<shard>.*`.
  2. deduplication: bands are independent, so they are split over workers; a document is a duplicate when
     any of its bands equals that band of a document seen earlier (input shards in sorted order, records in
     file order), so the first-seen document is kept.
  3. per input shard (in parallel): drop duplicates, normalise (punctuation, footer), write
     `<out>/<shard>.jsonl.zst` with `id, url, host, date, text` and the quality annotations.

`<out>/stats.json` has, per stage, documents in, kept and dropped by reason; every input record is
accounted for: each stage's `in` is the previous stage's `kept`, and `in == kept + sum(dropped)`.

Inputs are fingerprinted in `<out>/work/inputs.json` (path, size and mtime of each input, and the config):
a re-run whose inputs or config changed recomputes what depends on them (the filter of each changed shard, the
duplicate mask and every output shard, since "first seen" moves) instead of reusing stale state.

Executors: "local" (a process pool, one process per shard) and "ray" (the same functions as Ray tasks,
on a cluster or a local Ray instance).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import io
import json
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import zstandard
from absl import logging

from jpllm_jax.corpus import extract, langid, minhash, ngwords, normalize, quality, warc

STAGES = ("warc", "lang_pre", "extract", "lang_text", "quality", "ng", "dedup", "normalize")
WORK = "work"


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """Every setting of the pipeline; thresholds live in the stage configs."""
  quality: quality.QualityConfig = quality.QualityConfig()
  normalize: normalize.NormalizeConfig = normalize.NormalizeConfig()
  minhash: minhash.MinHashConfig = minhash.MinHashConfig()
  min_japanese_fraction: float = 0.5  # language check of the extracted text.
  ng_words_file: str = ""  # one NG word per line.
  ng_threshold: float = 0.05  # reject when NG-word characters >= this fraction of the Japanese letters.
  host_suffixes: tuple[str, ...] = ()
  ut1_dir: str = ""  # a UT1-style block list directory (<dir>/<category>/domains).
  ut1_categories: tuple[str, ...] = ()  # empty: every category found.

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CorpusConfig":
    """From a plain (or ml_collections) nested dict; sub-configs by name, tuples from lists."""
    d = dict(d)
    subs = {"quality": quality.QualityConfig, "normalize": normalize.NormalizeConfig,
            "minhash": minhash.MinHashConfig}
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name not in d:
        continue
      v = d[f.name]
      if f.name in subs:
        v = _dataclass_from(subs[f.name], dict(v))
      elif isinstance(v, list):
        v = tuple(v)
      kwargs[f.name] = v
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown corpus config fields {sorted(unknown)}")
    return cls(**kwargs)


def _dataclass_from(cls, d: dict[str, Any]):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(d) - set(fields)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
  out = {}
  for k, v in d.items():
    if isinstance(v, (list, tuple)):
      v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    out[k] = v
  return cls(**out)


# ----------------------------------------------------------------------------------------------- files
def _atomic_write(path: pathlib.Path, data: bytes) -> None:
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def write_jsonl_zst(path: pathlib.Path, docs: Iterable[dict[str, Any]]) -> int:
  """Writes documents as zstd-compressed JSON lines, atomically; returns the count."""
  buf = io.BytesIO()
  n = 0
  with zstandard.ZstdCompressor(level=3).stream_writer(buf, closefd=False) as w:
    for doc in docs:
      w.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
      n += 1
  _atomic_write(path, buf.getvalue())
  return n


def read_jsonl_zst(path: str | os.PathLike) -> Iterable[dict[str, Any]]:
  with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
    for line in io.TextIOWrapper(r, encoding="utf-8"):
      yield json.loads(line)


def shard_name(index: int, path: str) -> str:
  stem = os.path.basename(path)
  for ext in (".gz", ".warc", ".wet"):
    if stem.endswith(ext):
      stem = stem[: -len(ext)]
  return f"{index:05d}-{stem}"


def expand_inputs(patterns: str | Sequence[str]) -> list[str]:
  """Sorted input paths from globs (comma-separated in a string); the order defines 'first seen'."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p]
  paths = sorted({p for pat in patterns for p in glob.glob(os.path.expanduser(pat))})
  if not paths:
    raise FileNotFoundError(f"no input files match {list(patterns)}")
  return paths


class _Stats:
  """Per-stage in / kept / dropped-by-reason counters."""

  def __init__(self):
    self.stages = {s: {"in": 0, "kept": 0, "dropped": collections.Counter()} for s in STAGES}

  def enter(self, stage: str) -> None:
    self.stages[stage]["in"] += 1

  def keep(self, stage: str) -> None:
    self.stages[stage]["kept"] += 1

  def drop(self, stage: str, reason: str) -> None:
    self.stages[stage]["dropped"][reason] += 1

  def to_json(self) -> dict[str, Any]:
    return {s: {"in": v["in"], "kept": v["kept"], "dropped": dict(sorted(v["dropped"].items()))}
            for s, v in self.stages.items()}

  @staticmethod
  def merge(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    out = {s: {"in": 0, "kept": 0, "dropped": collections.Counter()} for s in STAGES}
    for p in parts:
      for s, v in p.items():
        out[s]["in"] += v["in"]
        out[s]["kept"] += v["kept"]
        out[s]["dropped"].update(v["dropped"])
    return {s: {"in": v["in"], "kept": v["kept"], "dropped": dict(sorted(v["dropped"].items()))}
            for s, v in out.items()}


class _Filters:
  """The list-based filters, loaded once per process."""

  def __init__(self, config: CorpusConfig):
    self.ng = ngwords.NgWords.from_file(config.ng_words_file) if config.ng_words_file else None
    hosts = ngwords.HostFilter(suffixes=config.host_suffixes)
    if config.ut1_dir:
      hosts = ngwords.HostFilter.from_ut1(config.ut1_dir, categories=config.ut1_categories or None,
                                          suffixes=config.host_suffixes)
    self.hosts = hosts


# ------------------------------------------------------------------------------------- phase 1: filter
def filter_shard(index: int, path: str, out_dir: str, config: CorpusConfig) -> dict[str, Any]:
  """Phase 1 for one input file; returns (and saves) its stats. Skips a shard that is already done."""
  work = pathlib.Path(out_dir) / WORK
  name = shard_name(index, path)
  done = work / f"{name}.filter.json"
  if done.exists():
    return json.loads(done.read_text())
  work.mkdir(parents=True, exist_ok=True)
  stats, filters = _Stats(), _Filters(config)
  record_stats: collections.Counter = collections.Counter()
  docs, keys = [], []
  t0, last_log = time.perf_counter(), time.perf_counter()
  for page in warc.iter_pages(path, record_stats):
    doc = _filter_page(page, config, filters, stats)
    if doc is not None:
      keys.append(minhash.band_keys(minhash.signature(doc["text"], config.minhash), config.minhash))
      docs.append(doc)
    if time.perf_counter() - last_log > 10:
      last_log = time.perf_counter()
      pages = stats.stages["lang_pre"]["in"]
      logging.info("%s: %d pages, %.0f pages/s, kept %.1f%%", name, pages, pages / (last_log - t0),
                   100 * len(docs) / max(pages, 1))
  # The WARC stage: every record is counted once by the reader.
  w = stats.stages["warc"]
  w["in"] = record_stats["records"] + record_stats.get("skip_truncated", 0)
  w["kept"] = record_stats["pages"]
  for k, v in record_stats.items():
    if k.startswith("skip_") and v:
      w["dropped"][k[len("skip_"):]] += v
  write_jsonl_zst(work / f"{name}.candidates.jsonl.zst", docs)
  matrix = np.stack(keys) if keys else np.zeros((0, config.minhash.bands), np.uint64)
  order = (np.int64(index) << 32) + np.arange(len(docs), dtype=np.int64)
  minhash.save_band_keys(str(work / f"{name}.bands"), order, matrix)
  result = {"shard": name, "path": path, "stats": stats.to_json(), "seconds": time.perf_counter() - t0}
  _atomic_write(done, json.dumps(result).encode())
  return result


def _filter_page(page, config: CorpusConfig, filters: _Filters, stats: _Stats) -> dict[str, Any] | None:
  def drop(stage, reason):
    stats.drop(stage, reason)
    return None

  stats.enter("lang_pre")
  ok, reason = langid.detect_page(page.html, page.http_charset)
  if not ok:
    return drop("lang_pre", reason)
  stats.keep("lang_pre")

  stats.enter("extract")
  try:
    text = extract.extract_text(page.html, page.url, page.http_charset)
  except Exception as e:  # a parser crash on one page must not stop the shard.
    logging.warning("extraction failed on %s: %r", page.url, e)
    return drop("extract", "error")
  if not text:
    return drop("extract", "empty")
  stats.keep("extract")

  stats.enter("lang_text")
  if not langid.is_japanese_text(text, config.min_japanese_fraction):
    return drop("lang_text", "not_japanese")
  stats.keep("lang_text")

  stats.enter("quality")
  reason, measures = quality.reject_reason(text, config.quality)
  if reason:
    return drop("quality", reason)
  stats.keep("quality")

  stats.enter("ng")
  reason = filters.hosts.reject_reason(page.host)
  if reason:
    return drop("ng", reason.split(":")[0])
  ng_fraction = filters.ng.ng_fraction(text) if filters.ng is not None else 0.0
  if ng_fraction >= config.ng_threshold:
    return drop("ng", "ng_words")
  stats.keep("ng")
  return {"id": page.record_id, "url": page.url, "host": page.host, "date": page.date, "text": text,
          "quality": {k: round(float(v), 4) for k, v in measures.items()}, "ng_fraction": round(ng_fraction, 4)}


# --------------------------------------------------------------------------------------- phase 2: dedup
def dedup_bands(band_files: Sequence[str], band_ids: Sequence[int]) -> np.ndarray:
  """The duplicate mask (over all documents, in shard order) from the given bands only."""
  order, matrix = minhash.load_band_keys(band_files, band_ids)
  return minhash.find_duplicates(order, matrix)


# ----------------------------------------------------------------------------------- phase 3: finalize
def finalize_shard(index: int, path: str, out_dir: str, duplicates: np.ndarray,
                   config: CorpusConfig) -> dict[str, Any]:
  """Phase 3 for one shard: drop duplicates, normalise, write the output shard (skipped if done)."""
  out = pathlib.Path(out_dir)
  name = shard_name(index, path)
  done = out / WORK / f"{name}.final.json"
  if done.exists():
    return json.loads(done.read_text())
  stats = _Stats()
  kept = []
  for i, doc in enumerate(read_jsonl_zst(out / WORK / f"{name}.candidates.jsonl.zst")):
    stats.enter("dedup")
    if duplicates[i]:
      stats.drop("dedup", "minhash_duplicate")
      continue
    stats.keep("dedup")
    stats.enter("normalize")
    text = normalize.normalize(doc["text"], config.normalize)
    if not text.strip():
      stats.drop("normalize", "empty_after_footer")
      continue
    stats.keep("normalize")
    kept.append({**doc, "text": text})
  write_jsonl_zst(out / f"{name}.jsonl.zst", kept)
  result = {"shard": name, "stats": stats.to_json(), "documents": len(kept)}
  _atomic_write(done, json.dumps(result).encode())
  return result


# ------------------------------------------------------------------------------------- input changes
def _fingerprint(paths: Sequence[str], config: CorpusConfig) -> dict[str, Any]:
  shards = {}
  for i, p in enumerate(paths):
    st = os.stat(p)
    shards[shard_name(i, p)] = {"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
  return {"shards": shards, "config": json.loads(json.dumps(dataclasses.asdict(config)))}


def invalidate_changed(out: pathlib.Path, paths: Sequence[str], config: CorpusConfig) -> list[str]:
  """Deletes the work and output files that depend on inputs (or a config) that changed since the state in
  `out` was made, then records the current inputs; returns the changes ("added x", ...) it found."""
  work = out / WORK
  manifest = work / "inputs.json"
  new = _fingerprint(paths, config)
  old = json.loads(manifest.read_text()) if manifest.exists() else None
  if old is None and not any(work.glob("*.filter.json")):
    old = new  # a fresh output directory.
  if old is None:
    old = {"shards": {}, "config": None}  # state of an older version: nothing in it can be trusted.
  if old != new:
    changed = sorted(n for n in old["shards"].keys() | new["shards"].keys()
                     if old["shards"].get(n) != new["shards"].get(n) or old["config"] != new["config"])
    kinds = [("added" if n not in old["shards"] else "removed" if n not in new["shards"] else "changed") + " " + n
             for n in changed]
    logging.warning("%s: inputs changed since its last run (%s%s): recomputing what depends on them", out,
                    ", ".join(kinds[:5]) + (f", ... {len(kinds)} in all" if len(kinds) > 5 else ""),
                    "; config changed" if old["config"] != new["config"] else "")
    stale = [work / "duplicates.npy", *work.glob("*.final.json"), *out.glob("*.jsonl.zst"), out / "stats.json"]
    for name in changed:
      stale += [work / f"{name}.filter.json", *work.glob(f"{name}.candidates.*"), *work.glob(f"{name}.bands*")]
    for path in stale:
      shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
  else:
    kinds = []
  _atomic_write(manifest, json.dumps(new, indent=1).encode())
  return kinds


# ------------------------------------------------------------------------------------------- executors
def _local_map(fn: Callable, args: Sequence[tuple], workers: int) -> list:
  if workers <= 1 or len(args) <= 1:
    return [fn(*a) for a in args]
  import multiprocessing
  with multiprocessing.get_context("spawn").Pool(min(workers, len(args))) as pool:
    return pool.starmap(fn, args)


def _ray_map(fn: Callable, args: Sequence[tuple], workers: int) -> list:
  import ray
  if not ray.is_initialized():
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
  remote = ray.remote(fn)
  return ray.get([remote.remote(*a) for a in args])


EXECUTORS = {"local": _local_map, "ray": _ray_map}


def run(inputs: str | Sequence[str], out_dir: str, config: CorpusConfig = CorpusConfig(), *,
        executor: str = "local", workers: int | None = None) -> dict[str, Any]:
  """Runs the three phases; returns the stats written to `<out_dir>/stats.json`."""
  if executor not in EXECUTORS:
    raise ValueError(f"executor must be one of {sorted(EXECUTORS)}, got {executor!r}")
  pmap = EXECUTORS[executor]
  workers = workers or os.cpu_count() or 1
  paths = expand_inputs(inputs)
  out = pathlib.Path(out_dir)
  (out / WORK).mkdir(parents=True, exist_ok=True)
  invalidate_changed(out, paths, config)
  t0 = time.perf_counter()

  filtered = pmap(filter_shard, [(i, p, str(out), config) for i, p in enumerate(paths)], workers)
  t1 = time.perf_counter()
  band_files = [str(out / WORK / f"{shard_name(i, p)}.bands") for i, p in enumerate(paths)]
  dup_path = out / WORK / "duplicates.npy"
  if dup_path.exists():
    duplicates = np.load(dup_path)
  else:
    parts = minhash.band_partitions(config.minhash.bands, workers)
    masks = pmap(dedup_bands, [(band_files, ids) for ids in parts if ids], workers)
    duplicates = np.logical_or.reduce(masks) if masks else np.zeros(0, bool)
    buf = io.BytesIO()
    np.save(buf, duplicates)
    _atomic_write(dup_path, buf.getvalue())
  counts = [r["stats"]["ng"]["kept"] for r in filtered]
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
  if len(duplicates) != offsets[-1]:  # never apply another input set's mask.
    raise RuntimeError(f"{dup_path} marks {len(duplicates)} documents but the shards hold {offsets[-1]}; "
                       "delete it to recompute the deduplication")
  t2 = time.perf_counter()
  finals = pmap(finalize_shard, [(i, p, str(out), duplicates[offsets[i]:offsets[i + 1]], config)
                                 for i, p in enumerate(paths)], workers)
  t3 = time.perf_counter()

  stages = _Stats.merge([r["stats"] for r in filtered] + [r["stats"] for r in finals])
  records = stages["warc"]["in"]
  pages = stages["lang_pre"]["in"]
  result = {
      "inputs": paths, "executor": executor, "workers": workers,
      "records": records, "documents": stages["normalize"]["kept"], "stages": stages,
      "seconds": {"filter": t1 - t0, "dedup": t2 - t1, "finalize": t3 - t2, "total": t3 - t0},
      "pages_per_s": pages / max(t3 - t0, 1e-9),
      "config": dataclasses.asdict(config),
  }
  check_accounting(stages)
  _atomic_write(out / "stats.json", json.dumps(result, ensure_ascii=False, indent=1).encode())
  logging.info("%d records -> %d documents (%.1f pages/s)", records, result["documents"], result["pages_per_s"])
  return result


def check_accounting(stages: dict[str, Any]) -> None:
  """Raises if a stage loses or invents documents: in == kept + dropped, and in == previous kept."""
  prev = None
  for s in STAGES:
    v = stages[s]
    if v["in"] != v["kept"] + sum(v["dropped"].values()):
      raise AssertionError(f"stage {s}: in {v['in']} != kept {v['kept']} + dropped {v['dropped']}")
    if prev is not None and v["in"] != stages[prev]["kept"]:
      raise AssertionError(f"stage {s} got {v['in']} documents but {prev} kept {stages[prev]['kept']}")
    prev = s
