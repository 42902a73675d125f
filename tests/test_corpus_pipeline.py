"""The whole corpus pipeline on real and generated WARC files: accounting, idempotent re-runs, a corrupted
input, the Ray executor giving the local output, and the command line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA
from benchmarks import synthetic_crawl as synthetic
from jpllm_jax.corpus import pipeline

WARCS = SHARED_DATA / "web" / "warc"
TEXT = SHARED_DATA / "text_ja" / "pretrain_ja.jsonl"
pytestmark = pytest.mark.skipif(not WARCS.exists(), reason=f"no shared WARC files at {WARCS}")


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
  """Two generated shards (planted duplicates across them) plus copies of the four real WARC files."""
  d = tmp_path_factory.mktemp("crawl")
  paragraphs = [json.loads(line)["text"] for line in open(TEXT, encoding="utf-8")]
  manifest = synthetic.make_crawl_shards(paragraphs, 160, str(d), 2, seed=1)
  for f in WARCS.glob("*.warc.gz"):
    shutil.copy(f, d / f.name)
  return d, manifest


def _documents(out):
  docs = {}
  for f in sorted(out.glob("*.jsonl.zst")):
    for doc in pipeline.read_jsonl_zst(f):
      docs[doc["url"]] = doc
  return docs


def test_every_record_is_accounted_for_and_documents_are_clean(crawl, tmp_path):
  d, manifest = crawl
  result = pipeline.run(str(d / "*.warc.gz"), str(tmp_path), workers=2)
  stages = result["stages"]
  pipeline.check_accounting(stages)
  stats = json.loads((tmp_path / "stats.json").read_text())
  assert stats["stages"] == stages and stats["documents"] == result["documents"]
  # Every record of every input: 160 generated pages + 2 warcinfo records, and the real files' records.
  assert stages["warc"]["in"] >= 162 + 50
  assert stages["warc"]["dropped"]["not_response"] > 0
  assert stages["dedup"]["dropped"].get("minhash_duplicate", 0) > 0
  docs = _documents(tmp_path)
  assert len(docs) == result["documents"] > 20
  kinds = {p["url"]: p["kind"] for p in manifest["pages"]}
  for url, doc in docs.items():
    assert set(doc) >= {"id", "url", "host", "date", "text", "quality"}
    assert kinds.get(url, "real") not in ("english", "spam", "short"), url
    assert len(doc["text"]) >= 400


def test_rerun_is_idempotent_and_redoes_only_missing_shards(crawl, tmp_path):
  d, _ = crawl
  first = pipeline.run(str(d / "*.warc.gz"), str(tmp_path), workers=1)
  before = {f.name: f.read_bytes() for f in tmp_path.glob("*.jsonl.zst")}
  victim = sorted(tmp_path.glob("*.jsonl.zst"))[0]
  victim.unlink()
  (tmp_path / pipeline.WORK / victim.name.replace(".jsonl.zst", ".final.json")).unlink()
  second = pipeline.run(str(d / "*.warc.gz"), str(tmp_path), workers=1)
  assert second["stages"] == first["stages"]
  assert {f.name: f.read_bytes() for f in tmp_path.glob("*.jsonl.zst")} == before


def test_a_truncated_warc_loses_only_its_damaged_records(tmp_path):
  src = (WARCS / "ja_pages.warc.gz").read_bytes()
  inputs = tmp_path / "in"
  inputs.mkdir()
  (inputs / "cut.warc.gz").write_bytes(src[: int(len(src) * 0.8)])
  full = pipeline.run(str(WARCS / "ja_pages.warc.gz"), str(tmp_path / "full"), workers=1)
  cut = pipeline.run(str(inputs / "cut.warc.gz"), str(tmp_path / "cut"), workers=1)
  pipeline.check_accounting(cut["stages"])
  assert cut["stages"]["warc"]["dropped"].get("truncated", 0) >= 1
  assert 1 <= cut["stages"]["warc"]["kept"] < full["stages"]["warc"]["kept"]


def test_ray_executor_gives_the_local_output(crawl, tmp_path):
  pytest.importorskip("ray")
  d, _ = crawl
  local = pipeline.run(str(d / "*.warc.gz"), str(tmp_path / "local"), workers=2)
  remote = pipeline.run(str(d / "*.warc.gz"), str(tmp_path / "ray"), executor="ray", workers=2)
  assert remote["stages"] == local["stages"]
  assert _documents(tmp_path / "ray") == _documents(tmp_path / "local")


def test_command_line(crawl, tmp_path):
  d, _ = crawl
  out = subprocess.run(
      [sys.executable, "-m", "experiments.corpus", f"--input={d}/00000*.warc.gz", f"--output={tmp_path}",
       "--workers=1", "--config.quality.min_length=300"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  stats = json.loads((tmp_path / "stats.json").read_text())
  assert summary["documents"] == stats["documents"]
  assert stats["config"]["quality"]["min_length"] == 300
