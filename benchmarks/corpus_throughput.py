r"""Corpus pipeline throughput and deduplication quality on a generated crawl (issue: web corpus pipeline).

Generates >= 10,000 pages from the real Japanese paragraphs of ../shared/data/text_ja/pretrain_ja.jsonl
(benchmarks/synthetic_crawl.py: page templates with navigation, ads and footers; planted exact, near and
medium duplicates; English, spam and short pages) into a temporary directory, then measures

  * per stage, on one core: pages/s of WARC reading, byte-level Japanese detection, extraction, the text
    language check, the quality rules, MinHash signatures and normalisation;
  * end to end: `jpllm_jax.corpus.pipeline.run` with all cores, pages/s per core;
  * dedup precision/recall on the planted pairs: recall at Jaccard >= 0.9, false positives below 0.5.

Every timing is repeated (--repeats, default 3; the end-to-end run into a fresh directory each time) and the
final JSON line reports the median and the spread (min, max) of each rate.

  python benchmarks/corpus_throughput.py [--pages 10000] [--shards 4] [--workers 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import synthetic_crawl  # noqa: E402
from jpllm_jax.corpus import extract, langid, minhash, normalize, pipeline, quality, warc  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(REPO, "..", "shared", "data", "text_ja", "pretrain_ja.jsonl")


def _timed(fn, repeats: int):
  """fn's result and its wall times over `repeats` runs (single runs swing with the load of a shared machine)."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return out, times


def _summary(rates: list[float]) -> dict[str, float]:
  """Median and spread of repeated rates."""
  return {"median": round(statistics.median(rates), 1), "min": round(min(rates), 1), "max": round(max(rates), 1)}


def stage_rates(paths: list[str], config: pipeline.CorpusConfig, repeats: int) -> dict[str, dict[str, float]]:
  """Single-process pages (or documents) per second of each stage, on the stage's real inputs."""
  def stage(name, fn, n_in):
    out, times = _timed(fn, repeats)
    rates[name] = _summary([n_in / max(t, 1e-9) for t in times])
    return out

  rates: dict[str, dict[str, float]] = {}
  pages = [p for path in paths for p in warc.iter_pages(path, collections.Counter())]
  stage("warc_read", lambda: [p for path in paths for p in warc.iter_pages(path, collections.Counter())], len(pages))
  ja = stage("lang_pre", lambda: [p for p in pages if langid.detect_page(p.html, p.http_charset)[0]], len(pages))
  texts = stage("extract", lambda: [x for x in (extract.extract_text(p.html, p.url, p.http_charset) for p in ja)
                                    if x], len(ja))
  texts_ja = stage("lang_text", lambda: [x for x in texts if langid.is_japanese_text(x, config.min_japanese_fraction)],
                   len(texts))
  good = stage("quality", lambda: [x for x in texts_ja if quality.reject_reason(x, config.quality)[0] is None],
               len(texts_ja))
  stage("minhash_signature",
        lambda: [minhash.band_keys(minhash.signature(x, config.minhash), config.minhash) for x in good], len(good))
  stage("normalize", lambda: [normalize.normalize(x, config.normalize) for x in good], len(good))
  return rates


def dedup_quality(out_dir: str, manifest: dict) -> dict[str, float]:
  """Dedup quality over the planted pairs whose both pages reached the dedup stage (others were dropped
  before it, by the quality rules for instance).

  A pair at Jaccard >= 0.9 is found when its two pages are not both kept (one may go as a copy of a third
  member of its group). A pair below 0.5 is a false positive when the two pages share a band key, i.e. one
  was dropped *because of* the other (dropping both for a third, true duplicate is no error)."""
  work = os.path.join(out_dir, pipeline.WORK)
  keys, kept = {}, set()
  for name in sorted(os.listdir(work)):
    if name.endswith(".candidates.jsonl.zst"):
      urls = [d["url"] for d in pipeline.read_jsonl_zst(os.path.join(work, name))]
      _, matrix = minhash.load_band_keys([os.path.join(work, name.replace(".candidates.jsonl.zst", ".bands"))])
      keys.update(zip(urls, matrix))
  for name in sorted(os.listdir(out_dir)):
    if name.endswith(".jsonl.zst"):
      kept.update(d["url"] for d in pipeline.read_jsonl_zst(os.path.join(out_dir, name)))
  reached = [p for p in manifest["pairs"] if p["url_a"] in keys and p["url_b"] in keys]
  high = [p for p in reached if p["jaccard"] >= 0.9]
  low = [p for p in reached if p["jaccard"] < 0.5]
  found = sum(not (p["url_a"] in kept and p["url_b"] in kept) for p in high)
  false_pos = sum(bool((keys[p["url_a"]] == keys[p["url_b"]]).any()) for p in low)
  return {"pairs_jaccard_ge_0.9": len(high), "recall_ge_0.9": round(found / max(len(high), 1), 4),
          "pairs_jaccard_lt_0.5": len(low), "false_positives_lt_0.5": false_pos}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--pages", type=int, default=10_000)
  ap.add_argument("--shards", type=int, default=4)
  ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  paragraphs = [json.loads(line)["text"] for line in open(TEXT, encoding="utf-8")]
  config = pipeline.CorpusConfig()
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    manifest = synthetic_crawl.make_crawl_shards(paragraphs, args.pages, os.path.join(tmp, "crawl"), args.shards,
                                                 seed=0)
    gen_s = time.perf_counter() - t
    paths = pipeline.expand_inputs(os.path.join(tmp, "crawl", "*.warc.gz"))
    rates = stage_rates(paths[:1], config, args.repeats)
    print(json.dumps({"stage_pages_per_s_one_core": rates}), flush=True)
    results = []
    for i in range(args.repeats):  # a fresh output directory each time: a re-run would skip finished shards
      out = os.path.join(tmp, f"out{i}")
      results.append(pipeline.run(paths, out, config, workers=args.workers))
    dedup = dedup_quality(out, manifest)
  result = results[-1]
  end_to_end = [r["pages_per_s"] for r in results]
  slowest = min(rates, key=lambda k: rates[k]["median"])
  print(json.dumps({
      "benchmark": "corpus_throughput", "pages": result["records"], "shards": args.shards,
      "workers": args.workers, "repeats": args.repeats, "generate_s": round(gen_s, 1),
      "end_to_end_pages_per_s": _summary(end_to_end),
      "end_to_end_pages_per_s_per_core": _summary([r / args.workers for r in end_to_end]),
      "stage_pages_per_s_one_core": rates, "slowest_stage": slowest, "documents_out": result["documents"],
      "dropped": {s: v["dropped"] for s, v in result["stages"].items()}, "dedup": dedup,
      "seconds": {k: round(v, 1) for k, v in result["seconds"].items()}}))


if __name__ == "__main__":
  main()
