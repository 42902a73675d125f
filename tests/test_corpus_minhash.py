"""MinHash dedup: signatures against a pure-Python reference, first-seen-kept duplicates, band partitions and
their .npy files, and the LSH S-curve on pairs made from real Japanese paragraphs."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import SHARED_DATA
from jpllm_jax.corpus import minhash as mh

TEXT = SHARED_DATA / "text_ja" / "pretrain_ja.jsonl"
needs_text = pytest.mark.skipif(not TEXT.exists(), reason=f"no shared corpus at {TEXT}")
M64 = 2**64 - 1


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
  return [json.loads(line)["text"] for line in open(TEXT, encoding="utf-8")]


def _documents(paragraphs, n, k=3, seed=0) -> list[str]:
  """n documents of k distinct real paragraphs each (no paragraph used twice)."""
  rng = random.Random(seed)
  ids = rng.sample(range(len(paragraphs)), n * k)
  return ["\n".join(paragraphs[i] for i in ids[d * k:(d + 1) * k]) for d in range(n)]


def _edit(text: str, rate: float, rng: random.Random, alphabet: str) -> str:
  chars = list(text)
  for i in range(len(chars)):
    if rng.random() < rate:
      chars[i] = rng.choice(alphabet)
  return "".join(chars)


# ------------------------------------------------------------------------------- reference
def _mix(x: int) -> int:
  x ^= x >> 30
  x = (x * 0xBF58476D1CE4E5B9) & M64
  x ^= x >> 27
  x = (x * 0x94D049BB133111EB) & M64
  return x ^ (x >> 31)


def _ref_grams(text: str, config: mh.MinHashConfig) -> list[int]:
  c = mh._constants(config)
  n = min(config.ngram, len(text))
  out = []
  for s in range(len(text) - n + 1 if n else 0):
    h = n
    for ch in text[s:s + n]:
      h = (h * int(mh._POLY) + ord(ch)) & M64
    out.append(_mix(h ^ int(c.gram_key)))
  return out


def _ref_signature(text: str, config: mh.MinHashConfig) -> list[int]:
  """The signature by its definition: per slot, the min over grams of a fixed function of (gram, slot)."""
  c = mh._constants(config)
  k = config.num_perm
  grams = _ref_grams(text, config)
  sig = [M64] * k
  for g in grams:
    if config.scheme == "permutation":
      for i in range(k):
        sig[i] = min(sig[i], (int(c.a[i]) * g + int(c.b[i])) & M64)
      continue
    for j in range(mh.MAX_ROUNDS):  # every round, no early stop: the vectorised code may stop early.
      h = _mix(g ^ int(c.round_keys[j]))
      slot = ((h >> 32) * k) >> 32
      sig[slot] = min(sig[slot], (j << 56) | (((h * int(mh._VALUE_MUL)) & M64) >> 8))
    for i in range(k):
      sig[i] = min(sig[i], (255 << 56) | (_mix(g ^ int(c.slot_keys[i])) >> 8))
  return sig


def _ref_band_keys(sig: list[int], config: mh.MinHashConfig) -> list[int]:
  c = mh._constants(config)
  keys = []
  for b in range(config.bands):
    s = sum(_mix(sig[b * config.rows + r] ^ int(c.row_keys[r])) for r in range(config.rows)) & M64
    keys.append(_mix(s ^ int(c.band_keys[b])))
  return keys


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_vectorised_signature_equals_the_reference(scheme):
  config = mh.MinHashConfig(bands=8, rows=5, scheme=scheme, seed=3)
  texts = ["", "あ", "日本語", "東京都庁", "東京都庁舎", "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
           "ああああああああああああ", "𠮷野家の牛丼と😀絵文字", "abc abc abc abc", "日本の首都は東京である。" * 12]
  for text in texts:
    sig = mh.signature(text, config)
    assert sig.dtype == np.uint64 and sig.shape == (40,)
    assert [int(x) for x in sig] == _ref_signature(text, config), text
    assert [int(x) for x in mh.band_keys(sig, config)] == _ref_band_keys(_ref_signature(text, config), config)


def test_signature_is_deterministic_and_seeded():
  text = "株式会社ジェイ・キャストは、日本のネットニュースサイト運営会社。"
  a, b = mh.signature(text), mh.signature(text)
  assert a.shape == (800,) and a.dtype == np.uint64 and np.array_equal(a, b)
  assert not np.array_equal(a, mh.signature(text, mh.MinHashConfig(seed=1)))
  assert mh.band_keys(a).shape == (40,) and mh.band_keys(np.stack([a, b])).shape == (2, 40)
  assert np.array_equal(mh.signature(""), np.full(800, mh.EMPTY))
  with pytest.raises(ValueError):
    mh.MinHashConfig(scheme="bogus")
  with pytest.raises(ValueError):
    mh.band_keys(a[:100])


@needs_text
def test_signatures_batch_equals_per_document(paragraphs):
  texts = paragraphs[:30] + [""]
  keys = mh.signatures(texts)
  assert keys.shape == (31, 40) and keys.dtype == np.uint64
  for t, k in zip(texts, keys):
    assert np.array_equal(mh.band_keys(mh.signature(t)), k)
  assert mh.signatures([]).shape == (0, 40)


def test_duplicates_in_band_marks_all_but_the_first_seen():
  keys = np.array([7, 3, 7, 9, 3, 7], np.uint64)
  order = np.array([50, 10, 20, 5, 40, 30], np.int64)  # the 7s are seen in the order 2, 5, 0.
  assert mh.duplicates_in_band(order, keys).tolist() == [True, False, False, False, True, True]
  assert mh.duplicates_in_band(np.zeros(3, np.int64), np.array([1, 1, 1], np.uint64)).tolist() == [False, True, True]
  assert mh.duplicates_in_band(np.zeros(0, np.int64), np.zeros(0, np.uint64)).tolist() == []
  matrix = np.array([[1, 2], [3, 2], [1, 4]], np.uint64)
  assert mh.find_duplicates(np.arange(3), matrix).tolist() == [False, True, True]
  assert mh.find_duplicates(np.arange(3), matrix, band_ids=[1]).tolist() == [False, True, False]


@needs_text
def test_known_duplicates_are_found_and_the_first_seen_is_kept(paragraphs):
  docs = _documents(paragraphs, 60)
  near = docs[10][:100] + "★" + docs[10][101:300] + "☆" + docs[10][301:]
  assert 0.9 <= mh.jaccard(near, docs[10]) < 1.0
  texts = docs + [docs[3], near, "", ""]  # copies of 3 and 10 come later; two empty texts.
  keys = mh.signatures(texts)
  dup = mh.find_duplicates(np.arange(len(texts)), keys)
  assert np.flatnonzero(dup).tolist() == [60, 61, 63]
  # Seen in the other order (the copies first), the originals are the duplicates.
  order = np.arange(len(texts))[::-1].copy()
  assert np.flatnonzero(mh.find_duplicates(order, keys)).tolist() == [3, 10, 62]


@needs_text
def test_unrelated_real_paragraphs_are_not_matched(paragraphs):
  keys = mh.signatures(paragraphs)
  assert not mh.find_duplicates(np.arange(len(paragraphs)), keys).any()


@needs_text
def test_band_partitions_cover_every_band_once(paragraphs):
  for bands, workers in [(40, 1), (40, 3), (40, 7), (40, 40), (5, 8)]:
    parts = mh.band_partitions(bands, workers)
    assert len(parts) == workers
    assert sorted(b for p in parts for b in p) == list(range(bands))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
  docs = _documents(paragraphs, 40)
  texts = docs + [docs[5], docs[7] + "。", docs[0]]
  keys = mh.signatures(texts)
  order = np.arange(len(texts), dtype=np.int64)
  union = np.logical_or.reduce([mh.find_duplicates(order, keys, p) for p in mh.band_partitions(40, 6)])
  assert np.array_equal(union, mh.find_duplicates(order, keys))
  assert np.flatnonzero(union).tolist() == [40, 41, 42]


def test_save_and_load_band_keys(tmp_path):
  rng = np.random.default_rng(0)
  shards = []
  for s, n in enumerate([5, 0, 7]):
    order = (np.int64(s) << 32) + np.arange(n, dtype=np.int64)
    matrix = rng.integers(0, 2**64, size=(n, 40), dtype=np.uint64)
    mh.save_band_keys(str(tmp_path / f"{s}.bands"), order, matrix)
    shards.append((order, matrix))
  paths = [str(tmp_path / f"{s}.bands") for s in range(3)]
  order, matrix = mh.load_band_keys(paths)
  assert order.dtype == np.int64 and matrix.dtype == np.uint64
  assert np.array_equal(order, np.concatenate([o for o, _ in shards]))
  assert np.array_equal(matrix, np.concatenate([m for _, m in shards]))
  order2, cols = mh.load_band_keys(paths, [3, 17, 39])
  assert np.array_equal(order2, order) and np.array_equal(cols, matrix[:, [3, 17, 39]])
  on_disk = np.load(tmp_path / "0.bands" / mh.KEYS_FILE, mmap_mode="r")
  assert on_disk.shape == (5, 40) and on_disk.flags.f_contiguous  # one band is contiguous on disk.
  assert mh.load_band_keys([], [1, 2])[1].shape == (0, 2)
  assert not list(tmp_path.glob("*/*.tmp*"))


def test_jaccard():
  assert mh.jaccard("abcdef", "abcdef") == 1.0
  assert mh.jaccard("abcdef", "abcdeg") == pytest.approx(1 / 3)  # {abcde, bcdef} vs {abcde, bcdeg}.
  assert mh.jaccard("", "") == 1.0 and mh.jaccard("", "abc") == 0.0
  assert mh.jaccard("abc", "abc") == 1.0 and mh.jaccard("ab", "abc") == 0.0
  assert mh.jaccard("あいうえおか", "あいうえおか", ngram=2) == 1.0


@needs_text
def test_s_curve_on_generated_pairs(paragraphs):
  """Pairs at Jaccard >= 0.9 are caught (theory: >= 99.4% each), pairs below 0.5 never (theory: 4e-5)."""
  rng = random.Random(2)
  alphabet = "".join(sorted(set("".join(paragraphs))))
  docs = _documents(paragraphs, 200, k=5, seed=3)
  a, b = [], []
  for i, d in enumerate(docs):
    rate = 0.0025 if i % 2 else 0.15  # ~J 0.95 and ~J 0.3.
    a.append(d)
    b.append(_edit(d, rate * rng.uniform(0.5, 1.5), rng, alphabet))
  jac = np.array([mh.jaccard(x, y) for x, y in zip(a, b)])
  hit = (mh.signatures(a) == mh.signatures(b)).any(axis=1)
  high, low = jac >= 0.9, jac < 0.5
  assert high.sum() >= 80 and low.sum() >= 80
  assert hit[high].mean() >= 0.97
  assert not hit[low].any()
