"""Tests of the Swallow quality rules: each rule at and just over its threshold, measures on hand-counted
examples, and the numpy n-gram statistics against a slow pure-Python reference on real Japanese text."""
from __future__ import annotations

import collections
import dataclasses
import json
import random

import numpy as np
import pytest
from conftest import SHARED_DATA

from jpllm_jax.corpus import quality
from jpllm_jax.corpus.quality import QualityConfig, measure, reject_reason

PRETRAIN_JA = SHARED_DATA / "text_ja" / "pretrain_ja.jsonl"

# Every rule off: each test turns on the one it checks.
PERMISSIVE = QualityConfig(
    min_length=0, min_japanese_letters=0, min_hiragana_frac=0.0, max_katakana_frac=1.0, min_japanese_frac=0.0,
    min_avg_sentence_length=0.0, max_avg_sentence_length=1e9, max_sentence_length=10**9, max_ellipsis_frac=1.0,
    max_dup_line_frac=1.0, max_dup_line_char_frac=1.0, max_dup_sentence_frac=1.0, max_dup_sentence_char_frac=1.0,
    top_ngram_max=(), dup_ngram_max=())


def only(**fields) -> QualityConfig:
  """PERMISSIVE with the given fields set back (to their defaults when given as None)."""
  defaults = QualityConfig()
  return dataclasses.replace(PERMISSIVE, **{k: getattr(defaults, k) if v is None else v for k, v in fields.items()})


def distinct(count: int, start: int = 0) -> str:
  """`count` different kanji (U+4E00 + start ...): text without any repeated n-gram."""
  return "".join(chr(0x4E00 + start + i) for i in range(count))


def load_pretrain() -> list[dict]:
  with open(PRETRAIN_JA, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


# --- slow, obvious reference implementation of every measure ---------------------------------------------------

def ref_class(ch: str) -> str:
  o = ord(ch)
  if 0x3041 <= o <= 0x3096:
    return "hiragana"
  if 0x30A1 <= o <= 0x30FA:
    return "katakana"
  if ch in "々〇〻" or 0x3400 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF:
    return "kanji"
  return "other"


def ref_sentences(text: str) -> list[str]:
  delims = "。．！？!?."
  out, cur, i = [], "", 0
  flat = text.replace("\n", "")
  while i < len(flat):
    cur += flat[i]
    if flat[i] in delims and (i + 1 == len(flat) or flat[i + 1] not in delims):
      out.append(cur)
      cur = ""
    i += 1
  out.append(cur)
  return [s.strip() for s in out if s.strip()]


def ref_duplicates(items: list[str]) -> tuple[int, int]:
  seen, dups, chars = set(), 0, 0
  for item in items:
    if item in seen:
      dups += 1
      chars += len(item)
    seen.add(item)
  return dups, chars


def ref_ngrams(text: str, n: int) -> tuple[int, int]:
  """(count of the most frequent n-gram, characters covered by repeats of n-grams: each occurrence after
  the first)."""
  grams = [text[i:i + n] for i in range(len(text) - n + 1)]
  counts = collections.Counter(grams)
  covered = [False] * len(text)
  seen = set()
  for i, gram in enumerate(grams):
    if gram in seen:
      for j in range(i, i + n):
        covered[j] = True
    seen.add(gram)
  return max(counts.values(), default=0), sum(covered)


def ref_measure(text: str) -> dict[str, float]:
  flat = text.replace("\n", "")
  length = len(flat)
  classes = collections.Counter(map(ref_class, flat))
  japanese = classes["hiragana"] + classes["katakana"] + classes["kanji"]
  sents = ref_sentences(text)
  lines = [line.strip() for line in text.split("\n") if line.strip()]
  m = {"length": length, "japanese_letters": japanese, "hiragana_frac": classes["hiragana"] / length,
       "katakana_frac": classes["katakana"] / length, "japanese_frac": japanese / length,
       "avg_sentence_length": sum(map(len, sents)) / len(sents), "max_sentence_length": max(map(len, sents)),
       "ellipsis_frac": sum(s.rstrip("。．！？!?.").rstrip()[-1:] in ("・", "…") for s in sents) / len(sents)}
  for name, items in (("line", lines), ("sentence", sents)):
    dups, chars = ref_duplicates(items)
    m[f"dup_{name}_frac"], m[f"dup_{name}_char_frac"] = dups / len(items), chars / length
  for n in (2, 3, 4):
    m[f"top_{n}gram_frac"] = ref_ngrams(flat, n)[0] * n / length
  for n in range(5, 11):
    m[f"dup_{n}gram_frac"] = ref_ngrams(flat, n)[1] / length
  return m


# --- rules at and over their thresholds -----------------------------------------------------------------------

def test_length_excludes_newlines():
  config = only(min_length=None)
  assert reject_reason("あ" * 400, config)[0] is None
  assert reject_reason("あ" * 399, config)[0] == "too_short"
  assert reject_reason("あ" * 200 + "\n" + "あ" * 199, config)[0] == "too_short"
  assert reject_reason("あ" * 200 + "\n" + "あ" * 200, config)[0] is None
  assert reject_reason("あ" * 200 + " " + "あ" * 199, config)[0] is None  # spaces count


def test_few_japanese_letters():
  config = only(min_japanese_letters=None)
  assert reject_reason("あア亜々" * 100, config)[0] is None
  assert reject_reason("あア亜々" * 100 + "a", config)[0] is None
  assert reject_reason("あア亜" * 133 + "ーーー", config)[0] == "few_japanese_letters"  # ー is not katakana


@pytest.mark.parametrize("rule, field, good, bad", [
    ("low_hiragana", "min_hiragana_frac", "あ" * 20 + "亜" * 80, "あ" * 19 + "亜" * 81),
    ("high_katakana", "max_katakana_frac", "ア" * 50 + "あ" * 50, "ア" * 51 + "あ" * 49),
    ("low_japanese", "min_japanese_frac", "亜" * 50 + "a" * 50, "亜" * 49 + "a" * 51),
    ("low_japanese", "min_japanese_frac", "亜" * 50 + " " * 50, "亜" * 49 + " " * 51),
])
def test_character_fractions(rule, field, good, bad):
  config = only(**{field: None})
  assert reject_reason(good, config)[0] is None
  assert reject_reason(bad, config)[0] == rule


def test_katakana_range():
  m = measure("アー・ヺ" + "ヴ" + "ァ")
  assert m["katakana_frac"] == pytest.approx(4 / 6)  # ア ヺ ヴ ァ; not ー ・


def test_sentence_length():
  config = only(min_avg_sentence_length=None, max_avg_sentence_length=None)
  assert reject_reason(("あ" * 19 + "。") * 3, config)[0] is None  # average 20
  assert reject_reason(("あ" * 19 + "。") * 2 + "あ" * 18 + "。", config)[0] == "sentence_length"
  assert reject_reason(("あ" * 89 + "！") * 3, config)[0] is None  # average 90
  assert reject_reason(("あ" * 89 + "！") * 2 + "あ" * 91 + "？", config)[0] == "sentence_length"


def test_long_sentence():
  config = only(max_sentence_length=None)
  assert reject_reason("あ" * 199 + "。" + "い" * 10 + "。", config)[0] is None
  assert reject_reason("あ" * 200 + "。" + "い" * 10 + "。", config)[0] == "long_sentence"
  assert reject_reason("あ" * 201, config)[0] == "long_sentence"  # no delimiter: one sentence
  assert reject_reason("あ" * 100 + "\n" + "あ" * 101, config)[0] == "long_sentence"  # newlines do not split


def test_ellipsis_endings():
  config = only(max_ellipsis_frac=None)
  plain = "普通の文です。"
  assert reject_reason("続く…。" + plain * 4, config)[0] is None  # 1 of 5
  assert reject_reason("続く…。" + plain * 3, config)[0] == "ellipsis_endings"  # 1 of 4
  assert reject_reason(plain * 3 + "最後は中黒・", config)[0] == "ellipsis_endings"
  assert reject_reason(plain * 3 + "最後は三点 … 。 ", config)[0] == "ellipsis_endings"
  assert reject_reason(plain * 3 + "…途中は数えない。", config)[0] is None


def test_duplicate_lines_needs_both_fractions():
  config = only(max_dup_line_frac=None, max_dup_line_char_frac=None)
  unique = [distinct(10, 10 * i) for i in range(10)]
  three = "\n".join(unique[:7] + [unique[0]] * 3)  # 3 of 10 lines and 30% of the characters
  four = "\n".join(unique[:6] + [unique[0]] * 4)
  assert measure(three, config)["dup_line_frac"] == pytest.approx(0.3)
  assert reject_reason(three, config)[0] is None
  assert reject_reason(four, config)[0] == "duplicate_lines"
  # Many short duplicates but few duplicate characters, and blank lines ignored.
  short = "\n".join([distinct(100, 100 * i) for i in range(6)] + ["は"] * 4 + ["", "  "])
  m = measure(short, config)
  assert m["dup_line_frac"] == pytest.approx(3 / 10) and m["dup_line_char_frac"] == pytest.approx(3 / 606)
  assert reject_reason(short + "\nは", config)[0] is None
  # Many duplicate characters in one long repeated line, but few duplicate lines.
  long = "\n".join([distinct(5, 5 * i) for i in range(8)] + [distinct(100, 500)] * 2)
  assert measure(long, config)["dup_line_char_frac"] > 0.2 and reject_reason(long, config)[0] is None


def test_duplicate_sentences():
  config = only(max_dup_sentence_frac=None, max_dup_sentence_char_frac=None)
  unique = [distinct(9, 9 * i) + "。" for i in range(10)]
  assert reject_reason("".join(unique[:7] + [unique[0]] * 3), config)[0] is None
  assert reject_reason("".join(unique[:6] + [unique[0]] * 4), config)[0] == "duplicate_sentences"
  m = measure("".join(unique[:6] + [unique[0]] * 4), config)
  assert m["dup_sentence_frac"] == pytest.approx(0.4) and m["dup_sentence_char_frac"] == pytest.approx(0.4)


@pytest.mark.parametrize("n, count, length", [(2, 2, 20), (3, 3, 50), (4, 2, 50)])
def test_top_ngram_threshold(n, count, length):
  """count * n / length is exactly the threshold; one character less goes over it."""
  threshold = dict(QualityConfig.top_ngram_max)[n]
  config = only(top_ngram_max=((n, threshold),))
  gram = distinct(n, 5000)
  body = gram + "".join(distinct(1, 6000 + i) + gram for i in range(count - 1))
  text = body + distinct(length - len(body))
  assert measure(text, config)[f"top_{n}gram_frac"] == threshold
  assert reject_reason(text, config)[0] is None
  assert reject_reason(text[:-1], config)[0] == f"top_{n}gram"


@pytest.mark.parametrize("n", range(5, 11))
def test_dup_ngram_threshold(n):
  """k + 1 separated copies of an n-gram (k = 100 * threshold repeats) in 100 * n characters cover exactly
  the threshold."""
  threshold = dict(QualityConfig.dup_ngram_max)[n]
  config = only(dup_ngram_max=((n, threshold),))
  copies = round(100 * threshold)
  gram = distinct(n, 5000)

  def text(k: int) -> str:
    body = "".join(gram + distinct(1, 6000 + i) for i in range(k + 1))
    return body + distinct(100 * n - len(body))
  assert measure(text(copies), config)[f"dup_{n}gram_frac"] == threshold
  assert reject_reason(text(copies), config)[0] is None
  assert reject_reason(text(copies + 1), config)[0] == f"dup_{n}gram"


def test_first_failing_rule_and_early_return():
  reason, m = reject_reason("短い。")
  assert reason == "too_short" and m == {"length": 3.0}
  # Fails low_hiragana and the n-gram rules: the cheap rule comes first, n-grams are not measured.
  reason, m = reject_reason("亜" * 500)
  assert reason == "low_hiragana" and "top_2gram_frac" not in m and m["hiragana_frac"] == 0.0
  # Sentences of 101 characters, all the same: sentence_length comes before the duplicate and n-gram rules.
  assert reject_reason(("あいうえお" * 20 + "。") * 10)[0] == "sentence_length"
  assert reject_reason(("あいうえお" * 20 + "。") * 10, only(max_dup_sentence_frac=None,
                                                       max_dup_sentence_char_frac=None))[0] == "duplicate_sentences"
  assert reject_reason(("あいうえお" * 20 + "。") * 10, only(top_ngram_max=None))[0] == "top_2gram"
  assert set(quality.REASONS) >= {"too_short", "few_japanese_letters", "duplicate_lines", "duplicate_sentences",
                                  "top_2gram", "top_4gram", "dup_5gram", "dup_10gram", "low_hiragana",
                                  "high_katakana", "low_japanese", "sentence_length", "long_sentence",
                                  "ellipsis_endings"}
  assert len(set(quality.REASONS)) == len(quality.REASONS) == 19


def test_real_wikipedia_article_passes():
  doc = "\n".join(d["text"] for d in load_pretrain() if d["title"] == "関白")
  assert len(doc) > 1500
  reason, m = reject_reason(doc)
  assert reason is None
  assert m == measure(doc)  # a passing document gets every measure
  assert set(m) == set(ref_measure(doc))


# --- measures on tiny hand-counted examples ----------------------------------------------------------------

def test_ngram_stats_hand_counted():
  def stats(text, tops, dups):
    return {n: (t, c) for n, t, c in quality.ngram_stats(quality.code_points(text), tops, dups)}
  # abcab: 2-grams ab bc ca ab -> "ab" twice; its repeat covers _ _ _ a b; 3-grams all distinct.
  assert stats("abcab", (2, 3), (2, 3)) == {2: (2, 2), 3: (1, 0)}
  # aaaaa: "aa" four times (overlapping); the repeats at 1, 2, 3 cover characters 1-4; no 6-gram.
  assert stats("aaaaa", (1, 2, 6), (2, 5, 6)) == {1: (5, None), 2: (4, 4), 5: (None, 0), 6: (0, 0)}
  assert stats("", (2,), (5,)) == {2: (0, None), 5: (None, 0)}
  # Repeated 5-gram あいうえお: its repeat covers 5 of 15 characters at n = 5, none at n = 6.
  m = measure("あいうえおかきくけこあいうえお")
  assert m["dup_5gram_frac"] == pytest.approx(5 / 15) and m["dup_6gram_frac"] == 0.0
  assert m["top_2gram_frac"] == pytest.approx(2 * 2 / 15) and m["top_4gram_frac"] == pytest.approx(2 * 4 / 15)
  assert measure("ああああ\nああ")["top_2gram_frac"] == pytest.approx(5 * 2 / 6)  # n-grams span the newline


def test_line_sentence_and_class_measures_hand_counted():
  text = "これは文です。あれは？\nそれ!!  次...\n\nこれは文です。"
  assert quality.sentences(text) == ["これは文です。", "あれは？", "それ!!", "次...", "これは文です。"]
  m = measure(text)
  assert m["length"] == 28
  assert m["dup_sentence_frac"] == pytest.approx(1 / 5) and m["dup_sentence_char_frac"] == pytest.approx(7 / 28)
  assert m["dup_line_frac"] == 0.0
  assert m["avg_sentence_length"] == pytest.approx((7 + 4 + 4 + 4 + 7) / 5) and m["max_sentence_length"] == 7
  assert quality.char_class_counts("ひらカナ漢字々〇〻ーａ𠀋") == (2, 2, 5)
  assert quality.count_japanese_letters("ひらカナ漢字") == 6


def test_measure_matches_reference_on_real_documents():
  paragraphs = [d["text"] for d in load_pretrain()]
  docs = ["\n".join(paragraphs[i:i + 5]) for i in range(0, 1000, 5)]
  assert len(docs) == 200
  for doc in docs:
    got, want = measure(doc), ref_measure(doc)
    assert got.keys() == want.keys()
    for key in want:
      assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), (key, doc[:40])


@pytest.mark.parametrize("key_bits", [64, 40, 30])
def test_ngram_stats_against_reference(monkeypatch, key_bits):
  """Random texts over tiny alphabets (many repeats, NUL, astral characters) and real text, also with narrow
  sort keys (fewer characters a round, and the argsort path)."""
  monkeypatch.setattr(quality, "_KEY_BITS", key_bits)
  rng = random.Random(key_bits)
  texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
           for alphabet in ("ab", "ab\0", "あい𠀋") for _ in range(40)]
  paragraphs = [d["text"] for d in load_pretrain()]
  texts += ["".join(paragraphs[i:i + 6]) for i in range(0, 240, 6)]
  for text in texts:
    cp = quality.code_points(text)
    got = {n: (t, c) for n, t, c in quality.ngram_stats(cp, (1, 2, 3, 4), range(2, 12))}
    assert list(got) == list(range(1, 12))
    for n, (top, covered) in got.items():
      want_top, want_covered = ref_ngrams(text, n)
      assert top == (want_top if n <= 4 else None) and covered == (want_covered if n >= 2 else None), (text, n)
  assert np.all(quality.code_points("a𠀋") == [0x61, 0x2000B])
