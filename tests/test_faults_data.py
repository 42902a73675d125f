"""Injected data faults: bad JSONL lines are counted, logged with file and line, skipped and their counts reach
metrics.jsonl; an empty training source and a zero-byte WARC are named; the corpus pipeline re-run into the same
output after an input is added recomputes the stale deduplication instead of crashing on (or applying) it."""
from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import pytest
from absl import logging as absl_logging

from conftest import SHARED_DATA
from benchmarks import synthetic_crawl as synthetic
from jpllm_jax.corpus import pipeline as corpus
from jpllm_jax.corpus import warc
from jpllm_jax.data import jsonl, pipeline
from jpllm_jax.tokenizer import load_tokenizer, mistral_v1_path

TEXT = SHARED_DATA / "text_ja" / "pretrain_ja.jsonl"
WARCS = SHARED_DATA / "web" / "warc"


@pytest.fixture
def warnings(monkeypatch):
  seen = []
  for module in (jsonl, warc, corpus):
    monkeypatch.setattr(module.logging, "warning", lambda msg, *a: seen.append(msg % a))
  return seen


def _faulty(tmp_path):
  good = [json.dumps({"id": i, "text": f"文書{i}です。" * 20}, ensure_ascii=False).encode() for i in range(8)]
  lines = [good[0], b'{"id": 1, "text": "broken', good[1], b"\xff\xfe not utf-8", good[2],
           json.dumps({"id": 5, "body": "no text field"}).encode(), b"", good[3], b"[1, 2]", *good[4:]]
  path = tmp_path / "faulty.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  return path


def test_bad_lines_are_counted_logged_with_file_and_line_and_skipped(tmp_path, warnings):
  path = _faulty(tmp_path)
  source = jsonl.JsonlSource(path)
  assert len(source) == 8 and [source[i]["text"] for i in range(8)] == [f"文書{i}です。" * 20 for i in range(8)]
  assert source.stats == {"lines": 13, "read": 8, "skipped_malformed": 3, "skipped_empty": 1, "skipped_non_utf8": 1}
  for line, why in ((2, "malformed"), (4, "non_utf8"), (6, "malformed"), (7, "empty"), (9, "malformed")):
    assert f"{path}:{line}: {why}, line skipped" in warnings, warnings
  assert pipeline.source_stats([(str(path), 1.0)]) == {
      "data_lines": 13, "data_read": 8, "data_skipped_malformed": 3, "data_skipped_empty": 1,
      "data_skipped_non_utf8": 1}


def test_the_counts_reach_metrics_jsonl(tmp_path):
  from jpllm_jax.train.loop import train
  from experiments.configs import default
  path = _faulty(tmp_path)
  c = default.get_config()
  c.data.update(sources=str(path), tokenizer=mistral_v1_path(), seq_len=16, val_fraction=0.0)
  c.model.update(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32)
  c.train.update(steps=2, batch_size=2, log_every=1, eval_every=0, checkpoint_every=100)
  train(c, str(tmp_path / "run"))
  records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2]
  assert all(r["data_skipped_malformed"] == 3 and r["data_skipped_non_utf8"] == 1 and r["data_skipped_empty"] == 1
             and r["data_read"] == 8 for r in records), records


def test_an_empty_training_source_is_named(tmp_path):
  sp = load_tokenizer(mistral_v1_path())
  for name, content in (("empty.jsonl", b""), ("all_bad.jsonl", b"not json\n{}\n")):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"data source {path} has no documents"):
      pipeline.make_iterator([(str(path), 1.0)], sp, seq_len=16, batch_size=2, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match=r"\(lines skipped: \{'skipped_malformed': 2\}\)"):
    pipeline.make_iterator([(str(path), 1.0)], sp, seq_len=16, batch_size=2, shard_index=0, shard_count=1)


def test_a_zero_byte_warc_is_named(tmp_path, warnings):
  path = tmp_path / "empty.warc.gz"
  path.write_bytes(b"")
  stats = collections.Counter()
  assert list(warc.iter_pages(str(path), stats)) == []
  assert f"{path}: empty file (0 bytes), no records" in warnings


@pytest.mark.skipif(not WARCS.exists(), reason=f"no shared WARC files at {WARCS}")
def test_corpus_rerun_after_adding_an_input_recomputes_the_deduplication(tmp_path, warnings):
  inputs = tmp_path / "in"
  paragraphs = [json.loads(line)["text"] for line in open(TEXT, encoding="utf-8")][:400]
  synthetic.make_crawl_shards(paragraphs, 40, str(inputs), 2, seed=1)
  out = tmp_path / "out"
  first = corpus.run(str(inputs / "*.warc.gz"), str(out), workers=1)
  assert first["stages"]["dedup"]["dropped"].get("minhash_duplicate", 0) > 0
  synthetic.make_crawl_shards(paragraphs, 30, str(tmp_path / "more"), 1, seed=2)
  shutil.copy(tmp_path / "more" / "00000.warc.gz", inputs / "000-added.warc.gz")  # sorts first: indices move.
  second = corpus.run(str(inputs / "*.warc.gz"), str(out), workers=1)
  fresh = corpus.run(str(inputs / "*.warc.gz"), str(tmp_path / "fresh"), workers=1)
  for key in ("records", "documents", "stages"):
    assert second[key] == fresh[key], key
  got = {f.name: list(corpus.read_jsonl_zst(f)) for f in sorted(out.glob("*.jsonl.zst"))}
  want = {f.name: list(corpus.read_jsonl_zst(f)) for f in sorted((tmp_path / "fresh").glob("*.jsonl.zst"))}
  assert got == want
  assert any("inputs changed since its last run (added 00000-000-added" in w for w in warnings), warnings
  n = second["stages"]["dedup"]["in"]
  assert n > first["stages"]["dedup"]["in"]
  assert len(np.load(out / "work" / "duplicates.npy")) == n
  # Touching an input (same name, new content) also invalidates it.
  warnings.clear()
  victim = sorted(inputs.glob("*.warc.gz"))[-1]
  victim.write_bytes(b"")
  third = corpus.run(str(inputs / "*.warc.gz"), str(out), workers=1)
  assert any("changed 00002-" in w for w in warnings) and third["documents"] < second["documents"], warnings
