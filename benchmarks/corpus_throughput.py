r"""Corpus pipeline throughput and deduplication quality on a generated crawl (issue: web corpus pipeline).

Generates >= 10,000 pages from the real Japanese paragraphs of ../shared/data/text_ja/pretrain_ja.jsonl
(jpllm_jax/corpus/synthetic.py: page templates with navigation, ads and footers; planted exact, near and
medium duplicates; English, spam and short pages) into a temporary directory, then measures

  * per stage, on one core: pages/s of WARC reading, byte-level Japanese detection, extraction, the text
    language check, the quality rules, MinHash signatures and normalisation;
  * end to end: `jpllm_jax.corpus.pipeline.run` with all cores, pages/s per core;
  * dedup precision/recall on the planted pairs: recall at Jaccard >= 0.9, false positives below 0.5.

  python benchmarks/corpus_throughput.py [--pages 10000] [--shards 4] [--workers 2]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jpllm_jax.corpus import extract, langid, minhash, normalize, pipeline, quality, synthetic, warc  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(REPO, "..", "shared", "data", "text_ja", "pretrain_ja.jsonl")


def _rate(n: int, seconds: float) -> float:
  return round(n / max(seconds, 1e-9), 1)


def stage_rates(paths: list[str], config: pipeline.CorpusConfig) -> dict[str, float]:
  """Single-process pages (or documents) per second of each stage, on the stage's real inputs."""
  t = time.perf_counter()
  stats: collections.Counter = collections.Counter()
  pages = [p for path in paths for p in warc.iter_pages(path, stats)]
  rates = {"warc_read": _rate(len(pages), time.perf_counter() - t)}

  t = time.perf_counter()
  ja = [p for p in pages if langid.detect_page(p.html, p.http_charset)[0]]
  rates["lang_pre"] = _rate(len(pages), time.perf_counter() - t)

  t = time.perf_counter()
  texts = [x for x in (extract.extract_text(p.html, p.url, p.http_charset) for p in ja) if x]
  rates["extract"] = _rate(len(ja), time.perf_counter() - t)

  t = time.perf_counter()
  texts_ja = [x for x in texts if langid.is_japanese_text(x, config.min_japanese_fraction)]
  rates["lang_text"] = _rate(len(texts), time.perf_counter() - t)

  t = time.perf_counter()
  good = [x for x in texts_ja if quality.reject_reason(x, config.quality)[0] is None]
  rates["quality"] = _rate(len(texts_ja), time.perf_counter() - t)

  t = time.perf_counter()
  for x in good:
    minhash.band_keys(minhash.signature(x, config.minhash), config.minhash)
  rates["minhash_signature"] = _rate(len(good), time.perf_counter() - t)

  t = time.perf_counter()
  for x in good:
    normalize.normalize(x, config.normalize)
  rates["normalize"] = _rate(len(good), time.perf_counter() - t)
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
  args = ap.parse_args()
  paragraphs = [json.loads(line)["text"] for line in open(TEXT, encoding="utf-8")]
  config = pipeline.CorpusConfig()
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    manifest = synthetic.make_crawl_shards(paragraphs, args.pages, os.path.join(tmp, "crawl"), args.shards, seed=0)
    gen_s = time.perf_counter() - t
    paths = pipeline.expand_inputs(os.path.join(tmp, "crawl", "*.warc.gz"))
    rates = stage_rates(paths[:1], config)
    print(json.dumps({"stage_pages_per_s_one_core": rates}), flush=True)
    out = os.path.join(tmp, "out")
    result = pipeline.run(paths, out, config, workers=args.workers)
    dedup = dedup_quality(out, manifest)
  per_core = result["pages_per_s"] / args.workers
  slowest = min(rates, key=rates.get)
  print(json.dumps({
      "benchmark": "corpus_throughput", "pages": result["records"], "shards": args.shards,
      "workers": args.workers, "generate_s": round(gen_s, 1), "end_to_end_pages_per_s": round(result["pages_per_s"], 1),
      "end_to_end_pages_per_s_per_core": round(per_core, 1), "stage_pages_per_s_one_core": rates,
      "slowest_stage": slowest, "documents_out": result["documents"],
      "dropped": {s: v["dropped"] for s, v in result["stages"].items()}, "dedup": dedup,
      "seconds": {k: round(v, 1) for k, v in result["seconds"].items()}}))


if __name__ == "__main__":
  main()
