"""Swallow v1 quality rules for Japanese web documents, computed on characters.

A document is rejected when any rule holds (thresholds are the fields of `QualityConfig`):

  too_short             fewer than 400 characters
  few_japanese_letters  fewer than 400 Japanese letters (hiragana, katakana, kanji)
  low_hiragana          hiragana fraction < 0.2
  high_katakana         katakana fraction > 0.5
  low_japanese          Japanese-letter fraction < 0.5
  sentence_length       average sentence length < 20 or > 90
  long_sentence         longest sentence > 200
  ellipsis_endings      fraction of sentences ending in `・` or `…` > 0.2
  duplicate_lines       duplicate-line fraction > 0.30 and duplicate-line character fraction > 0.20
  duplicate_sentences   the same for sentences
  top_{n}gram           characters covered by the most frequent character n-gram, n = 2, 3, 4:
                        count(top n-gram) * n / characters > 0.20, 0.18, 0.16
  dup_{n}gram           characters covered by character n-grams that occur more than once, n = 5..10:
                        > 0.15, 0.14, 0.13, 0.12, 0.11, 0.10

Conventions:
  * "Characters" are all characters of the text except newlines (spaces and other whitespace count). Every
    fraction of characters is over that count, and the n-gram statistics run on the text with its newlines
    removed (so n-grams span line breaks).
  * Hiragana are U+3041-3096, katakana U+30A1-30FA (not `ー` nor `・`), kanji 々〇〻, U+3400-9FFF and
    U+F900-FAFF.
  * Lines are split on "\\n"; lines are compared after stripping surrounding whitespace and whitespace-only
    lines are ignored. Sentences are split after each run of the delimiters 。．！？!?. (the run stays with
    its sentence); they are stripped of surrounding whitespace and whitespace-only pieces are dropped.
  * A duplicate line (sentence) is an occurrence of a line (sentence) seen before in the document, so the
    first occurrence does not count (as in Gopher/RefinedWeb); duplicate characters are those duplicates'
    characters.
  * A sentence "ends in an ellipsis" when its text before the closing delimiter run ends in `・` or `…`.
  * The top n-gram fraction counts overlapping occurrences, so periodic texts can exceed 1.

`reject_reason` checks the rules in the order of `REASONS` (cheap rules first) and returns at the first
failure without computing the remaining measures; `measure` computes them all.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterator

import numpy as np

_HIRAGANA, _KATAKANA, _KANJI = 1, 2, 3


def _class_table() -> np.ndarray:
  """Character class (0 other, 1 hiragana, 2 katakana, 3 kanji) of every BMP code point."""
  table = np.zeros(0x10000, np.uint8)
  table[0x3041:0x3097] = _HIRAGANA
  table[0x30A1:0x30FB] = _KATAKANA
  table[0x3400:0xA000] = _KANJI
  table[0xF900:0xFB00] = _KANJI
  table[[ord("々"), ord("〇"), ord("〻")]] = _KANJI
  return table


_CLASS_TABLE = _class_table()
_SENTENCE_DELIMITERS = "。．！？!?."
_SENTENCE_RE = re.compile(f"[^{_SENTENCE_DELIMITERS}]*[{_SENTENCE_DELIMITERS}]+|[^{_SENTENCE_DELIMITERS}]+")
_ELLIPSES = ("・", "…")
_KEY_BITS = 64  # bits of the n-gram sort keys (tests lower it to exercise the narrow-key paths)


@dataclasses.dataclass(frozen=True)
class QualityConfig:
  """The thresholds of the rules; n-gram thresholds are (n, max fraction) pairs."""
  min_length: int = 400
  min_japanese_letters: int = 400
  min_hiragana_frac: float = 0.2
  max_katakana_frac: float = 0.5
  min_japanese_frac: float = 0.5
  min_avg_sentence_length: float = 20.0
  max_avg_sentence_length: float = 90.0
  max_sentence_length: int = 200
  max_ellipsis_frac: float = 0.2
  max_dup_line_frac: float = 0.30
  max_dup_line_char_frac: float = 0.20
  max_dup_sentence_frac: float = 0.30
  max_dup_sentence_char_frac: float = 0.20
  top_ngram_max: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
  dup_ngram_max: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                                  (10, 0.10))


REASONS: tuple[str, ...] = (
    "too_short", "few_japanese_letters", "low_hiragana", "high_katakana", "low_japanese", "sentence_length",
    "long_sentence", "ellipsis_endings", "duplicate_lines", "duplicate_sentences",
    *(f"top_{n}gram" for n, _ in QualityConfig.top_ngram_max),
    *(f"dup_{n}gram" for n, _ in QualityConfig.dup_ngram_max))


def code_points(text: str) -> np.ndarray:
  """The code points of `text` as a uint32 array."""
  return np.frombuffer(text.encode("utf-32-le"), np.uint32)


def char_class_counts(text: str) -> tuple[int, int, int]:
  """(hiragana, katakana, kanji) character counts of `text`."""
  cp = code_points(text)
  counts = np.bincount(_CLASS_TABLE[np.minimum(cp, 0xFFFF)], minlength=4)
  return int(counts[_HIRAGANA]), int(counts[_KATAKANA]), int(counts[_KANJI])


def count_japanese_letters(text: str) -> int:
  """Number of Japanese letters (hiragana + katakana + kanji) in `text`."""
  return sum(char_class_counts(text))


def sentences(text: str) -> list[str]:
  """The sentences of `text` (with newlines removed), see the module docstring."""
  pieces = (s.strip() for s in _SENTENCE_RE.findall(text.replace("\n", "")))
  return [s for s in pieces if s]


def lines(text: str) -> list[str]:
  """The stripped, non-blank lines of `text`."""
  return [s for s in (line.strip() for line in text.split("\n")) if s]


def _duplicates(items: list[str]) -> tuple[int, int]:
  """(number of items equal to an earlier item, number of characters in them)."""
  unique = set(items)
  return len(items) - len(unique), sum(map(len, items)) - sum(map(len, unique))


def _ends_in_ellipsis(sentence: str) -> bool:
  return sentence.rstrip(_SENTENCE_DELIMITERS).rstrip().endswith(_ELLIPSES)


def _covered(starts: np.ndarray, n: int) -> int:
  """Number of characters in the union of [i, i + n) over `starts`."""
  if not starts.size:
    return 0
  return int(np.minimum(np.diff(np.sort(starts)), n).sum()) + n


def ngram_stats(cp: np.ndarray, top_ns: Collection[int] = (), dup_ns: Collection[int] = ()
                ) -> Iterator[tuple[int, int | None, int | None]]:
  """Character n-gram statistics of the code points `cp`, yielded lazily in increasing n.

  Yields (n, top, covered) for each n in `top_ns` or `dup_ns`: top is the count of the most frequent n-gram
  (overlapping occurrences) when n is in `top_ns`, covered the number of characters covered by the repeats of
  n-grams (every occurrence after the first, as in Gopher's implementation in datatrove; counting the first
  occurrences too rejects most Japanese Wikipedia text at Swallow's thresholds) when n is in `dup_ns`;
  None otherwise.

  Exact (no hashing). Rounds sort the candidate positions by a uint64 key holding the group of the n0-gram
  starting there (the n-grams sorted so far), the next k characters and, in the low bits, the position itself
  (so np.sort of values does the work of an argsort). Every prefix of the key groups equal n-grams for
  n = n0+1..n0+k at once. Only positions whose n-gram repeats can start a repeated longer n-gram, so each
  round keeps just those and the candidate set shrinks fast.
  """
  wanted = sorted(set(top_ns) | set(dup_ns))
  size = len(cp)
  if not wanted or size == 0 or wanted[-1] < 1:
    yield from ((n, 0 if n in top_ns else None, 0 if n in dup_ns else None) for n in wanted)
    return
  max_n = wanted[-1]
  offset = int(cp.min() == 0)  # characters are stored + 1 then, so the zero padding never equals one
  cbits = (int(cp.max()) + offset).bit_length()
  pbits = size.bit_length()  # positions < size, group ids <= size
  c = np.zeros(size + max_n + 1, np.uint64)
  c[:size] = cp
  if offset:
    c[:size] += np.uint64(1)
  pos, gid, n0 = None, None, 0
  while n0 < max_n:
    if pos is not None and pos.size < 2:  # no n0-gram repeats, so no longer n-gram does
      yield from ((n, int(n <= size) if n in top_ns else None, 0 if n in dup_ns else None)
                  for n in wanted if n > n0)
      return
    gid_bits = 0 if gid is None else pbits
    k = (_KEY_BITS - pbits - gid_bits) // cbits
    embed = k >= 1
    k = min(k if embed else (_KEY_BITS - gid_bits) // cbits, max_n - n0)
    if pos is None:  # first round: every position, keys from slices
      key = c[:size].copy()
      for j in range(1, k):
        key = (key << np.uint64(cbits)) | c[j:j + size]
      pos_key = np.arange(size, dtype=np.uint64)
    else:
      key = gid
      for j in range(k):
        key = (key << np.uint64(cbits)) | c[pos + n0 + j]
      pos_key = pos.astype(np.uint64)
    if embed:
      packed = np.sort((key << np.uint64(pbits)) | pos_key)
      key, pos = packed >> np.uint64(pbits), (packed & np.uint64((1 << pbits) - 1)).astype(np.intp)
    else:  # huge documents: sort positions by key
      order = np.argsort(key, kind="stable")
      key, pos = key[order], pos_key[order].astype(np.intp)
    for n in range(n0 + 1, n0 + k + 1):
      if n not in wanted and n < n0 + k:
        continue
      group = key >> np.uint64((n0 + k - n) * cbits) if n < n0 + k else key
      brk = np.concatenate(([True], group[1:] != group[:-1], [True]))  # group boundaries
      dup = ~(brk[:-1] & brk[1:])  # in a group of two or more
      if n in wanted:
        top = (int(np.diff(np.flatnonzero(brk)).max()) if n <= size else 0) if n in top_ns else None
        covered = None
        if n in dup_ns:  # the repeats: every occurrence but the earliest of its group
          starts = np.flatnonzero(brk[:-1])
          first = pos == np.minimum.reduceat(pos, starts)[np.cumsum(brk[:-1]) - 1]
          covered = _covered(pos[dup & ~first], n)
        yield n, top, covered
    gid = np.cumsum(brk[:-1], dtype=np.uint64)[dup]
    pos, n0 = pos[dup], n0 + k


def _measure_iter(text: str, config: QualityConfig) -> Iterator[tuple[str, bool, dict[str, float]]]:
  """Yields (reason, failed, new measures) for each rule in `REASONS` order, computing measures lazily."""
  length = len(text) - text.count("\n")
  yield "too_short", length < config.min_length, {"length": float(length)}
  hiragana, katakana, kanji = char_class_counts(text)
  japanese = hiragana + katakana + kanji
  yield "few_japanese_letters", japanese < config.min_japanese_letters, {"japanese_letters": float(japanese)}
  denom = max(length, 1)
  hira, kata, ja = hiragana / denom, katakana / denom, japanese / denom
  yield "low_hiragana", hira < config.min_hiragana_frac, {"hiragana_frac": hira}
  yield "high_katakana", kata > config.max_katakana_frac, {"katakana_frac": kata}
  yield "low_japanese", ja < config.min_japanese_frac, {"japanese_frac": ja}
  sents = sentences(text)
  sent_lengths = list(map(len, sents))
  avg = sum(sent_lengths) / len(sents) if sents else 0.0
  bad_avg = avg < config.min_avg_sentence_length or avg > config.max_avg_sentence_length
  yield "sentence_length", bad_avg, {"avg_sentence_length": avg}
  longest = max(sent_lengths, default=0)
  yield "long_sentence", longest > config.max_sentence_length, {"max_sentence_length": float(longest)}
  ellipsis = sum(map(_ends_in_ellipsis, sents)) / len(sents) if sents else 0.0
  yield "ellipsis_endings", ellipsis > config.max_ellipsis_frac, {"ellipsis_frac": ellipsis}
  for name, items, max_frac, max_char_frac in (
      ("line", lines(text), config.max_dup_line_frac, config.max_dup_line_char_frac),
      ("sentence", sents, config.max_dup_sentence_frac, config.max_dup_sentence_char_frac)):
    dups, dup_chars = _duplicates(items)
    frac, char_frac = dups / max(len(items), 1), dup_chars / denom
    failed = frac > max_frac and char_frac > max_char_frac
    yield f"duplicate_{name}s", failed, {f"dup_{name}_frac": frac, f"dup_{name}_char_frac": char_frac}
  top_max, dup_max = dict(config.top_ngram_max), dict(config.dup_ngram_max)
  for n, top, covered in ngram_stats(code_points(text.replace("\n", "")), top_max, dup_max):
    if top is not None:
      frac = top * n / denom
      yield f"top_{n}gram", frac > top_max[n], {f"top_{n}gram_frac": frac}
    if covered is not None:
      frac = covered / denom
      yield f"dup_{n}gram", frac > dup_max[n], {f"dup_{n}gram_frac": frac}


def measure(text: str, config: QualityConfig = QualityConfig()) -> dict[str, float]:
  """Every measure of `text` (the n-gram sizes measured are those named in `config`)."""
  measures: dict[str, float] = {}
  for _, _, new in _measure_iter(text, config):
    measures.update(new)
  return measures


def reject_reason(text: str, config: QualityConfig = QualityConfig()) -> tuple[str | None, dict[str, float]]:
  """The first failing rule's reason (None if `text` passes) and the measures computed up to that rule."""
  measures: dict[str, float] = {}
  for reason, failed, new in _measure_iter(text, config):
    measures.update(new)
    if failed:
      return reason, measures
  return None, measures
