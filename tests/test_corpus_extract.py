"""Japanese pre-detection on raw bytes (precision / recall on the shared real pages, charsets), the text
check after extraction, and trafilatura extraction against gold snippets of real Japanese pages."""
from __future__ import annotations

import collections
import json
import re
import time

import lxml.html
import pytest

from conftest import SHARED_DATA
from jpllm_jax.corpus import extract, langid, warc

WEB = SHARED_DATA / "web"
pytestmark = pytest.mark.skipif(not WEB.exists(), reason=f"no shared web pages at {WEB}")
STANDALONE = ("trafilatura/nhk.or.jp.k100.html", "readability/hukumusume/source.html",
              "newspaper/japanese_article.html")


def _pages(name):
  return list(warc.iter_pages(WEB / "warc" / f"{name}.warc.gz", collections.Counter()))


def _positives():
  """The 3 Japanese pages as WARC records (HTTP charset utf-8) and as standalone files (no HTTP charset)."""
  out = [(p.url, p.html, p.http_charset) for p in _pages("ja_pages")]
  return out + [(f, (WEB / f).read_bytes(), None) for f in STANDALONE]


def _negatives():
  """Every HTML response of the other three WARC files: Aragonese Wikipedia, example.com, and the Common
  Crawl sample (Chinese spam, Russian windows-1251, German, Dutch)."""
  return [(p.url, p.html, p.http_charset)
          for name in ("whirlwind", "resiliparse_warcfile", "warcio_example") for p in _pages(name)]


def _precision_recall(is_ja, positives, negatives):
  tp = sum(is_ja(h, cs) for _, h, cs in positives)
  fp = sum(is_ja(h, cs) for _, h, cs in negatives)
  return tp / max(tp + fp, 1), tp / len(positives)


# -------------------------------------------------------------------------------------------- detection
def test_detector_precision_and_recall_on_the_real_pages():
  pos, neg = _positives(), _negatives()
  assert (len(pos), len(neg)) == (6, 18)
  reasons = {u: langid.detect_page(h, cs) for u, h, cs in pos + neg}
  assert _precision_recall(lambda h, cs: langid.detect_page(h, cs)[0], pos, neg) == (1.0, 1.0)
  # Nikkei declares lang="ja"; NHK and hukumusume have no lang attribute and are found by their titles.
  assert reasons["https://www.nikkei.com/article/DGXMZO31897660Y8A610C1000000/"] == (True, "lang_attr")
  assert reasons["readability/hukumusume/source.html"] == (True, "title_ja")
  assert reasons["trafilatura/nhk.or.jp.k100.html"] == (True, "title_ja")
  assert reasons["http://01spb.ru/company/"] == (False, "not_ja_title")  # windows-1251, Russian title.
  assert collections.Counter(r for _, r in (reasons[u] for u, _, _ in neg)) == {"not_ja_title": 18}


def _title_rule(rule):
  def is_ja(html, cs):
    if langid.LANG_JA.search(html, 0, langid.HEAD_BYTES):
      return True
    return rule(langid.page_title(html, cs) or "")
  return is_ja


def test_why_kana_then_cld2_for_titles():
  """The character-class rule with a kanji ratio takes the 12 kanji-only Chinese titles for Japanese; CLD2
  alone is as good on the pages but misses a katakana Wikipedia title that the kana rule gets."""
  pos, neg = _positives(), _negatives()
  precision, recall = _precision_recall(_title_rule(langid.title_is_japanese_chars), pos, neg)
  assert (round(precision, 3), recall) == (0.333, 1.0)
  assert _precision_recall(_title_rule(langid.title_is_japanese_cld2), pos, neg) == (1.0, 1.0)
  # Recall on Japanese Wikipedia article names (short, often kanji only: hard for any title classifier).
  titles = sorted({json.loads(line)["title"] for line in open(SHARED_DATA / "text_ja" / "pretrain_ja.jsonl",
                                                             encoding="utf-8")} - {""})
  hits = {rule.__name__: sum(map(rule, titles))
          for rule in (langid.title_is_japanese, langid.title_is_japanese_cld2, langid.title_is_japanese_chars)}
  assert len(titles) == 59 and hits == {"title_is_japanese": 42, "title_is_japanese_cld2": 41,
                                        "title_is_japanese_chars": 57}


@pytest.mark.parametrize("charset", ["shift_jis", "euc-jp", "iso-2022-jp", "utf-8"])
def test_titles_in_undeclared_and_declared_charsets(charset):
  page = "<html><head><title>日本語のページ・テスト</title></head><body>本文です。</body></html>"
  raw = page.encode(charset)
  assert langid.detect_page(raw, None) == (True, "title_ja")  # no declaration at all: guessed.
  assert langid.decode_html(raw, None) == page
  meta = raw.replace(b"<head>", b'<head><meta http-equiv="Content-Type" content="text/html; charset=%s">'
                     % charset.encode())
  assert langid.detect_page(meta, "iso-8859-1") == (True, "title_ja")  # a server-default HTTP charset.
  assert "日本語のページ" in langid.decode_html(meta, "ISO-8859-1")
  assert langid.detect_page(raw, charset.upper()) == (True, "title_ja")


def test_detection_edge_cases():
  assert langid.detect_page(b'<!DOCTYPE html><HTML class="x" Lang="ja-JP"><title>Hello</title>', None) == (
      True, "lang_attr")
  assert langid.detect_page(b'<html xml:lang="ja"><title>Hello</title>', None)[0]
  assert langid.detect_page(b'<html lang="jam"><title>Hello</title>', None) == (False, "not_ja_title")
  assert langid.detect_page(b"<html><body>no title</body></html>", None) == (False, "no_title")
  assert langid.detect_page(b"<html><title>\x81\x7f\x81 </title></html>", "utf-8") == (False, "undecodable_title")
  assert langid.detect_page("<title>&#x65E5;&#x672C;&#x8A9E;&#x306E;</title>".encode(), None) == (True, "title_ja")
  assert langid.detect_page("<title>한국어 페이지</title>".encode(), None) == (False, "not_ja_title")
  # A Chinese page whose GBK charset is not declared: no kana appears under cp932 or EUC-JP.
  (p,) = [p for p in _pages("resiliparse_warcfile") if p.host == "077678u.info"]
  stripped = re.sub(rb"charset=[a-z0-9-]+", b"", p.html[:8192], flags=re.I) + p.html[8192:]
  assert langid.detect_page(stripped, None) == (False, "not_ja_title")


def test_is_japanese_text():
  assert langid.is_japanese_text("今日は良い天気です。散歩に行きましょう。")
  assert not langid.is_japanese_text("我国卫生与健康领域有了基本法，这是一个重要的进展。")  # Chinese: no hiragana.
  assert not langid.is_japanese_text("This is an English sentence with one の.")
  assert not langid.is_japanese_text("")
  assert langid.is_japanese_text("Python 3.11 で JAX を使う。", min_fraction=0.2)
  assert not langid.is_japanese_text("Python 3.11 で JAX を使う。", min_fraction=0.5)


# ------------------------------------------------------------------------------------------- extraction
def test_nhk_keeps_the_gold_snippets():
  gold = next(iter(json.loads((WEB / "trafilatura" / "nhk.or.jp.k100.evaldata.json").read_text()).values()))
  text = extract.extract_text((WEB / "trafilatura" / "nhk.or.jp.k100.html").read_bytes(),
                              "https://www3.nhk.or.jp/news/easy/k10011959621000/k10011959621000.html")
  for snippet in gold["with"]:
    assert snippet.strip() in text, snippet
  for snippet in gold["without"]:
    assert snippet.strip() not in text, snippet
  assert langid.is_japanese_text(text)


def test_hukumusume_keeps_the_story_and_drops_the_sidebar():
  expected = lxml.html.fromstring((WEB / "readability" / "hukumusume" / "expected.html").read_text()).text_content()
  sentences = [s.strip() for s in re.split(r"(?<=[。！？」）])|\n", expected) if len(s.strip()) >= 8]
  story = sentences[sentences.index("肉をくわえたイヌが、橋を渡っていました。"):
                    sentences.index("同じ物を持っていても、人が持っている物の方が良く見え、また、欲張るとけっきょく損をするというお話しです。") + 1]
  text = extract.extract_text((WEB / "readability" / "hukumusume" / "source.html").read_bytes())
  assert len(story) == 13 and all(s in text for s in story)
  # Readability's gold keeps the page's sidebar (43 lines in all); trafilatura drops it.
  assert sum(s in text for s in sentences) == 15
  for nav in ("きょうの日本昔話", "誕生日占い、お仕事紹介", "google_ad_client", "おりがみをつくろう"):
    assert nav not in text
  assert text.startswith("福娘童話集 > きょうのイソップ童話")  # the breadcrumb line stays.


def test_nikkei_paywall_page():
  """A paywalled article: the lead paragraph (newspaper's gold) comes out, with the paywall and save-button
  boilerplate around it; a quality filter has to deal with the rest."""
  gold = (WEB / "newspaper" / "japanese.txt").read_text().split("\n")[0].strip()
  text = extract.extract_text((WEB / "newspaper" / "japanese_article.html").read_bytes())
  assert gold in text
  assert "この記事は会員限定です" in text and "有料会員の方のみご利用になれます" in text
  assert 400 < len(text) < 600


def test_extract_edge_cases():
  assert extract.extract_text(b"") is None
  assert extract.extract_text("   ") is None
  assert extract.extract_text(b"\x00\x01garbage") is None
  body = "これはテストの文章です。" * 20
  page = f'<?xml version="1.0" encoding="shift_jis"?><html><body><article><p>{body}</p></article></body></html>'
  assert extract.extract_text(page) == body
  assert extract.extract_text(page.encode("shift_jis")) == body
  assert extract.extract_text(page.encode("shift_jis"), http_charset="Shift_JIS") == body


def test_extraction_speed_on_the_real_pages():
  pages = _pages("ja_pages") + _pages("whirlwind") + _pages("resiliparse_warcfile") + _pages("warcio_example")
  extract.extract_text(pages[0].html)  # warm-up.
  t = time.perf_counter()
  texts = [extract.extract_text(p.html, p.url, p.http_charset) for p in pages]
  rate = len(pages) / (time.perf_counter() - t)
  print(f"extract_text: {rate:.0f} pages/s on {len(pages)} real pages")
  assert sum(t is not None for t in texts) == len(pages) == 21
  assert rate > 5
