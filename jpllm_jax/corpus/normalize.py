"""Normalisation of extracted Japanese text: punctuation style and footer removal.

`normalize_punctuation` turns the full-width comma and period (`，` `．`) into `、` `。` in documents that use
them as their main punctuation; `remove_footer` drops a trailing footer (copyright lines, links to terms
of use, "back to top"...) found among the last lines.
"""
from __future__ import annotations

import dataclasses
import re

_AFTER_FULLWIDTH_ALNUM = "(?<![０-９Ａ-Ｚａ-ｚ])"  # "１．５", "Ｎｏ．１" keep their full-width period
_COMMA_RE = re.compile(_AFTER_FULLWIDTH_ALNUM + "，")
_PERIOD_RE = re.compile(_AFTER_FULLWIDTH_ALNUM + "．")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

DEFAULT_FOOTER_KEYWORDS: tuple[str, ...] = (
    "Copyright", "©", "All Rights Reserved", "Powered by", "利用規約", "プライバシーポリシー", "個人情報保護方針",
    "個人情報の取り扱い", "個人情報の取扱い", "お問い合わせ", "お問合せ", "会社概要", "運営会社", "運営者情報",
    "サイトマップ", "著作権", "無断転載", "無断複製", "免責事項", "特定商取引法", "ページの先頭へ", "ページトップへ",
    "トップへ戻る", "ページの先頭に戻る", "このページの先頭へ")


@dataclasses.dataclass(frozen=True)
class NormalizeConfig:
  """Footer removal settings: keywords (ASCII letters match case-insensitively), the share of a line's
  characters they must cover for the line to start the footer (strictly more than), and how many of the
  last non-blank lines are searched."""
  footer_keywords: tuple[str, ...] = DEFAULT_FOOTER_KEYWORDS
  footer_ratio: float = 0.3
  footer_window: int = 10


def normalize_punctuation(text: str) -> str:
  """Replaces `，` by `、` when `，` is more frequent than `、` in `text`, and `．` by `。` when `．` is more
  frequent than `。` (each independently; ties change nothing), except directly after a full-width digit or
  Latin letter (U+FF10-FF19, U+FF21-FF3A, U+FF41-FF5A). ASCII "," and "." are never touched."""
  if text.count("，") > text.count("、"):
    text = _COMMA_RE.sub("、", text)
  if text.count("．") > text.count("。"):
    text = _PERIOD_RE.sub("。", text)
  return text


def _keyword_coverage(line: str, keywords: tuple[str, ...]) -> int:
  """Characters of `line` inside at least one occurrence of a keyword (ASCII case-insensitive)."""
  folded = line.translate(_ASCII_LOWER)
  covered = bytearray(len(line))
  for keyword in keywords:
    start = folded.find(keyword)
    while start >= 0:
      covered[start:start + len(keyword)] = b"\x01" * len(keyword)
      start = folded.find(keyword, start + 1)
  return sum(covered)


def remove_footer(text: str, config: NormalizeConfig = NormalizeConfig()) -> str:
  """Drops the footer: the first of the last `footer_window` non-blank lines whose characters (surrounding
  whitespace stripped) are covered by footer keywords for more than `footer_ratio` of its length, and every
  line after it, and then trailing blank lines. `text` comes back unchanged when no line qualifies.
  """
  keywords = tuple(k.translate(_ASCII_LOWER) for k in config.footer_keywords if k)
  lines = text.split("\n")
  non_blank = [i for i, line in enumerate(lines) if line.strip()]
  for i in non_blank[len(non_blank) - config.footer_window:] if config.footer_window > 0 else ():
    line = lines[i].strip()
    if _keyword_coverage(line, keywords) / len(line) > config.footer_ratio:
      kept = lines[:i]
      while kept and not kept[-1].strip():
        kept.pop()
      return "\n".join(kept)
  return text


def normalize(text: str, config: NormalizeConfig = NormalizeConfig()) -> str:
  """`normalize_punctuation`, then `remove_footer`."""
  return remove_footer(normalize_punctuation(text), config)
