"""Reading crawl archives: HTML pages from WARC files and plain texts from WET files, robust to damage.

`iter_pages(path, stats)` yields one `Page` per HTTP-200 HTML `response` record of a `.warc.gz` / `.warc`
file; `iter_wet_texts(path, stats)` yields one `WetText` per `conversion` record of a `.wet.gz` / `.wet`
file. Records are parsed with fastwarc.

Damage. A gzip-compressed archive (Common Crawl writes one gzip member per record) is split into its gzip
members here, with zlib, and each member is parsed on its own: a member that is truncated (the file ends
inside it) or corrupt (a zlib error, or bytes that are no gzip member at all) loses only the records that
member holds, and reading goes on at the next gzip member found after the damage. An uncompressed archive
is one stream: damage there ends the iteration. Neither case raises; each damaged region logs a warning.

Accounting. Every record is counted in `stats` (a `collections.Counter`) exactly once:

  iter_pages:      records == pages + skip_not_response + skip_not_html + skip_http_status
                             + skip_broken_record
  iter_wet_texts:  records == texts + skip_not_conversion + skip_broken_record

`skip_truncated` is outside that sum: it counts damaged regions (a run of damaged gzip members and stray
bytes up to the next intact member, or the damaged tail of an uncompressed file), not records, because how
many records a damaged region held is unknown. A record that is damaged itself (its block shorter than its
Content-Length, no Content-Length, or the only record of a damaged gzip member) is part of its region and
is not counted under "records". So `records + skip_truncated` is "records read or lost", which is what a
per-stage `in` count should use.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import urllib.parse
import zlib
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from absl import logging
from fastwarc.warc import ArchiveIterator, WarcRecordType

_GZIP_MAGIC = b"\x1f\x8b\x08"
_IN_CHUNK = 1 << 16  # compressed bytes per zlib call.
_OUT_CHUNK = 1 << 22  # decompressed bytes per zlib call at most (bounds a gzip bomb's buffer).
_READ_CHUNK = 1 << 20  # bytes per file read.
_MAX_RESYNC_SPAN = 16 << 20  # a damaged member larger than this is rescanned from the damage, not its start.
_HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclasses.dataclass
class Page:
  """One HTML page: an HTTP-200 HTML `response` record.

  `host` is the URL's host, lowercased, without port, user info or a trailing dot; `date` is the WARC-Date
  header verbatim; `html` is the HTTP payload with any transfer and content encoding (chunked, gzip,
  deflate, br, zstd) removed; `http_charset` is the charset parameter of the HTTP Content-Type, lowercased,
  or None.
  """
  record_id: str
  url: str
  host: str
  date: str
  html: bytes
  http_charset: str | None


class WetText(NamedTuple):
  """One extracted text: a WET `conversion` record (the text is decoded as UTF-8, bad bytes replaced)."""
  record_id: str
  url: str
  host: str
  date: str
  text: str


# -------------------------------------------------------------------------------------------- raw records
@dataclasses.dataclass
class _Record:
  """What the classifiers need of a record, copied out of fastwarc (whose record is a live stream)."""
  rtype: WarcRecordType
  headers: dict[str, str]
  block: bytes | None  # the payload (after the HTTP headers when parsed); None when not kept.
  damaged: bool  # shorter than its Content-Length, or no Content-Length.
  status: int | None = None  # HTTP status; None when not HTTP or unparsable.
  http_headers: dict[str, str] | None = None  # lowercased names.


def _snapshot(record, keep_block: bool, parse_http: bool) -> _Record:
  """Reads a fastwarc record (its whole block) into a `_Record`; HTTP headers are parsed for kept blocks.

  HTTP parsing is per record, not by the iterator, so that one record with unparsable HTTP headers (e.g.
  longer than fastwarc's 32 KB limit, which makes the iterator raise) is a broken record, not damage.
  """
  headers = dict(record.headers.items())
  status = http_headers = None
  if keep_block and parse_http and record.is_http:
    try:
      record.parse_http()
      status = record.http_headers.status_code
      http_headers = {}
      for k, v in record.http_headers.items():  # the first of repeated headers; all Content-Types.
        k = k.lower()
        if k == "content-type" and k in http_headers:
          http_headers[k] += "\n" + v
        else:
          http_headers.setdefault(k, v)
    except BaseException as e:  # pylint: disable=broad-except
      if _is_fatal(e):
        raise
  declared = record.content_length
  if keep_block:
    block = record.reader.read()
    got = len(block)
  else:
    block = None
    got = record.reader.consume()
  damaged = got < declared or not record.headers.get("Content-Length")
  return _Record(record.record_type, headers, block, damaged, status, http_headers)


def _is_fatal(e: BaseException) -> bool:
  """Exceptions that must propagate; everything else (fastwarc's OSError, a Rust panic) is damage."""
  return isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError))


class _Source:
  """A buffered binary file with cheap push-back of the tail of what was just taken, and a mark to rewind to."""

  def __init__(self, f: BinaryIO):
    self._f = f
    self._data = b""
    self._pos = 0  # next unread byte in _data.
    self._base = 0  # file offset of _data[0].
    self._mark: int | None = None  # file offset that must stay rewindable.
    self._eof = False

  def tell(self) -> int:
    """File offset of the next unread byte."""
    return self._base + self._pos

  def _fill(self) -> bool:
    """Reads another chunk; False at the end of the file."""
    if self._eof:
      return False
    chunk = self._f.read(_READ_CHUNK)
    if not chunk:
      self._eof = True
      return False
    keep = self._pos
    if self._mark is not None and self.tell() - self._mark <= _MAX_RESYNC_SPAN:
      keep = max(0, self._mark - self._base)
    elif self._mark is not None:
      self._mark = None  # too far back to rescan from; a resync then starts at the damage.
    self._base += keep
    self._data = self._data[keep:] + chunk
    self._pos -= keep
    return True

  def take(self, n: int) -> bytes:
    """Up to n bytes (fewer at a chunk boundary); b"" only at the end of the file."""
    if self._pos >= len(self._data) and not self._fill():
      return b""
    out = self._data[self._pos:self._pos + n]
    self._pos += len(out)
    return out

  def unread(self, n: int) -> None:
    """Gives back the last n bytes of the last `take`."""
    self._pos -= n

  def peek(self, n: int) -> bytes:
    """The next n bytes (fewer only at the end of the file), without consuming them."""
    while len(self._data) - self._pos < n and self._fill():
      pass
    return self._data[self._pos:self._pos + n]

  def set_mark(self) -> None:
    self._mark = self.tell()

  def rewind_after_mark(self) -> None:
    """Goes back to one byte after the mark (when it is still held), so a rescan can find a member there."""
    if self._mark is not None and self._mark >= self._base:
      self._pos = self._mark - self._base + 1
    self._mark = None

  def skip_to_magic(self) -> bool:
    """Discards bytes up to the next gzip magic; False when the file ends first."""
    while True:
      i = self._data.find(_GZIP_MAGIC, self._pos)
      if i >= 0:
        self._pos = i
        return True
      self._pos = max(self._pos, len(self._data) - len(_GZIP_MAGIC) + 1)
      if not self._fill():
        self._pos = len(self._data)
        return False


class _MemberStream:
  """The decompressed bytes of one gzip member as a readable stream for fastwarc.

  The stream ends at the member's end; when the member is truncated or corrupt it ends where the damage
  is found and `damaged` is set (with `error`). The source is left at the byte after a clean member.
  """

  def __init__(self, src: _Source):
    self._src = src
    self._d = zlib.decompressobj(31)
    self._buf = bytearray()
    self._pos = 0  # decompressed bytes handed out.
    self.done = False
    self.damaged = False
    self.error = ""

  def _pump(self) -> None:
    piece = self._src.take(_IN_CHUNK)
    if not piece:
      self.done, self.damaged, self.error = True, True, "the file ends inside a gzip member"
      return
    try:
      data = self._d.decompress(piece, _OUT_CHUNK)
    except zlib.error as e:
      self.done, self.damaged, self.error = True, True, f"zlib: {e}"
      return
    self._src.unread(len(self._d.unconsumed_tail) + len(self._d.unused_data))
    if self._d.eof:
      self.done = True
    self._buf += data

  def read(self, size: int = -1) -> bytes:
    while not self.done and (size < 0 or len(self._buf) < size):
      self._pump()
    n = len(self._buf) if size < 0 else min(size, len(self._buf))
    out = bytes(self._buf[:n])
    del self._buf[:n]
    self._pos += n
    return out

  def tell(self) -> int:
    return self._pos

  def drain(self) -> None:
    """Reads to the member's end (or its damage), discarding the bytes."""
    while not self.done:
      self._pump()
      self._pos += len(self._buf)
      self._buf.clear()


class _Segment:
  """The outcome of parsing one stream: whether the stream or its WARC structure was damaged."""

  def __init__(self):
    self.damaged = False
    self.error = ""


def _segment_records(stream, keep, parse_http: bool, is_member: bool, seg: _Segment) -> Iterator[_Record]:
  """The intact records of one stream (a gzip member, or a whole uncompressed file).

  Each record is held back until the next one has been parsed (or the stream has ended), because only then
  is it known whether the stream was damaged inside it.
  """
  prev: _Record | None = None
  n = 0
  try:
    for record in ArchiveIterator(stream, record_types=WarcRecordType.any_type, parse_http=False,
                                  stream_detect=not is_member):
      rec = _snapshot(record, keep(record.record_type), parse_http)
      if prev is not None:
        yield prev
      prev, n = rec, n + 1
  except BaseException as e:  # pylint: disable=broad-except
    if _is_fatal(e):
      raise
    seg.damaged, seg.error = True, f"WARC parse error: {e!r}"
  stream_damaged = bool(getattr(stream, "damaged", False))
  if stream_damaged:
    seg.damaged, seg.error = True, stream.error
  if prev is not None:
    if prev.damaged or (is_member and stream_damaged and n == 1):
      seg.damaged = True
      seg.error = seg.error or "a record is shorter than its Content-Length"
    else:
      yield prev


def _iter_records(path: str, stats: collections.Counter, keep, parse_http: bool) -> Iterator[_Record]:
  """The intact records of an archive; counts each damaged region once under "skip_truncated"."""
  if os.path.getsize(path) == 0:
    logging.warning("%s: empty file (0 bytes), no records", path)
    return
  with open(path, "rb") as f:
    head = f.read(5)
    f.seek(0)
    gzipped = head.startswith(_GZIP_MAGIC[:2]) or (path.endswith(".gz") and not head.startswith(b"WARC/"))
    if not gzipped:  # an uncompressed file (or another compression fastwarc detects, e.g. zstd).
      seg = _Segment()
      yield from _segment_records(f, keep, parse_http, False, seg)
      if seg.damaged:
        stats["skip_truncated"] += 1
        logging.warning("%s: damaged, reading stopped: %s", path, seg.error)
      return
    src = _Source(f)
    in_damage = False  # inside a damaged region: further damage is the same region.

    def damage(offset: int, error: str) -> None:
      nonlocal in_damage
      if not in_damage:
        stats["skip_truncated"] += 1
        logging.warning("%s: damaged data at byte %d (%s); resuming at the next gzip member", path, offset, error)
      in_damage = True

    while True:
      start = src.tell()
      magic = src.peek(len(_GZIP_MAGIC))
      if not magic:
        return
      if magic != _GZIP_MAGIC:
        damage(start, "not a gzip member")
        src.take(1)
        if not src.skip_to_magic():
          return
        continue
      src.set_mark()
      member = _MemberStream(src)
      seg = _Segment()
      yield from _segment_records(member, keep, parse_http, True, seg)
      if not member.damaged:
        member.drain()  # after a WARC parse error the member may have bytes left.
      if member.damaged:
        damage(start, member.error)
        src.rewind_after_mark()
        if not src.skip_to_magic():
          return
        continue
      if seg.damaged:
        damage(start, seg.error)
      else:
        in_damage = False


# ------------------------------------------------------------------------------------------------- fields
def _host(url: str) -> str | None:
  try:
    host = urllib.parse.urlsplit(url).hostname
  except ValueError:
    return None
  host = (host or "").rstrip(".")
  return host or None


def _url(headers: dict[str, str]) -> str:
  url = headers.get("WARC-Target-URI", "").strip()
  if url.startswith("<") and url.endswith(">"):  # the WARC/1.0 draft's bracketed form.
    url = url[1:-1]
  return url


def _dechunk(body: bytes) -> bytes | None:
  """Undoes HTTP chunked transfer encoding; None when the body is not chunked."""
  out = bytearray()
  pos = 0
  while True:
    eol = body.find(b"\r\n", pos)
    if eol < 0:
      return bytes(out) if out else None  # cut inside a chunk header: keep what came whole.
    try:
      size = int(body[pos:eol].split(b";", 1)[0].strip(), 16)
    except ValueError:
      return None
    if size == 0:
      return bytes(out)
    out += body[eol + 2:eol + 2 + size]
    pos = eol + 2 + size + 2
    if pos > len(body):  # a truncated last chunk: keep its part.
      return bytes(out)


def _decompress(body: bytes, encoding: str) -> bytes | None:
  """Undoes one content coding; None when it fails. A truncated stream gives what precedes the cut."""
  try:
    if encoding in ("gzip", "x-gzip"):
      return zlib.decompressobj(47).decompress(body)  # gzip or zlib header.
    if encoding == "deflate":
      try:
        return zlib.decompressobj(15).decompress(body)
      except zlib.error:
        return zlib.decompressobj(-15).decompress(body)  # raw deflate, as some servers send.
    if encoding == "br":
      import brotli  # pylint: disable=import-outside-toplevel
      return brotli.decompress(body)
    if encoding == "zstd":
      import zstandard  # pylint: disable=import-outside-toplevel
      return zstandard.ZstdDecompressor().decompressobj().decompress(body)
  except Exception:  # pylint: disable=broad-except
    return None
  return body  # identity, or an unknown label (e.g. "utf-8"): the body is taken as it is.


def _looks_like_html(body: bytes) -> bool:
  head = body[:1024].lower()
  return b"<html" in head or b"<!doctype html" in head


def _http_payload(body: bytes, http_headers: dict[str, str]) -> bytes | None:
  """The payload without transfer and content codings; None when a declared coding cannot be undone."""
  if "chunked" in http_headers.get("transfer-encoding", "").lower():
    body = _dechunk(body) or body  # Common Crawl stores bodies de-chunked; some crawlers do not.
  codings = [c.strip().lower() for c in http_headers.get("content-encoding", "").split(",") if c.strip()]
  for coding in reversed(codings):
    decoded = _decompress(body, coding)
    if decoded is None:
      return body if _looks_like_html(body) else None  # a wrong header over a plain body.
    body = decoded
  return body


def _mime_and_charset(content_types: str | None) -> tuple[str | None, str | None]:
  """The MIME type of the first Content-Type header and the first charset parameter of any of them (servers
  repeat the header, e.g. "text/html; charset=utf-8" then "text/html"); the values are newline-separated."""
  mime = charset = None
  for value in (content_types or "").split("\n"):
    parts = value.split(";")
    if mime is None:
      mime = parts[0].strip().lower() or None
    for p in parts[1:]:
      k, _, v = p.partition("=")
      if charset is None and k.strip().lower() == "charset":
        charset = v.strip().strip("\"'").strip().lower() or None
  return mime, charset


# ------------------------------------------------------------------------------------------------ public
def iter_pages(path: str | os.PathLike, stats: collections.Counter) -> Iterator[Page]:
  """HTTP-200 HTML pages of a WARC file (`.warc.gz` or `.warc`), in file order.

  A page is a `response` record whose HTTP status is 200 and whose HTTP Content-Type is text/html or
  application/xhtml+xml (without a Content-Type: the payload has "<html" or "<!doctype html" in its first
  KB). Each record counts once in `stats`: "records", and one of "pages", "skip_not_response",
  "skip_not_html", "skip_http_status", "skip_broken_record" (no record id, target URI or host; HTTP headers
  unparsable; a declared content coding that fails). Damaged regions count under "skip_truncated" (see the
  module docstring); damage never raises.
  """
  keep = lambda t: t == WarcRecordType.response
  for rec in _iter_records(os.fspath(path), stats, keep, parse_http=True):
    stats["records"] += 1
    if rec.rtype != WarcRecordType.response:
      stats["skip_not_response"] += 1
      continue
    record_id, url = rec.headers.get("WARC-Record-ID", ""), _url(rec.headers)
    host = _host(url) if url else None
    if not record_id or not host or rec.http_headers is None or rec.status is None or rec.block is None:
      stats["skip_broken_record"] += 1
      continue
    if rec.status != 200:
      stats["skip_http_status"] += 1
      continue
    mime, charset = _mime_and_charset(rec.http_headers.get("content-type"))
    if mime is not None and mime not in _HTML_TYPES:
      stats["skip_not_html"] += 1
      continue
    html = _http_payload(rec.block, rec.http_headers)
    if html is None:
      stats["skip_broken_record"] += 1
      continue
    if mime is None and not _looks_like_html(html):
      stats["skip_not_html"] += 1
      continue
    stats["pages"] += 1
    yield Page(record_id, url, host, rec.headers.get("WARC-Date", ""), html, charset)


def iter_wet_texts(path: str | os.PathLike, stats: collections.Counter) -> Iterator[WetText]:
  """Texts of a WET file (`.wet.gz` or `.wet`): one per `conversion` record, in file order.

  Each record counts once in `stats`: "records", and one of "texts", "skip_not_conversion" (warcinfo and
  the like), "skip_broken_record" (no record id, target URI or host). Damaged regions count under
  "skip_truncated", as for `iter_pages`.
  """
  keep = lambda t: t == WarcRecordType.conversion
  for rec in _iter_records(os.fspath(path), stats, keep, parse_http=False):
    stats["records"] += 1
    if rec.rtype != WarcRecordType.conversion:
      stats["skip_not_conversion"] += 1
      continue
    record_id, url = rec.headers.get("WARC-Record-ID", ""), _url(rec.headers)
    host = _host(url) if url else None
    if not record_id or not host or rec.block is None:
      stats["skip_broken_record"] += 1
      continue
    stats["texts"] += 1
    yield WetText(record_id, url, host, rec.headers.get("WARC-Date", ""), rec.block.decode("utf-8", "replace"))


__all__ = ["Page", "WetText", "iter_pages", "iter_wet_texts"]
