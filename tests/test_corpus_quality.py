"""Tests of the Swallow quality rules: a pure-Python transcription of Swallow's definitions (regex, Counter)
that every measure and decision must equal on real text, concatenations, extracted web pages and planted
repeats; each rule at and just over its threshold; the numpy n-gram statistics against Counter."""
from __future__ import annotations

import collections
import dataclasses
import fractions
import json
import random
import re

import numpy as np
import pytest
from conftest import SHARED_DATA

from benchmarks import synthetic_crawl
from jpllm_jax.corpus import extract, quality, warc
from jpllm_jax.corpus.quality import QualityConfig, measure, reject_reason

PRETRAIN_JA = SHARED_DATA / "text_ja" / "pretrain_ja.jsonl"
WEB = SHARED_DATA / "web"

# Every rule off: each test turns on the one it checks.
PERMISSIVE = QualityConfig(
    min_length=0, max_dup_line_frac=1.0, max_dup_sentence_frac=1.0, max_dup_line_char_frac=1.0,
    max_dup_sentence_char_frac=1.0, top_ngram_max=(), dup_ngram_max=(), min_hiragana_frac=0.0,
    max_katakana_frac=1.0, min_japanese_frac=0.0, min_japanese_letters=0, min_avg_sentence_length=0.0,
    max_avg_sentence_length=1e9, max_sentence_length=10**9, max_ellipsis_frac=1.0)


def only(**fields) -> QualityConfig:
  """PERMISSIVE with the given fields set back (to their defaults when given as None)."""
  defaults = QualityConfig()
  return dataclasses.replace(PERMISSIVE, **{k: getattr(defaults, k) if v is None else v for k, v in fields.items()})


def distinct(count: int, start: int = 0) -> str:
  """`count` different kanji (U+4E00 + start ...): text without any repeated n-gram."""
  return "".join(chr(0x4E00 + start + i) for i in range(count))


def load_pretrain() -> list[str]:
  with open(PRETRAIN_JA, encoding="utf-8") as f:
    return [json.loads(line)["text"] for line in f]


def web_texts() -> list[str]:
  """The texts extracted from every page of the shared WARC files."""
  stats: collections.Counter = collections.Counter()
  texts = (extract.extract_text(p.html, p.url, p.http_charset)
           for path in sorted((WEB / "warc").glob("*.warc.gz")) for p in warc.iter_pages(str(path), stats))
  return [t for t in texts if t]


# --- Swallow's definitions, transcribed plainly (swallow-corpus quality.py: main and apply_v1) ---------------

REF_SENTENCE = re.compile(r"[^。．！？!?]+[。．！？!?]?")
REF_KANJI = re.compile(r"[々〇〻\u3400-\u9FFF\uF900-\uFAFF]|[\uD840-\uD87F][\uDC00-\uDFFF]")


def ref_duplicates(items: list[str]) -> tuple[int, int]:
  counts = collections.Counter(items)
  return sum(f - 1 for f in counts.values()), sum(len(s) * (f - 1) for s, f in counts.items())


def ref_measure(text: str) -> dict[str, float]:
  """Every measure, by Swallow's definitions (0 where Swallow's code would raise on an empty list)."""
  per_line = [REF_SENTENCE.findall(line) for line in text.split("\n")]
  paragraphs = ["".join(s) for s in per_line]
  sents = [s for line in per_line for s in line]
  m = {"length": float(len(text))}
  for name, items in (("line", paragraphs), ("sentence", sents)):
    dups, dup_chars = ref_duplicates(items)
    total = sum(len(s) for s in items)
    m[f"dup_{name}_frac"] = dups / len(items) if items else 0.0
    m[f"dup_{name}_char_frac"] = dup_chars / total if total else 0.0
  for n in range(2, 11):
    counts = collections.Counter(text[i:i + n] for i in range(len(text) - n + 1))
    if n <= 4:
      m[f"top_{n}gram_frac"] = max(counts.values()) / sum(counts.values()) if counts else 0.0
    else:
      m[f"dup_{n}gram_frac"] = sum(1 for f in counts.values() if f > 1) / len(counts) if counts else 0.0
  hiragana = sum(1 for c in text if 0x3041 <= ord(c) <= 0x3096)
  katakana = sum(1 for c in text if 0x30A1 <= ord(c) <= 0x30FA)
  punctuation = sum(1 for c in text if c in "、，。．！？")
  japanese = hiragana + katakana + len(REF_KANJI.findall(text)) + punctuation
  m["hiragana_frac"] = hiragana / japanese if japanese else 0.0
  m["katakana_frac"] = katakana / japanese if japanese else 0.0
  m["japanese_frac"] = japanese / len(text) if text else 0.0
  m["japanese_letters"] = float(japanese)
  m["avg_sentence_length"] = sum(len(s) for s in sents) / len(sents) if sents else 0.0
  m["max_sentence_length"] = float(max((len(s) for s in sents), default=0))
  ellipses = sum(1 for s in sents if s.strip().endswith(("・", "…")))
  m["ellipsis_frac"] = ellipses / len(sents) if sents else 0.0
  return m


def ref_reason(m: dict[str, float]) -> str | None:
  """apply_v1: the first rule that holds, in its order, under our names."""
  rules = [("too_short", m["length"] < 400),
           ("duplicate_lines", m["dup_line_frac"] > 0.30),
           ("duplicate_sentences", m["dup_sentence_frac"] > 0.30),
           ("duplicate_line_chars", m["dup_line_char_frac"] > 0.20),
           ("duplicate_sentence_chars", m["dup_sentence_char_frac"] > 0.20),
           ("top_2gram", m["top_2gram_frac"] > 0.20),
           ("top_3gram", m["top_3gram_frac"] > 0.18),
           ("top_4gram", m["top_4gram_frac"] > 0.16),
           *((f"dup_{n}gram", m[f"dup_{n}gram_frac"] > t)
             for n, t in zip(range(5, 11), (0.15, 0.14, 0.13, 0.12, 0.11, 0.10))),
           ("low_hiragana", m["hiragana_frac"] < 0.2),
           ("high_katakana", m["katakana_frac"] > 0.5),
           ("low_japanese", m["japanese_frac"] < 0.5),
           ("few_japanese_letters", m["japanese_letters"] < 400),
           ("sentence_length", m["avg_sentence_length"] < 20 or m["avg_sentence_length"] > 90),
           ("long_sentence", m["max_sentence_length"] > 200),
           ("ellipsis_endings", m["ellipsis_frac"] > 0.2)]
  return next((reason for reason, holds in rules if holds), None)


def disagreements(docs: list[str]) -> list[tuple[str, str]]:
  """(first 40 characters, what differs) for every document whose measures or decision differ."""
  out = []
  for doc in docs:
    got, want = measure(doc), ref_measure(doc)
    if got != want:
      out.append((doc[:40], str({k: (got.get(k), want.get(k)) for k in want if got.get(k) != want[k]})))
    elif reject_reason(doc)[0] != ref_reason(want):
      out.append((doc[:40], f"{reject_reason(doc)[0]} != {ref_reason(want)}"))
  return out


def planted(paragraphs: list[str], rng: random.Random) -> str:
  """Real paragraphs with planted repeats: repeated lines and sentences, blank and whitespace lines, stray and
  doubled delimiters, ellipses, repeated phrases."""
  parts = []
  for _ in range(rng.randint(3, 12)):
    kind = rng.randrange(7)
    para = rng.choice(paragraphs)
    if kind == 0 and parts:
      parts.append(rng.choice(parts))  # a repeated line
    elif kind == 1:
      sents = REF_SENTENCE.findall(para) or [para]
      parts.append("".join(rng.choice(sents) for _ in range(rng.randint(2, 6))))  # repeated sentences
    elif kind == 2:
      parts.append(rng.choice(["", "  ", "\u3000", "。", "！？", "…", "続く・ "]))
    elif kind == 3:
      parts.append(para.replace("。", rng.choice(["。。", "！!", "…", "。 "])))
    elif kind == 4:
      parts.append(rng.choice(["ホーム", "会社概要", "Copyright ©"]) * rng.randint(1, 30))
    else:
      parts.append(para)
  return "\n".join(parts)


# --- agreement with the reference -------------------------------------------------------------------------------

def test_agrees_with_swallow_on_every_shared_document():
  paragraphs = load_pretrain()
  assert len(paragraphs) == 1210
  assert disagreements(paragraphs) == []


def test_agrees_with_swallow_on_concatenations_and_web_pages():
  paragraphs = load_pretrain()
  docs = ["\n".join(paragraphs[i:i + 5]) for i in range(0, len(paragraphs), 5)]
  docs += ["".join(paragraphs[i:i + 3]) for i in range(0, 300, 3)]  # no newline between them
  web = web_texts()
  assert len(web) >= 10
  assert disagreements(docs + web) == []
  assert {ref_reason(ref_measure(d)) for d in docs} >= {None, "too_short"}


def test_agrees_with_swallow_on_planted_repeats_and_synthetic_pages(tmp_path):
  paragraphs = load_pretrain()
  rng = random.Random(0)
  docs = [planted(paragraphs, rng) for _ in range(200)]
  reasons = collections.Counter(ref_reason(ref_measure(d)) for d in docs)
  assert len(reasons) >= 6, reasons  # the planted repeats reach many rules
  manifest = synthetic_crawl.make_crawl(paragraphs, 50, str(tmp_path / "c.warc.gz"), seed=3)
  assert manifest["n_pages"] == 50
  pages = warc.iter_pages(str(tmp_path / "c.warc.gz"), collections.Counter())
  texts = [t for t in (extract.extract_text(p.html, p.url, p.http_charset) for p in pages) if t]
  assert len(texts) >= 40
  assert disagreements(docs + texts) == []


def test_degenerate_texts_and_surrogates():
  for text in ["", "a", "\n", "\n\n\n", "。", "。。\n！", "  ", "ab", "あ\uD840\uDC0B", "\uD840\uDC0B" * 3]:
    m = measure(text)
    assert m == ref_measure(text), text
    assert reject_reason(text)[0] == ref_reason(m)
  assert measure("亜\uD840\uDC0B")["japanese_letters"] == 2  # a surrogate pair is one kanji, as in Swallow


# --- rules at and over their thresholds -----------------------------------------------------------------------

def test_length_counts_newlines():
  config = only(min_length=None)
  assert reject_reason("あ" * 400, config)[0] is None
  assert reject_reason("あ" * 399, config)[0] == "too_short"
  assert reject_reason("あ" * 200 + "\n" + "あ" * 199, config)[0] is None
  assert reject_reason("あ" * 200 + "\n" + "あ" * 198, config)[0] == "too_short"


def test_duplicate_lines_and_their_characters_are_separate_rules():
  unique = [distinct(10, 10 * i) for i in range(10)]
  three = "\n".join(unique[:7] + [unique[0]] * 3)  # 3 of 10 lines and 30% of the characters
  four = "\n".join(unique[:6] + [unique[0]] * 4)
  config = only(max_dup_line_frac=None)
  assert measure(three, config)["dup_line_frac"] == pytest.approx(0.3)
  assert reject_reason(three, config)[0] is None
  assert reject_reason(four, config)[0] == "duplicate_lines"
  # Blank lines are paragraphs too: three repeats of the empty one.
  blanks = "\n".join(unique[:3] + [""] * 4)
  assert measure(blanks)["dup_line_frac"] == pytest.approx(3 / 7)
  assert reject_reason(blanks, config)[0] == "duplicate_lines"
  # One long repeated line: few duplicate lines, many duplicate characters (over the paragraphs' characters).
  long = "\n".join([distinct(5, 5 * i) for i in range(8)] + [distinct(100, 500)] * 2)
  config = only(max_dup_line_frac=None, max_dup_line_char_frac=None)
  assert measure(long)["dup_line_char_frac"] == pytest.approx(100 / 240)
  assert reject_reason(long, config)[0] == "duplicate_line_chars"
  def lines(first: int) -> str:  # 1 of 4 lines, 20 of first + 45 characters duplicate
    return "\n".join([distinct(first, 0), distinct(5, 100), distinct(20, 200), distinct(20, 200)])
  assert measure(lines(55))["dup_line_char_frac"] == 0.2 and reject_reason(lines(55), config)[0] is None
  assert reject_reason(lines(54), config)[0] == "duplicate_line_chars"


def test_duplicate_sentences():
  unique = [distinct(9, 9 * i) + "。" for i in range(10)]
  config = only(max_dup_sentence_frac=None)
  assert reject_reason("".join(unique[:7] + [unique[0]] * 3), config)[0] is None
  assert reject_reason("".join(unique[:6] + [unique[0]] * 4), config)[0] == "duplicate_sentences"
  config = only(max_dup_sentence_char_frac=None)
  long = "".join([distinct(5, 5 * i) + "。" for i in range(8)] + [distinct(60, 500) + "。"] * 2)
  assert measure(long)["dup_sentence_frac"] == pytest.approx(0.1)
  assert reject_reason(long, config)[0] == "duplicate_sentence_chars"


@pytest.mark.parametrize("n, count, positions", [(2, 2, 10), (3, 9, 50), (4, 4, 25)])
def test_top_ngram_threshold(n, count, positions):
  """count / positions is exactly the threshold; one character less goes over it."""
  threshold = dict(QualityConfig.top_ngram_max)[n]
  config = only(top_ngram_max=((n, threshold),))
  gram = distinct(n, 5000)
  body = gram + "".join(distinct(1, 6000 + i) + gram for i in range(count - 1))
  text = body + distinct(positions + n - 1 - len(body))
  assert measure(text, config)[f"top_{n}gram_frac"] == threshold
  assert reject_reason(text, config)[0] is None
  assert reject_reason(text[:-1], config)[0] == f"top_{n}gram"


@pytest.mark.parametrize("n", range(5, 11))
def test_dup_ngram_threshold(n):
  """A block of m characters twice repeats m - n + 1 n-gram types; padding sets the distinct types so the
  fraction is exactly the threshold, one character less goes over it."""
  threshold = dict(QualityConfig.dup_ngram_max)[n]
  config = only(dup_ngram_max=((n, threshold),))
  ratio = fractions.Fraction(threshold).limit_denominator(100)
  scale = -(-n // (ratio.denominator - ratio.numerator)) + 1  # room for the two blocks
  repeated, types = ratio.numerator * scale, ratio.denominator * scale
  block = distinct(repeated + n - 1, 5000)
  body = block + "。" + block
  text = body + distinct(types + repeated + n - 1 - len(body))
  assert measure(text, config)[f"dup_{n}gram_frac"] == threshold
  assert reject_reason(text, config)[0] is None
  assert reject_reason(text[:-1], config)[0] == f"dup_{n}gram"


@pytest.mark.parametrize("rule, field, good, bad", [
    ("low_hiragana", "min_hiragana_frac", "あ" * 20 + "亜" * 79 + "。", "あ" * 19 + "亜" * 80 + "。"),
    ("low_hiragana", "min_hiragana_frac", "あ" * 20 + "亜" * 80 + "a" * 500, "あ" * 19 + "亜" * 81 + "a" * 90),
    ("high_katakana", "max_katakana_frac", "ア" * 50 + "あ" * 49 + "、" + "a" * 90,
     "ア" * 51 + "あ" * 48 + "、"),
    ("low_japanese", "min_japanese_frac", "亜" * 45 + "、" * 5 + "a" * 50, "亜" * 49 + "a" * 51),
    ("low_japanese", "min_japanese_frac", "亜" * 50 + "\n" * 50, "亜" * 49 + "\n" * 51),
])
def test_character_fractions(rule, field, good, bad):
  """Hiragana and katakana fractions are of the Japanese letters (punctuation included), the Japanese
  fraction of all characters (newlines included)."""
  config = only(**{field: None})
  assert reject_reason(good, config)[0] is None
  assert reject_reason(bad, config)[0] == rule


def test_few_japanese_letters_counts_punctuation():
  config = only(min_japanese_letters=None)
  assert reject_reason("あア亜々" * 100, config)[0] is None
  assert reject_reason("あア亜" * 133 + "。", config)[0] is None
  assert reject_reason("あア亜" * 133 + "！", config)[0] is None
  assert reject_reason("あア亜" * 133 + "!", config)[0] == "few_japanese_letters"  # ASCII ! is not Japanese
  assert reject_reason("あア亜" * 133 + "ーー", config)[0] == "few_japanese_letters"  # ー is not katakana


def test_katakana_range():
  m = measure("アー・ヺ" + "ヴ" + "ァ")
  assert m["katakana_frac"] == 1.0 and m["japanese_frac"] == pytest.approx(4 / 6)  # ア ヺ ヴ ァ; not ー ・


def test_sentence_length():
  config = only(min_avg_sentence_length=None, max_avg_sentence_length=None)
  assert reject_reason(("あ" * 19 + "。") * 3, config)[0] is None  # average 20
  assert reject_reason(("あ" * 19 + "。") * 2 + "あ" * 18 + "。", config)[0] == "sentence_length"
  assert reject_reason(("あ" * 19 + "。！") * 3, config)[0] is None  # the second delimiter is in no sentence
  assert reject_reason(("あ" * 89 + "！") * 3, config)[0] is None  # average 90
  assert reject_reason(("あ" * 89 + "！") * 2 + "あ" * 91 + "？", config)[0] == "sentence_length"


def test_long_sentence():
  config = only(max_sentence_length=None)
  assert reject_reason("あ" * 199 + "。" + "い" * 10 + "。", config)[0] is None
  assert reject_reason("あ" * 200 + "。" + "い" * 10 + "。", config)[0] == "long_sentence"
  assert reject_reason("あ" * 201, config)[0] == "long_sentence"  # no delimiter: one sentence
  assert reject_reason("あ" * 100 + "\n" + "あ" * 101, config)[0] is None  # a newline ends a sentence
  assert reject_reason("あ" * 200 + ".あ", config)[0] == "long_sentence"  # ASCII . is no delimiter


def test_ellipsis_endings():
  config = only(max_ellipsis_frac=None)
  plain = "普通の文です。"
  assert reject_reason(plain * 4 + "\n続く…", config)[0] is None  # 1 of 5
  assert reject_reason(plain * 3 + "\n続く…", config)[0] == "ellipsis_endings"  # 1 of 4
  assert reject_reason(plain * 3 + "最後は中黒・", config)[0] == "ellipsis_endings"
  assert reject_reason(plain * 3 + "最後は三点 … 　", config)[0] == "ellipsis_endings"  # whitespace stripped
  assert reject_reason(plain * 3 + "続く…。", config)[0] is None  # ends with its delimiter


def test_first_failing_rule_in_apply_v1_order():
  reason, m = reject_reason("短い。")
  assert reason == "too_short" and m == {"length": 3.0}
  # Fails low_hiragana and the n-gram rules: apply_v1 checks n-grams first and stops at the first.
  reason, m = reject_reason("亜" * 500)
  assert reason == "top_2gram" and "top_3gram_frac" not in m and "hiragana_frac" not in m
  assert reject_reason("亜" * 500, only(min_hiragana_frac=None))[0] == "low_hiragana"
  # Sentences of 101 characters, all the same: the duplicate rules come before n-grams and sentence length.
  text = ("あいうえお" * 20 + "。") * 10
  assert reject_reason(text)[0] == "duplicate_sentences"
  assert reject_reason(text, dataclasses.replace(QualityConfig(), max_dup_sentence_frac=1.0))[0] == \
      "duplicate_sentence_chars"
  assert reject_reason(text, only(top_ngram_max=None, min_avg_sentence_length=None,
                                  max_avg_sentence_length=None))[0] == "top_3gram"  # 200/1008
  assert reject_reason(text, only(min_avg_sentence_length=None, max_avg_sentence_length=None))[0] == \
      "sentence_length"
  assert len(set(quality.REASONS)) == len(quality.REASONS) == 21
  assert quality.REASONS[:5] == ("too_short", "duplicate_lines", "duplicate_sentences", "duplicate_line_chars",
                                 "duplicate_sentence_chars")


def test_real_wikipedia_article_passes():
  with open(PRETRAIN_JA, encoding="utf-8") as f:
    doc = "\n".join(d["text"] for d in map(json.loads, f) if d["title"] == "関白")
  assert len(doc) > 1500
  reason, m = reject_reason(doc)
  assert reason is None
  assert m == measure(doc) == ref_measure(doc)  # a passing document gets every measure


# --- measures on tiny hand-counted examples ----------------------------------------------------------------

def test_ngram_stats_hand_counted():
  def stats(text, tops, dups):
    return {n: rest for n, *rest in quality.ngram_stats(quality.code_points(text), tops, dups)}
  # abcab: 2-grams ab bc ca ab -> "ab" twice, 3 types of which 1 repeats; 3-grams all distinct.
  assert stats("abcab", (2, 3), (2, 3)) == {2: [2, 1, 3], 3: [1, 0, 3]}
  # aaaaa: "aa" four times (one type); no 6-gram.
  assert stats("aaaaa", (1, 2, 6), (2, 5, 6)) == {1: [5, None, None], 2: [4, 1, 1], 5: [None, 0, 1],
                                                  6: [0, 0, 0]}
  assert stats("", (2,), (5,)) == {2: [0, None, None], 5: [None, 0, 0]}
  # Repeated 5-gram あいうえお: 1 of 10 types at n = 5, none at n = 6; n-grams span the newline.
  m = measure("あいうえおかきくけこあいうえお")
  assert m["dup_5gram_frac"] == pytest.approx(1 / 10) and m["dup_6gram_frac"] == 0.0
  assert m["top_2gram_frac"] == pytest.approx(2 / 14) and m["top_4gram_frac"] == pytest.approx(2 / 12)
  assert measure("ああああ\nああ")["top_2gram_frac"] == pytest.approx(4 / 6)  # ああ 4 of 6; あ\n, \nあ


def test_line_sentence_and_class_measures_hand_counted():
  text = "これは文です。あれは？\nそれ!!  次...\n\n。これは文です。"
  assert quality.sentences(text) == ["これは文です。", "あれは？", "それ!", "  次...", "これは文です。"]
  assert quality.lines(text) == ["これは文です。あれは？", "それ!  次...", "", "これは文です。"]
  m = measure(text)
  assert m["length"] == 32
  assert m["dup_sentence_frac"] == pytest.approx(1 / 5) and m["dup_sentence_char_frac"] == pytest.approx(7 / 27)
  assert m["dup_line_frac"] == 0.0
  assert m["avg_sentence_length"] == pytest.approx(27 / 5) and m["max_sentence_length"] == 7
  assert m["japanese_letters"] == 22 and m["hiragana_frac"] == pytest.approx(15 / 22)
  assert quality.char_class_counts("ひらカナ漢字々〇〻ーａ𠀋。") == (2, 2, 5)
  assert quality.count_japanese_letters("ひらカナ漢字、") == 6


@pytest.mark.parametrize("key_bits", [64, 40, 30])
def test_ngram_stats_against_counter(monkeypatch, key_bits):
  """Random texts over tiny alphabets (many repeats, NUL, astral characters) and real text, also with narrow
  sort keys (fewer characters a round, and the argsort path)."""
  monkeypatch.setattr(quality, "_KEY_BITS", key_bits)
  rng = random.Random(key_bits)
  texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
           for alphabet in ("ab", "ab\0", "あい𠀋") for _ in range(40)]
  paragraphs = load_pretrain()
  texts += ["\n".join(paragraphs[i:i + 6]) for i in range(0, 240, 6)]
  for text in texts:
    cp = quality.code_points(text)
    got = {n: rest for n, *rest in quality.ngram_stats(cp, (1, 2, 3, 4), range(2, 12))}
    assert list(got) == list(range(1, 12))
    for n, (top, repeated, types) in got.items():
      counts = collections.Counter(text[i:i + n] for i in range(len(text) - n + 1))
      assert top == (max(counts.values(), default=0) if n <= 4 else None), (text, n)
      if n >= 2:
        assert (repeated, types) == (sum(f > 1 for f in counts.values()), len(counts)), (text, n)
      else:
        assert repeated is None and types is None
  assert np.all(quality.code_points("a𠀋") == [0x61, 0x2000B])
