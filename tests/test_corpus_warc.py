"""WARC / WET reading: the real Common Crawl samples, record classification and its accounting, and damaged
files (truncated at many offsets, garbage between and inside gzip members, uncompressed and single-member)."""
from __future__ import annotations

import collections
import gzip
import random
import zlib

import pytest

from conftest import SHARED_DATA
from jpllm_jax.corpus import warc

WARCS = SHARED_DATA / "web" / "warc"
pytestmark = pytest.mark.skipif(not WARCS.exists(), reason=f"no shared WARC files at {WARCS}")

RECORD_KEYS = ("pages", "skip_not_response", "skip_not_html", "skip_http_status", "skip_broken_record")


def _read(path):
  stats = collections.Counter()
  pages = list(warc.iter_pages(path, stats))
  return pages, stats


def _check_accounting(stats):
  """records == pages + the record-level skips; skip_truncated counts damaged regions, outside the sum."""
  assert set(stats) <= {"records", "skip_truncated", *RECORD_KEYS}, stats
  assert stats["records"] == sum(stats[k] for k in RECORD_KEYS), stats


def _member_ends(data: bytes) -> list[int]:
  ends, pos = [], 0
  while pos < len(data):
    d = zlib.decompressobj(31)
    d.decompress(data[pos:])
    pos = len(data) - len(d.unused_data)
    ends.append(pos)
  return ends


def _gunzip_all(data: bytes) -> bytes:
  out, rest = b"", data
  while rest:
    d = zlib.decompressobj(31)
    out += d.decompress(rest)
    rest = d.unused_data
  return out


# ------------------------------------------------------------------------------------------- real files
@pytest.mark.parametrize("name,records,pages,not_response", [
    ("ja_pages", 3, 3, 0), ("resiliparse_warcfile", 50, 16, 34), ("warcio_example", 6, 1, 5),
    ("whirlwind", 4, 1, 3)])
def test_real_files_are_counted_record_by_record(name, records, pages, not_response):
  got, stats = _read(WARCS / f"{name}.warc.gz")
  _check_accounting(stats)
  assert (stats["records"], stats["pages"], stats["skip_not_response"]) == (records, pages, not_response)
  assert len(got) == pages and stats["skip_truncated"] == 0
  for p in got:
    assert p.record_id.startswith("<urn:uuid:") and p.url.startswith("http") and p.date[:2] == "20"
    assert p.host == p.host.lower() and ":" not in p.host and p.host in p.url
    assert b"<html" in p.html[:2000].lower()


def test_page_fields_and_payload_decoding():
  ja, _ = _read(WARCS / "ja_pages.warc.gz")
  assert [p.host for p in ja] == ["hukumusume.com", "www.nikkei.com", "www3.nhk.or.jp"]
  assert all(p.date == "2020-01-01T00:00:00Z" and p.http_charset == "utf-8" for p in ja)
  # The real HTML files are the payloads, byte for byte.
  assert ja[2].html == (SHARED_DATA / "web" / "trafilatura" / "nhk.or.jp.k100.html").read_bytes()
  # warcio's capture keeps the HTTP Content-Encoding: gzip; the page comes out decoded.
  (example,), _ = _read(WARCS / "warcio_example.warc.gz")
  assert example.url == "http://example.com/" and example.html.startswith(b"<!doctype html>")
  assert b"Example Domain" in example.html
  # A repeated Content-Type header: the charset of the first one that has it; the windows-1251 page.
  cc, _ = _read(WARCS / "resiliparse_warcfile.warc.gz")
  charsets = {p.host: p.http_charset for p in cc}
  assert charsets["035.psb556.com"] == "utf-8" and charsets["01spb.ru"] == "windows-1251"
  assert charsets["003338.cn"] is None


# --------------------------------------------------------------------------------------- classification
def _warc_record(rtype: str, block: bytes, uri: str | None = "http://Example.JP:8080/a", rid: str = "1",
                 content_type: str = "application/http; msgtype=response") -> bytes:
  head = [b"WARC/1.0", b"WARC-Type: " + rtype.encode(), b"WARC-Date: 2024-01-02T03:04:05Z",
          b"WARC-Record-ID: <urn:uuid:%s>" % rid.encode(), b"Content-Type: " + content_type.encode(),
          b"Content-Length: %d" % len(block)]
  if uri is not None:
    head.insert(2, b"WARC-Target-URI: " + uri.encode())
  return b"\r\n".join(head) + b"\r\n\r\n" + block + b"\r\n\r\n"


def _http(status: str = "200 OK", headers: tuple[str, ...] = ("Content-Type: text/html; charset=Shift_JIS",),
          body: bytes = b"<html><title>t</title></html>") -> bytes:
  return ("HTTP/1.1 " + status + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode() + body


def _chunked(body: bytes) -> bytes:
  return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7)) + b"0\r\n\r\n"


def test_each_record_is_classified_once(tmp_path):
  html = b"<html><head><title>x</title></head><body>" + "日本語".encode() * 50 + b"</body></html>"
  records = [
      _warc_record("warcinfo", b"software: test\r\n", uri=None, content_type="application/warc-fields"),
      _warc_record("request", b"GET / HTTP/1.1\r\nHost: example.jp\r\n\r\n",
                   content_type="application/http; msgtype=request"),
      _warc_record("response", _http(), rid="ok"),
      _warc_record("response", _http("301 Moved Permanently", ("Location: /b",), b"")),
      _warc_record("response", _http(headers=("Content-Type: image/png",), body=b"\x89PNG")),
      _warc_record("response", _http(headers=(), body=b"<!DOCTYPE html><html>sniffed</html>"), rid="sniff"),
      _warc_record("response", _http(headers=(), body=b"just text")),
      _warc_record("response", _http(), uri=None),
      _warc_record("response", b"HTTP/1.1 200 OK\r\nX: " + b"a" * 40000 + b"\r\n\r\n<html></html>"),
      _warc_record("response", b"no http here at all"),
      _warc_record("response", _http(headers=("Content-Type: text/html", "Content-Encoding: gzip"),
                                     body=b"not gzip, not html")),
      _warc_record("response", _http(headers=("Content-Type: application/xhtml+xml", "Content-Encoding: gzip",
                                              "Transfer-Encoding: chunked"),
                                     body=_chunked(gzip.compress(html))), uri="https://WWW.Example.jp./x", rid="enc"),
      _warc_record("revisit", _http()),
      _warc_record("metadata", b"fetchTimeMs: 1\r\n", content_type="application/warc-fields"),
  ]
  path = tmp_path / "mixed.warc.gz"
  path.write_bytes(b"".join(gzip.compress(r) for r in records))
  pages, stats = _read(path)
  _check_accounting(stats)
  assert dict(stats) == {"records": 14, "pages": 3, "skip_not_response": 4, "skip_http_status": 1,
                         "skip_not_html": 2, "skip_broken_record": 4}
  assert [p.record_id for p in pages] == ["<urn:uuid:ok>", "<urn:uuid:sniff>", "<urn:uuid:enc>"]
  ok, sniffed, enc = pages
  assert (ok.host, ok.url, ok.date, ok.http_charset) == ("example.jp", "http://Example.JP:8080/a",
                                                         "2024-01-02T03:04:05Z", "shift_jis")
  assert sniffed.http_charset is None and b"sniffed" in sniffed.html
  assert enc.host == "www.example.jp" and enc.html == html
  # The same records uncompressed, in one .warc file: the same result.
  plain = tmp_path / "mixed.warc"
  plain.write_bytes(b"".join(records))
  assert _read(plain) == (pages, stats)


def test_wet_texts(tmp_path):
  text = "日本語のテキストです。\n二行目。"
  records = [
      _warc_record("warcinfo", b"software: test\r\n", uri=None, content_type="application/warc-fields"),
      _warc_record("conversion", text.encode(), uri="http://A.example.jp/p", rid="c1", content_type="text/plain"),
      _warc_record("conversion", b"no uri", uri=None, rid="c2", content_type="text/plain"),
      _warc_record("conversion", "二つ目".encode(), uri="https://b.jp/", rid="c3", content_type="text/plain"),
  ]
  data = b"".join(gzip.compress(r) for r in records)
  path = tmp_path / "x.wet.gz"
  path.write_bytes(data)
  stats = collections.Counter()
  got = list(warc.iter_wet_texts(path, stats))
  assert dict(stats) == {"records": 4, "texts": 2, "skip_not_conversion": 1, "skip_broken_record": 1}
  assert got[0] == warc.WetText("<urn:uuid:c1>", "http://A.example.jp/p", "a.example.jp", "2024-01-02T03:04:05Z",
                                text)
  assert got[1].text == "二つ目" and got[1].host == "b.jp"
  path.write_bytes(data[:-10])  # the last member loses its gzip trailer: its record is lost, counted once.
  stats = collections.Counter()
  assert [t.record_id for t in warc.iter_wet_texts(path, stats)] == ["<urn:uuid:c1>"]
  assert stats["records"] == 3 and stats["skip_truncated"] == 1


# ------------------------------------------------------------------------------------------------ damage
@pytest.mark.parametrize("name", ["ja_pages", "resiliparse_warcfile", "whirlwind"])
def test_truncated_copies_keep_every_complete_record(name, tmp_path):
  """Cut a copy at many offsets (and around every gzip member boundary): nothing raises, the pages of the
  members that end before the cut all come out, and the damaged tail counts once under skip_truncated."""
  data = (WARCS / f"{name}.warc.gz").read_bytes()
  ends = _member_ends(data)
  assert len(ends) > 1  # one gzip member per record in these files.
  full, _ = _read(WARCS / f"{name}.warc.gz")
  path = tmp_path / "cut.warc.gz"
  pages_before = []  # pages in the members up to and including member i.
  for e in ends:
    path.write_bytes(data[:e])
    pages_before.append(len(_read(path)[0]))
  assert pages_before[-1] == len(full)
  rng = random.Random(0)
  cuts = {rng.randrange(1, len(data)) for _ in range(60)} | {e + k for e in ends for k in (-9, -1, 1, 30)}
  for cut in sorted(c for c in cuts if 0 < c < len(data)):
    path.write_bytes(data[:cut])
    pages, stats = _read(path)
    complete = sum(e <= cut for e in ends)
    expected = pages_before[complete - 1] if complete else 0
    assert [p.url for p in pages] == [p.url for p in full[:expected]], cut
    assert stats["skip_truncated"] == (0 if cut in ends else 1), (cut, stats)
    _check_accounting(stats)


def test_garbage_between_members_loses_nothing(tmp_path):
  data = (WARCS / "resiliparse_warcfile.warc.gz").read_bytes()
  ends = _member_ends(data)
  full, _ = _read(WARCS / "resiliparse_warcfile.warc.gz")
  rng = random.Random(1)
  for e in (ends[0], ends[4], ends[20], ends[-2]):
    path = tmp_path / "g.warc.gz"
    path.write_bytes(data[:e] + bytes(rng.randrange(256) for _ in range(300)) + data[e:])
    pages, stats = _read(path)
    assert pages == full and stats["skip_truncated"] == 1 and stats["records"] == 50


def test_a_corrupt_member_loses_only_its_own_record(tmp_path):
  data = (WARCS / "resiliparse_warcfile.warc.gz").read_bytes()
  ends = _member_ends(data)
  starts = [0] + ends[:-1]
  full, _ = _read(WARCS / "resiliparse_warcfile.warc.gz")
  rng = random.Random(2)
  path = tmp_path / "c.warc.gz"
  for i in (2, 5, 17, 44):  # response records (a member each).
    s, e = starts[i], ends[i]
    for where in (s + 1, s + 15, (s + e) // 2, e - 6):
      bad = bytearray(data)
      bad[where:min(where + 40, e)] = bytes(rng.randrange(256) for _ in range(min(40, e - where)))
      path.write_bytes(bytes(bad))
      pages, stats = _read(path)
      lost = [p.url for p in full if p.url not in {q.url for q in pages}]
      assert len(lost) == 1 and len(pages) == len(full) - 1, (i, where, lost)
      assert stats["skip_truncated"] == 1 and stats["records"] == 49, (i, where, stats)
      _check_accounting(stats)


def test_uncompressed_and_single_member_files(tmp_path):
  """An uncompressed WARC and a WARC compressed as one gzip member read the same; cut, they keep the records
  that end before the cut (an uncompressed file's damage ends the iteration)."""
  plain = _gunzip_all((WARCS / "resiliparse_warcfile.warc.gz").read_bytes())
  full, full_stats = _read(WARCS / "resiliparse_warcfile.warc.gz")
  (tmp_path / "a.warc").write_bytes(plain)
  (tmp_path / "b.warc.gz").write_bytes(gzip.compress(plain))
  assert _read(tmp_path / "a.warc") == (full, full_stats)
  assert _read(tmp_path / "b.warc.gz") == (full, full_stats)
  record_starts = [i for i in range(len(plain)) if plain.startswith(b"WARC/1.", i)] + [len(plain)]
  for cut in (record_starts[6] + 3, record_starts[6] + 200, record_starts[20] - 1000, len(plain) // 2):
    (tmp_path / "a.warc").write_bytes(plain[:cut])
    pages, stats = _read(tmp_path / "a.warc")
    whole = [p for p in full if plain.find(p.url.encode(), 0, cut) >= 0]  # those whose record began.
    assert [p.url for p in pages] == [p.url for p in whole][:len(pages)]
    assert len(pages) >= len(whole) - 1 and stats["skip_truncated"] == 1
    _check_accounting(stats)
  # Junk in the middle of an uncompressed file: the records before it survive, and nothing raises.
  (tmp_path / "a.warc").write_bytes(plain[:record_starts[10]] + b"junk\r\n" * 20 + plain[record_starts[10]:])
  pages, stats = _read(tmp_path / "a.warc")
  assert pages == full[:3] and stats["skip_truncated"] == 1 and stats["records"] == 10
