"""Swallow v1 quality rules for Japanese web documents, as defined by Swallow's own implementation.

The definitions are those of `quality.py` in swallow-llm/swallow-corpus (Naoaki Okazaki, MIT; `main` and
`apply_v1`), which are more precise than the paper. A document is rejected by the first rule that holds, in
`apply_v1`'s order (thresholds are the fields of `QualityConfig`):

  too_short                 num_letters = len(text) < 400 (newlines count)
  duplicate_lines           duplicate paragraph fraction > 0.30
  duplicate_sentences       duplicate sentence fraction > 0.30
  duplicate_line_chars      duplicate paragraph characters / paragraph characters > 0.20
  duplicate_sentence_chars  duplicate sentence characters / sentence characters > 0.20
  top_{n}gram               count of the most frequent character n-gram / n-gram positions, n = 2, 3, 4:
                            > 0.20, 0.18, 0.16
  dup_{n}gram               distinct character n-grams occurring more than once / distinct n-grams,
                            n = 5..10: > 0.15, 0.14, 0.13, 0.12, 0.11, 0.10
  low_hiragana              hiragana / Japanese letters < 0.2
  high_katakana             katakana / Japanese letters > 0.5
  low_japanese              Japanese letters / num_letters < 0.5
  few_japanese_letters      Japanese letters < 400
  sentence_length           average sentence length < 20 or > 90
  long_sentence             longest sentence > 200
  ellipsis_endings          fraction of sentences ending in `・` or `…` (after stripping whitespace) > 0.2

Definitions:
  * Paragraphs are the lines of the text (`text.split("\\n")`, blank lines included); sentences are found
    inside each line by the pattern `[^。．！？!?]+[。．！？!?]?` (a delimiter that follows another delimiter
    or starts a line belongs to no sentence), and a paragraph is its sentences joined, i.e. its line without
    those delimiters.
  * A duplicate paragraph (sentence) is every repeat after the first of an equal paragraph (sentence); its
    characters are the duplicate characters.
  * Japanese letters: hiragana U+3041-3096, katakana U+30A1-30FA (not `ー` nor `・`), kanji (々〇〻,
    U+3400-9FFF, U+F900-FAFF, and a UTF-16 surrogate pair of U+D840-D87F, U+DC00-DFFF) and the punctuation
    、，。．！？.
  * Character n-grams run over the whole text, newlines included.

Where this fast version departs in arithmetic but not in decisions or values: n-grams are counted by sorting
code points (`ngram_stats`), not with a Counter of substrings, and the number of distinct n-grams is the
number of positions minus the repeats; sentences come from one regex pass over the text and paragraphs from
deleting the delimiters no sentence takes, not from a loop over lines; and where Swallow's code raises (a
text shorter than n characters has no most frequent n-gram, a text without sentences no longest one) the
measure is 0. Every measure equals Swallow's float for float (tests/test_corpus_quality.py keeps a
transcription of the definitions and checks this).

`reject_reason` computes the measures lazily, in rule order, and returns at the first failure; `measure`
computes them all.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterator

import numpy as np

_HIRAGANA, _KATAKANA, _KANJI, _PUNCTUATION = 1, 2, 3, 4


def _class_table() -> np.ndarray:
  """Character class (0 other, 1 hiragana, 2 katakana, 3 kanji, 4 Japanese punctuation) of every BMP code point."""
  table = np.zeros(0x10000, np.uint8)
  table[0x3041:0x3097] = _HIRAGANA
  table[0x30A1:0x30FB] = _KATAKANA
  table[0x3400:0xA000] = _KANJI
  table[0xF900:0xFB00] = _KANJI
  table[[ord("々"), ord("〇"), ord("〻")]] = _KANJI
  table[[ord(c) for c in "、，。．！？"]] = _PUNCTUATION
  return table


_CLASS_TABLE = _class_table()
_DELIMITERS = "。．！？!?"
_SENTENCE_RE = re.compile(f"[^{_DELIMITERS}\\n]+[{_DELIMITERS}]?")  # Swallow's pattern, lines in one pass
_STRAY_DELIMITER_RE = re.compile(f"(?<![^{_DELIMITERS}\\n])[{_DELIMITERS}]")  # after a delimiter or line start
_ELLIPSES = ("・", "…")
_KEY_BITS = 64  # bits of the n-gram sort keys (tests lower it to exercise the narrow-key paths)


@dataclasses.dataclass(frozen=True)
class QualityConfig:
  """The thresholds of the rules (Swallow's `apply_v1`); n-gram thresholds are (n, max fraction) pairs."""
  min_length: int = 400
  max_dup_line_frac: float = 0.30
  max_dup_sentence_frac: float = 0.30
  max_dup_line_char_frac: float = 0.20
  max_dup_sentence_char_frac: float = 0.20
  top_ngram_max: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
  dup_ngram_max: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                                  (10, 0.10))
  min_hiragana_frac: float = 0.2
  max_katakana_frac: float = 0.5
  min_japanese_frac: float = 0.5
  min_japanese_letters: int = 400
  min_avg_sentence_length: float = 20.0
  max_avg_sentence_length: float = 90.0
  max_sentence_length: int = 200
  max_ellipsis_frac: float = 0.2


REASONS: tuple[str, ...] = (
    "too_short", "duplicate_lines", "duplicate_sentences", "duplicate_line_chars", "duplicate_sentence_chars",
    *(f"top_{n}gram" for n, _ in QualityConfig.top_ngram_max),
    *(f"dup_{n}gram" for n, _ in QualityConfig.dup_ngram_max),
    "low_hiragana", "high_katakana", "low_japanese", "few_japanese_letters", "sentence_length", "long_sentence",
    "ellipsis_endings")


def code_points(text: str) -> np.ndarray:
  """The code points of `text` as a uint32 array (lone surrogates kept as they are)."""
  return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


def _class_counts(cp: np.ndarray) -> np.ndarray:
  """Counts of each character class of the code points `cp`; a surrogate pair of kanji planes is one kanji."""
  counts = np.bincount(_CLASS_TABLE[np.minimum(cp, 0xFFFF)], minlength=5)
  if cp.size > 1 and cp.max() >= 0xD800:
    counts[_KANJI] += int(np.count_nonzero((cp[:-1] >= 0xD840) & (cp[:-1] <= 0xD87F)
                                           & (cp[1:] >= 0xDC00) & (cp[1:] <= 0xDFFF)))
  return counts


def char_class_counts(text: str) -> tuple[int, int, int]:
  """(hiragana, katakana, kanji) character counts of `text`."""
  counts = _class_counts(code_points(text))
  return int(counts[_HIRAGANA]), int(counts[_KATAKANA]), int(counts[_KANJI])


def count_japanese_letters(text: str) -> int:
  """Number of hiragana, katakana and kanji in `text` (the quality rules' Japanese letters also count 、，。．！？)."""
  return sum(char_class_counts(text))


def sentences(text: str) -> list[str]:
  """The sentences of every line of `text`, in order (see the module docstring)."""
  return _SENTENCE_RE.findall(text)


def lines(text: str) -> list[str]:
  """The paragraphs of `text`: each line's sentences joined (blank lines give empty paragraphs)."""
  return _STRAY_DELIMITER_RE.sub("", text).split("\n")


def _duplicates(items: list[str]) -> tuple[int, int]:
  """(number of items equal to an earlier item, number of characters in them)."""
  unique = set(items)
  return len(items) - len(unique), sum(map(len, items)) - sum(map(len, unique))


def ngram_stats(cp: np.ndarray, top_ns: Collection[int] = (), dup_ns: Collection[int] = ()
                ) -> Iterator[tuple[int, int | None, int | None, int | None]]:
  """Character n-gram statistics of the code points `cp`, yielded lazily in increasing n.

  Yields (n, top, repeated, distinct) for each n in `top_ns` or `dup_ns`: top is the count of the most
  frequent n-gram (overlapping occurrences; 0 when there is no n-gram) when n is in `top_ns`, repeated the
  number of distinct n-grams that occur more than once and distinct the number of distinct n-grams when n is
  in `dup_ns`; None otherwise.

  Exact (no hashing). Rounds sort the candidate positions by a uint64 key holding the group of the n0-gram
  starting there (the n-grams sorted so far), the next k characters and, in the low bits, the position itself
  (so np.sort of values does the work of an argsort). Every prefix of the key groups equal n-grams for
  n = n0+1..n0+k at once. Only positions whose n-gram repeats can start a repeated longer n-gram, so each
  round keeps just those and the candidate set shrinks fast; the dropped positions, and those whose n-gram
  runs into the padding past the end, are groups of one, so distinct = positions - (members of repeated
  groups - repeated groups).
  """
  wanted = sorted(set(top_ns) | set(dup_ns))
  size = len(cp)

  def stats(n: int, top: int, repeated: int, members: int):
    distinct = max(size - n + 1, 0) - (members - repeated)
    return (n, top if n in top_ns else None, repeated if n in dup_ns else None,
            distinct if n in dup_ns else None)

  if not wanted or size == 0 or wanted[-1] < 1:
    yield from (stats(n, 0, 0, 0) for n in wanted)
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
      yield from (stats(n, int(n <= size), 0, 0) for n in wanted if n > n0)
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
        sizes = np.diff(np.flatnonzero(brk))
        top = int(sizes.max()) if n <= size else 0
        yield stats(n, top, int(np.count_nonzero(sizes > 1)), int(np.count_nonzero(dup)))
    gid = np.cumsum(brk[:-1], dtype=np.uint64)[dup]
    pos, n0 = pos[dup], n0 + k


def _frac(num: int | float, den: int) -> float:
  return num / den if den > 0 else 0.0


def _measure_iter(text: str, config: QualityConfig) -> Iterator[tuple[str, bool, dict[str, float]]]:
  """Yields (reason, failed, new measures) for each rule in `REASONS` order, computing measures lazily."""
  length = len(text)
  yield "too_short", length < config.min_length, {"length": float(length)}
  sents = sentences(text)
  dups = {}
  for name, items, max_frac in (("line", lines(text), config.max_dup_line_frac),
                                ("sentence", sents, config.max_dup_sentence_frac)):
    count, chars = _duplicates(items)
    frac = _frac(count, len(items))
    dups[name] = _frac(chars, sum(map(len, items)))
    yield f"duplicate_{name}s", frac > max_frac, {f"dup_{name}_frac": frac}
  for name, max_frac in (("line", config.max_dup_line_char_frac), ("sentence", config.max_dup_sentence_char_frac)):
    yield f"duplicate_{name}_chars", dups[name] > max_frac, {f"dup_{name}_char_frac": dups[name]}
  cp = code_points(text)
  top_max, dup_max = dict(config.top_ngram_max), dict(config.dup_ngram_max)
  for n, top, repeated, distinct in ngram_stats(cp, top_max, dup_max):
    if top is not None:
      frac = _frac(top, length - n + 1)
      yield f"top_{n}gram", frac > top_max[n], {f"top_{n}gram_frac": frac}
    if repeated is not None:
      frac = _frac(repeated, distinct)
      yield f"dup_{n}gram", frac > dup_max[n], {f"dup_{n}gram_frac": frac}
  counts = _class_counts(cp)
  japanese = int(counts[1:].sum())
  hira, kata = _frac(int(counts[_HIRAGANA]), japanese), _frac(int(counts[_KATAKANA]), japanese)
  ja = _frac(japanese, length)
  yield "low_hiragana", hira < config.min_hiragana_frac, {"hiragana_frac": hira}
  yield "high_katakana", kata > config.max_katakana_frac, {"katakana_frac": kata}
  yield "low_japanese", ja < config.min_japanese_frac, {"japanese_frac": ja}
  yield "few_japanese_letters", japanese < config.min_japanese_letters, {"japanese_letters": float(japanese)}
  sent_lengths = list(map(len, sents))
  avg = _frac(sum(sent_lengths), len(sents))
  bad_avg = avg < config.min_avg_sentence_length or avg > config.max_avg_sentence_length
  yield "sentence_length", bad_avg, {"avg_sentence_length": avg}
  longest = max(sent_lengths, default=0)
  yield "long_sentence", longest > config.max_sentence_length, {"max_sentence_length": float(longest)}
  ellipsis = _frac(sum(s.strip().endswith(_ELLIPSES) for s in sents), len(sents))
  yield "ellipsis_endings", ellipsis > config.max_ellipsis_frac, {"ellipsis_frac": ellipsis}


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
