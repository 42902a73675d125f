"""Main-text extraction from HTML with trafilatura, as in Swallow's pipeline.

Settings (measured on the shared real pages, see tests/test_corpus_extract.py):
  * `include_comments=False, include_tables=False`: comment threads and tables are mostly boilerplate.
  * neither `favor_precision` nor `favor_recall`: with `favor_precision=True` the hukumusume story page
    comes out empty; with `favor_recall=True` the NHK page keeps a "without" gold snippet (the dictionary
    help text) and hukumusume keeps its sidebar and an ad script. The default keeps every NHK "with" snippet
    and none of the "without" ones, and the whole hukumusume story without its sidebar.
  * `fast=True` (no fallback to readability / jusText when trafilatura's own result looks poor): twice the
    pages/s, and the same text on 20 of the 21 shared pages (the other one, a Chinese spam page, gets less).
The page is decoded here (`langid.decode_html`: declared charset, else UTF-8 / cp932 / EUC-JP) rather than
by trafilatura's own charset guessing, so that detection and extraction read the same characters.
"""
from __future__ import annotations

import trafilatura

from jpllm_jax.corpus import langid


def extract_text(html: str | bytes, url: str | None = None, http_charset: str | None = None, *,
                 fast: bool = True) -> str | None:
  """The main text of a page, paragraphs on separate lines; None when nothing is extracted.

  `html` as bytes is decoded with `http_charset` and the page's own declarations; a str is used as it is.
  `url` only informs trafilatura (it is not fetched).
  """
  if isinstance(html, (bytes, bytearray)):
    html = langid.decode_html(bytes(html), http_charset)
  if not html.strip():
    return None
  text = trafilatura.extract(html, url=url, include_comments=False, include_tables=False, fast=fast)
  if not text:
    return None
  text = text.strip()
  return text or None
