"""The synthetic crawl: valid WARC/1.0 (read back with fastwarc, digests checked), realistic pages, counts by
kind as in the manifest, and planted pairs whose exact body Jaccards lie in the promised ranges."""
from __future__ import annotations

import collections
import itertools
import json
import re

import pytest

from conftest import SHARED_DATA
from benchmarks import synthetic_crawl as synthetic
from jpllm_jax.corpus import minhash

fastwarc = pytest.importorskip("fastwarc.warc")
TEXT = SHARED_DATA / "text_ja" / "pretrain_ja.jsonl"
pytestmark = pytest.mark.skipif(not TEXT.exists(), reason=f"no shared corpus at {TEXT}")


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
  return [json.loads(line)["text"] for line in open(TEXT, encoding="utf-8")]


@pytest.fixture(scope="module")
def crawl(paragraphs, tmp_path_factory):
  path = tmp_path_factory.mktemp("crawl") / "crawl.warc.gz"
  manifest = synthetic.make_crawl(paragraphs, 60, str(path), seed=5)
  return path, manifest


def _read(path, parse_http=True):
  """(type, WARC headers, HTTP headers, payload, digest ok) per record; the payload digest when HTTP is
  parsed, else the block digest."""
  out = []
  with open(path, "rb") as f:
    for r in fastwarc.ArchiveIterator(f, parse_http=parse_http):
      response = r.record_type == fastwarc.WarcRecordType.response
      ok = (r.verify_payload_digest(consume=False) if parse_http else r.verify_block_digest(consume=False)) \
          if response else None
      out.append((r.record_type, dict(r.headers), dict(r.http_headers) if r.http_headers else None,
                  r.reader.read(), ok))
  return out


def _html(http_headers, payload) -> str:
  charset = re.search(r"charset=([\w-]+)", http_headers["Content-Type"]).group(1)
  return payload.decode("shift_jis" if charset == "Shift_JIS" else "utf-8")


def test_warc_parses_with_fastwarc_and_matches_the_manifest(crawl):
  path, manifest = crawl
  assert json.loads(path.with_name("crawl.manifest.json").read_text(encoding="utf-8")) == manifest
  records = _read(path)
  assert records[0][0] == fastwarc.WarcRecordType.warcinfo
  responses = [r for r in records if r[0] == fastwarc.WarcRecordType.response]
  assert len(records) == 61 and len(responses) == 60
  kinds = {p["url"]: p["kind"] for p in manifest["pages"]}
  seen = collections.Counter()
  for _, headers, http, payload, digest_ok in responses:
    assert digest_ok
    url = headers["WARC-Target-URI"]
    assert re.fullmatch(r"https://[a-z0-9.-]+/\S*", url)
    assert re.fullmatch(r"<urn:uuid:[0-9a-f-]{36}>", headers["WARC-Record-ID"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", headers["WARC-Date"])
    assert headers["Content-Type"] == "application/http; msgtype=response"
    assert int(http["Content-Length"]) == len(payload)
    assert http["Content-Type"] in ("text/html; charset=utf-8", "text/html; charset=Shift_JIS")
    seen[kinds[url]] += 1
  assert dict(seen) == {k: v for k, v in manifest["counts"].items() if v}
  assert sum(manifest["counts"].values()) == 60 and all(manifest["counts"][k] > 0 for k in synthetic.KINDS)
  # Block digests too (they cover the HTTP header block).
  assert all(ok for t, *_, ok in _read(path, parse_http=False) if t == fastwarc.WarcRecordType.response)


def test_pages_look_like_real_japanese_sites(crawl):
  path, manifest = crawl
  by_url = {p["url"]: p for p in manifest["pages"]}
  charsets, langs = collections.Counter(), collections.Counter()
  for t, headers, http, payload, _ in _read(path):
    if t != fastwarc.WarcRecordType.response:
      continue
    page = by_url[headers["WARC-Target-URI"]]
    html = _html(http, payload)
    charsets[page["charset"]] += 1
    assert f"charset={page['charset']}" in http["Content-Type"]
    lang = re.search(r"<html( lang=\"(\w+)\")?>", html).group(2)
    langs[lang] += 1
    assert lang == page["lang"]
    assert "<nav" in html and "<ul><li>" in html and "<article" in html and "<footer" in html
    body = synthetic.body_texts_from_html(html)
    assert len(body) == page["body_chars"]
    title = re.search(r"<title>(.*?)</title>", html).group(1)
    if page["kind"] == "english":
      assert lang == "en" and body.isascii() and "Copyright" in html
    else:
      assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", title), title
      assert "Copyright ©" in html or "Copyright &#169;" in html
      assert any(w in html for w in ("会社概要", "プライバシーポリシー", "利用規約", "お問い合わせ"))
      assert "人気記事" in html and "広告" in html
    if page["kind"] in ("unique", "exact_dup", "related"):
      assert 3 <= body.count("\n") + 1 <= 8 and len(body) >= synthetic.MIN_BODY_CHARS
    elif page["kind"] == "short":
      assert len(body) <= 200
    elif page["kind"] == "spam":
      lines = body.split("\n")
      assert len(lines) >= 25 and len({w for line in lines for w in line.split()}) < len(lines) * 2
  assert charsets["Shift_JIS"] >= 1 and langs[None] >= 1 and langs["ja"] > langs[None]


def test_planted_pairs_have_the_promised_jaccards(crawl):
  path, manifest = crawl
  bodies = {}
  for t, headers, http, payload, _ in _read(path):
    if t == fastwarc.WarcRecordType.response:
      bodies[headers["WARC-Target-URI"]] = synthetic.body_texts_from_html(_html(http, payload))
  ranges = {"exact_dup": (1.0, 1.0 + 1e-9), "near_dup": synthetic.NEAR_RANGE, "similar": synthetic.SIMILAR_RANGE,
            "related": synthetic.RELATED_RANGE}
  kinds = {p["url"]: p["kind"] for p in manifest["pages"]}
  planted = set()
  for p in manifest["pairs"]:
    j = minhash.jaccard(bodies[p["url_a"]], bodies[p["url_b"]])
    assert j == pytest.approx(p["jaccard"], abs=1e-12)
    a, b = p["kinds"]
    assert (kinds[p["url_a"]], kinds[p["url_b"]]) == (a, b)
    if a == "unique":  # base -> derived page.
      lo, hi = ranges[b]
      assert lo <= j < hi, (b, j)
    planted.add(frozenset((p["url_a"], p["url_b"])))
  derived = [p for p in manifest["pages"] if p["kind"] in ranges]
  assert all(p["group"] is not None for p in derived)
  # Every pair of the crawl with body Jaccard >= 0.5 is a planted pair.
  for (ua, a), (ub, b) in itertools.combinations(bodies.items(), 2):
    if minhash.jaccard(a, b) >= 0.5:
      assert frozenset((ua, ub)) in planted, (kinds[ua], kinds[ub])


def test_generation_is_deterministic_and_sharded(paragraphs, tmp_path):
  m1 = synthetic.make_crawl_shards(paragraphs, 40, str(tmp_path / "a"), 2, seed=9)
  m2 = synthetic.make_crawl_shards(paragraphs, 40, str(tmp_path / "b"), 2, seed=9)
  assert m1 == m2 and m1["files"] == ["00000.warc.gz", "00001.warc.gz"]
  for name in m1["files"]:
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    records = _read(tmp_path / "a" / name)
    assert records[0][0] == fastwarc.WarcRecordType.warcinfo and len(records) == 21
  assert json.loads((tmp_path / "a" / "manifest.json").read_text(encoding="utf-8")) == m1
  assert collections.Counter(p["shard"] for p in m1["pages"]) == {0: 20, 1: 20}
  assert len({p["url"] for p in m1["pages"]}) == 40
  m3 = synthetic.make_crawl_shards(paragraphs, 40, str(tmp_path / "c"), 1, seed=10)
  assert [p["url"] for p in m3["pages"]] != [p["url"] for p in m1["pages"]]
  only = synthetic.make_crawl(paragraphs, 12, str(tmp_path / "e.warc.gz"), fractions={"english": 1.0})
  assert only["counts"]["english"] == 12 and only["pairs"] == []
