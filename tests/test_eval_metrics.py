"""llm-jp-eval's metrics on hand-checked pairs and against rapidfuzz; MGSM's number rule; bootstrap intervals."""
from __future__ import annotations

import random

import numpy as np
import pytest
from rapidfuzz import fuzz, utils

from jpllm_jax.eval import metrics
from jpllm_jax.eval.harness import postprocess


@pytest.mark.parametrize("pred,gold,expected", [
    ("東京都", "東京", 0.80),  # the spec's examples
    ("1995年", "1995", 0.89),
    ("あまちゃん", "『あまちゃん』", 1.0),
    ("ABC", "abc", 1.0),  # lower-cased
    ("東京 大阪", "大阪、東京", 1.0),  # punctuation to spaces, tokens sorted
    ("", "東京", 0.0),
    ("。", "", 1.0),  # both empty after processing: fuzzywuzzy's equality check comes first
    ("a_b", "a b", 0.67),  # "_" is a word character for fuzzywuzzy: 1 - 2/6
    ("café", "caf", 1.0),  # U+0080..U+00FF are dropped (force_ascii)
    ("ｶﾀｶﾅ１", "カタカナ1", 1.0),  # NFKC
])
def test_char_f1_hand_checked(pred, gold, expected):
  assert metrics.char_f1(pred, gold) == expected


def test_char_f1_equals_rapidfuzz_token_sort_ratio_on_random_strings():
  rng = random.Random(0)
  alphabet = list("あいうえおかきくけこさしすせそ東京都大阪年月日ABCabc0123456789 、。「」・,.!?-") + ["  "]
  checked = 0
  for _ in range(3000):
    a = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
    b = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
    pa, pb = utils.default_process(a), utils.default_process(b)
    if not pa.strip() or not pb.strip():
      continue  # empty after processing: fuzzywuzzy's special cases (tested above), not rapidfuzz's
    reference = round(fuzz.token_sort_ratio(a, b, processor=utils.default_process)) / 100
    assert metrics.char_f1(a, b) == reference, (a, b)
    checked += 1
  assert checked > 2000


def test_exact_match_normalises_with_nfkc():
  assert metrics.exact_match("１", "1") == 1.0
  assert metrics.exact_match("1", "2") == 0.0


def test_postprocess_takes_the_first_paragraph():
  assert postprocess(" ２ \n\n質問：次") == "2"
  assert postprocess("東京\n大阪\n\nx") == "東京\n大阪"


@pytest.mark.parametrize("text,value", [
    ("5+6=11。答えは11です。", 11.0), ("答えは1,234ドルです。", 1234.0), ("-3.5度です", -3.5),
    ("合計は18.", 18.0), ("数字はない", None), ("1.2.3", None), ("７日", None),
])
def test_mgsm_number_is_the_last_match(text, value):
  assert metrics.mgsm_number(text) == value


def test_mgsm_match_compares_numbers():
  assert metrics.mgsm_match("だから 4*5=20 で、答えは 18.0", "18") == 1.0
  assert metrics.mgsm_match("答えは18です。その後19", "18") == 0.0
  assert metrics.mgsm_match(metrics.normalize("答えは１８"), "18") == 1.0  # full-width digits after NFKC


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
  rng = np.random.default_rng(0)
  small = rng.integers(0, 2, 50).astype(float)
  large = rng.integers(0, 2, 2000).astype(float)
  reps = metrics.bootstrap_means({"s": small, "l": large, "c": np.ones(30)}, n_resamples=2000, seed=1)
  lo_s, hi_s = metrics.percentile_interval(reps["s"])
  lo_l, hi_l = metrics.percentile_interval(reps["l"])
  assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
  assert hi_l - lo_l < (hi_s - lo_s) / 3  # ~ 1/sqrt(40)
  assert abs((hi_s - lo_s) - 2 * 1.96 * small.std() / np.sqrt(50)) < 0.05  # the normal approximation
  assert metrics.percentile_interval(reps["c"]) == (1.0, 1.0)
  again = metrics.bootstrap_means({"s": small, "l": large, "c": np.ones(30)}, n_resamples=2000, seed=1)
  assert np.array_equal(again["s"], reps["s"])
