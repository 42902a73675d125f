"""Per-example metrics of llm-jp-eval v1.3.0 and the Stability JP harness, and bootstrap confidence intervals.

    normalize(text)         NFKC, as llm-jp-eval applies to predictions and golds
    exact_match(pred, gold) 1.0 / 0.0 on normalised strings
    char_f1(pred, gold)     llm-jp-eval's "char_f1": fuzzywuzzy's token_sort_ratio / 100 (see below)
    mgsm_number(text)       the last number of a generated chain of thought (Stability JP harness MGSM)

llm-jp-eval's `char_f1` is not a bag-of-characters F1: it is `fuzzywuzzy.fuzz.token_sort_ratio(pred, gold) / 100`
with python-Levenshtein installed. fuzzywuzzy drops the characters U+0080..U+00FF (`force_ascii`), turns every
non-word character (`\\W`: punctuation, 、。「」・ and spaces) into a space, lower-cases and strips, sorts the
whitespace tokens, joins them with one space, and takes the indel (insertion/deletion) similarity
`1 - distance / (len1 + len2)` rounded to a whole percent; equal processed strings score 1 and an empty one 0.
The distance comes from rapidfuzz (C++); the processing is fuzzywuzzy's, which differs from rapidfuzz's
`default_process` on "_" (a word character for fuzzywuzzy) and on U+0080..U+00FF (dropped by fuzzywuzzy).
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from rapidfuzz.distance import Indel

_LATIN1 = {i: None for i in range(128, 256)}
_NON_WORD = re.compile(r"\W", re.UNICODE)
_MGSM_NUMBER = re.compile(r"(\-?[0-9\.\,]+)")


def normalize(text: str) -> str:
  """Unicode NFKC, llm-jp-eval's normalisation of predictions and golds."""
  return unicodedata.normalize("NFKC", text)


def exact_match(pred: str, gold: str) -> float:
  return float(normalize(pred) == normalize(gold))


def _token_sort_key(text: str) -> str:
  """fuzzywuzzy's `_process_and_sort(text, force_ascii=True)`."""
  text = _NON_WORD.sub(" ", text.translate(_LATIN1)).lower().strip()
  return " ".join(sorted(text.split())).strip()


def char_f1(pred: str, gold: str) -> float:
  """llm-jp-eval's char_f1: fuzzywuzzy token_sort_ratio of the NFKC strings, in [0, 1] with 2 decimals."""
  a, b = _token_sort_key(normalize(pred)), _token_sort_key(normalize(gold))
  if a == b:
    return 1.0
  if not a or not b:
    return 0.0
  return int(round(100 * Indel.normalized_similarity(a, b))) / 100


def mgsm_number(text: str) -> float | None:
  """The last match of `(\\-?[0-9\\.\\,]+)` in `text`, dots stripped at its ends and commas removed, as a
  number; None when there is no match or it is not a number (e.g. "1.2.3"), which scores 0."""
  matches = _MGSM_NUMBER.findall(text)
  if not matches:
    return None
  try:
    return float(matches[-1].strip(".").replace(",", ""))
  except ValueError:
    return None


def mgsm_match(pred: str, gold: str) -> float:
  """1.0 when the last number of the generation equals the gold answer as a number."""
  value = mgsm_number(pred)
  return float(value is not None and value == float(gold.replace(",", "")))


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "char_f1": char_f1, "mgsm_match": mgsm_match}


def bootstrap_means(scores: Mapping[str, Sequence[float]], *, n_resamples: int = 1000,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """Bootstrap replicates of each task's mean score: [n_resamples] per task.

  Each task's examples are resampled with replacement independently, with the same replicate index across
  tasks, so that category means and averages can be formed per replicate (`percentile_interval`).
  """
  rng = np.random.default_rng(seed)
  out = {}
  for name in sorted(scores):
    values = np.asarray(scores[name], np.float64)
    if values.size == 0:
      out[name] = np.full(n_resamples, np.nan)
      continue
    idx = rng.integers(0, values.size, size=(n_resamples, values.size))
    out[name] = values[idx].mean(axis=1)
  return out


def percentile_interval(replicates: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
  """The (low, high) percentile interval of bootstrap replicates."""
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(replicates, [tail, 100 - tail])
  return float(low), float(high)
