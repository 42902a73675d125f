"""The data pipeline on the real Japanese corpus: packing, determinism, sharding, mixing, splits, resume."""
from __future__ import annotations

import collections
import json
import logging
import pickle

import grain
import numpy as np
import pytest

from conftest import SHARED_DATA
from jpllm_jax.data import JsonlSource, iter_texts, pipeline
from jpllm_jax.tokenizer import load_tokenizer
from jpllm_jax.tokenizer.train import train_sentencepiece

JA = SHARED_DATA / "text_ja" / "pretrain_ja.jsonl"
pytestmark = pytest.mark.skipif(not JA.exists(), reason=f"no shared corpus at {JA}")

SEQ, BATCH = 128, 8


@pytest.fixture(scope="module")
def sp():
  return load_tokenizer()


@pytest.fixture(scope="module")
def small_sp(tmp_path_factory):
  """A 2,000-piece unigram model trained on a sample of the corpus."""
  out = tmp_path_factory.mktemp("spm") / "ja2k"
  # Coverage 0.995: at 0.9995 this corpus needs ~2,200 distinct characters, more than 2,000 pieces.
  path = train_sentencepiece([JA], str(out), 2000, max_sentences=600, character_coverage=0.995)
  return load_tokenizer(path)


@pytest.fixture(scope="module")
def english(tmp_path_factory):
  path = tmp_path_factory.mktemp("en") / "en.jsonl"
  with open(path, "w") as f:
    for i in range(400):
      text = f"Document {i} is about the quick brown fox. " * (1 + i % 5)
      f.write(json.dumps({"id": f"en-{i}", "text": text}) + "\n")
  return path


def doc_tokens(tok, text):
  return [tok.bos_id(), *tok.encode(text), tok.eos_id()]


def kw(**overrides):
  return dict(seq_len=SEQ, batch_size=BATCH, val_fraction=0.1, seed=0, shard_index=0, shard_count=1) | overrides


def segments(batch):
  """(inputs, targets, position-0 flag) per packed segment of a batch."""
  out = []
  for row in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      m = seg == s
      out.append((batch["inputs"][row, m], batch["targets"][row, m]))
  return out


def assert_equal_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_sentencepiece_round_trips_japanese(small_sp):
  assert small_sp.get_piece_size() == 2000
  assert (small_sp.unk_id(), small_sp.bos_id(), small_sp.eos_id(), small_sp.pad_id()) == (0, 1, 2, -1)
  texts = list(iter_texts(JA))
  assert len(texts) == 1210
  for text in texts + [" 全角１２３ ＡＢＣ abc  \n\tテスト😀\u3000ｶﾀｶﾅ "]:
    assert small_sp.decode(small_sp.encode(text)) == text
  assert all(len(p) == 1 for p in small_sp.encode("2024年12月31日", out_type=str) if p.isdigit())  # split_digits


def test_bad_lines_are_counted_and_skipped(tmp_path, caplog, sp):
  good = [{"id": "a", "text": "日本語の文書です。"}, {"id": "b", "text": "二つ目\nの文書"}]
  lines = [json.dumps(good[0], ensure_ascii=False).encode(),
           b"\xff\xfe{\"text\": \"x\"}",                 # not UTF-8
           "{\"text\": \"途中で切れた".encode(),           # malformed JSON
           b"[1, 2, 3]",                                  # not an object
           b"{\"id\": \"no text\"}",                       # missing text
           b"{\"text\": 42}",                             # non-string text
           b"{\"text\": \"  \\n \"}",                     # whitespace-only document
           b"{\"text\": \"\"}",                           # empty document
           b"",                                           # blank line
           b"{\"text\": \"\\ud800\"}",                    # lone surrogate: not encodable as UTF-8
           json.dumps(good[1]).encode()]
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  with caplog.at_level(logging.WARNING):
    source = JsonlSource(path)
  assert source.stats == {"lines": 11, "read": 2, "skipped_malformed": 4, "skipped_empty": 3,
                          "skipped_non_utf8": 2}
  assert any("non_utf8" in r.getMessage() for r in caplog.records)
  assert [source[i]["text"] for i in range(len(source))] == [g["text"] for g in good]
  assert list(iter_texts(path)) == [g["text"] for g in good]
  clone = pickle.loads(pickle.dumps(source))  # what grain's worker processes receive
  assert clone[1] == source[1] == {"text": good[1]["text"], "index": 1}
  batches = list(pipeline.make_iterator(path, sp, **kw(num_epochs=1, val_fraction=0.0)))
  n_pairs = sum(len(doc_tokens(sp, g["text"])) - 1 for g in good)
  assert sum(b["weights"].sum() for b in batches) == n_pairs


def test_packing_invariants_and_no_token_lost(sp):
  batches = list(pipeline.make_iterator(JA, sp, **kw(num_epochs=1)))
  got = collections.Counter()
  starts = ends = 0
  for b in batches:
    assert set(b) == set(pipeline.BATCH_KEYS)
    for k, v in b.items():
      assert v.shape == (BATCH, SEQ) and v.dtype == (np.float32 if k == "weights" else np.int32), k
    seg, pos, w = b["segment_ids"], b["positions"], b["weights"]
    np.testing.assert_array_equal(w, (seg > 0).astype(np.float32))
    for row in range(BATCH):
      s = seg[row]
      n = int((s > 0).sum())
      assert (s[n:] == 0).all() and (b["inputs"][row, n:] == 0).all()  # padding only at the end
      if n:
        assert s[0] == 1 and (np.diff(s[:n]) >= 0).all() and (np.diff(s[:n]) <= 1).all()
      for sid in range(1, int(s.max()) + 1):
        m = np.flatnonzero(s == sid)
        assert m.size and (np.diff(m) == 1).all()  # contiguous
        np.testing.assert_array_equal(pos[row, m], np.arange(m.size))
        np.testing.assert_array_equal(b["targets"][row, m[:-1]], b["inputs"][row, m[1:]])  # shifted per document
        starts += b["inputs"][row, m[0]] == sp.bos_id()
        ends += b["targets"][row, m[-1]] == sp.eos_id()
    got.update(zip(b["inputs"][w > 0].tolist(), b["targets"][w > 0].tolist()))
  source = pipeline.open_source(JA)
  want = collections.Counter()
  train = pipeline.split_indices(source, "train", 0.1)
  for i in train:
    t = doc_tokens(sp, source[i]["text"])
    want.update(zip(t[:-1], t[1:]))
  assert got == want
  assert starts == ends == len(train)
  assert np.mean([b["weights"].mean() for b in batches]) > 0.85  # first-fit packing keeps padding low


def test_long_documents_are_chunked(sp):
  # seq_len 16 is far below the typical document: every document spans several rows.
  batches = list(pipeline.make_iterator(JA, sp, **kw(seq_len=16, num_epochs=1, val_fraction=0.9)))
  source = pipeline.open_source(JA)
  train = pipeline.split_indices(source, "train", 0.9)
  want = sum(len(doc_tokens(sp, source[i]["text"])) - 1 for i in train)
  assert sum(b["weights"].sum() for b in batches) == want
  assert max(b["segment_ids"].max() for b in batches) >= 1 and all(b["positions"].max() < 16 for b in batches)


def test_determinism_and_seeds(sp):
  def first(n, **o):
    it = pipeline.make_iterator(JA, sp, **kw(**o))
    return [next(it) for _ in range(n)]

  assert_equal_batches(first(4, seed=1), first(4, seed=1, num_threads=0))  # threads do not change the data
  assert not np.array_equal(first(1, seed=1)[0]["inputs"], first(1, seed=2)[0]["inputs"])
  docs = pipeline.documents(JA, seed=1, val_fraction=0.1, shard_index=0, shard_count=1)
  n = len(pipeline.split_indices(pipeline.open_source(JA), "train", 0.1))
  epoch1 = [docs[i]["index"] for i in range(n)]
  epoch2 = [docs[i]["index"] for i in range(n, 2 * n)]
  assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2  # every epoch is a reshuffled full pass


def test_sharding_gives_disjoint_documents(sp):
  n = len(pipeline.split_indices(pipeline.open_source(JA), "train", 0.1))
  shards = []
  for k in range(2):
    docs = pipeline.documents(JA, seed=0, val_fraction=0.1, shard_index=k, shard_count=2, num_epochs=1)
    shards.append({d["index"] for d in docs})
  assert not shards[0] & shards[1]
  assert len(shards[0] | shards[1]) == n and abs(len(shards[0]) - len(shards[1])) <= 1
  a = next(pipeline.make_iterator(JA, sp, **kw(shard_index=0, shard_count=2)))
  b = next(pipeline.make_iterator(JA, sp, **kw(shard_index=1, shard_count=2)))
  assert not np.array_equal(a["inputs"], b["inputs"])


def test_mixture_proportions(sp, english):
  sources = [(JA, 0.7), ([english], 0.3)]
  docs = pipeline.documents(sources, val_fraction=0.1, shard_index=0, shard_count=1)
  counts = collections.Counter(docs[i]["source"] for i in range(5000))
  assert abs(counts[0] / 5000 - 0.7) < 0.01
  # End to end: the first chunk of each document, by script.
  it = pipeline.make_iterator(sources, sp, **kw(seq_len=1024))
  ja = en = 0
  for _ in range(30):
    for inputs, _ in segments(next(it)):
      if inputs[0] == sp.bos_id():
        if sp.decode(inputs[1:].tolist()).isascii():
          en += 1
        else:
          ja += 1
  assert abs(ja / (ja + en) - 0.7) < 0.05


def test_validation_split(sp):
  source = pipeline.open_source(JA)
  train = set(pipeline.split_indices(source, "train", 0.1).tolist())
  val = set(pipeline.split_indices(source, "validation", 0.1).tolist())
  assert not train & val and len(train | val) == len(source) and 0.07 < len(val) / len(source) < 0.13
  docs = pipeline.documents(JA, split="validation", val_fraction=0.1, shard_index=0, shard_count=1)
  assert sorted(d["index"] for d in docs) == sorted(val)  # finite: one pass
  batches = list(pipeline.make_iterator(JA, sp, **kw(split="validation")))
  assert all(b["inputs"].shape == (BATCH, SEQ) for b in batches)  # the last batch is padded, not short
  assert sum(b["weights"].sum() for b in batches) == sum(len(doc_tokens(sp, source[i]["text"])) - 1 for i in val)
  assert_equal_batches(batches, list(pipeline.make_iterator(JA, sp, **kw(split="validation", seed=5))))
  halves = [{d["index"] for d in pipeline.documents(JA, split="validation", val_fraction=0.1, shard_index=k,
                                                     shard_count=2)} for k in range(2)]
  assert not halves[0] & halves[1] and halves[0] | halves[1] == val
  with pytest.raises(ValueError):
    pipeline.make_iterator(JA, sp, **kw(split="validation", val_fraction=0.0))


@pytest.mark.parametrize("mixed", [False, True])
def test_resume_from_saved_state(sp, small_sp, english, mixed):
  sources = [(JA, 0.6), (english, 0.4)] if mixed else JA
  # 90% held out leaves ~120 Japanese training documents, about 115 steps of 4 x 64 tokens per epoch, so
  # the saved steps are in the first, second (a packing round across the epoch end) and third epoch; a
  # packing round is 128 rows = 32 steps, so each is also mid-round.
  args = kw(seed=3, seq_len=64, batch_size=4, val_fraction=0.9)
  tok = small_sp if mixed else sp
  it = pipeline.make_iterator(sources, tok, **args)
  states, expected = {}, {}
  for step in range(260):
    if step in (37, 110, 245):
      states[step] = pipeline.state_to_bytes(it)
      json.loads(states[step])
    batch = next(it)
    expected.setdefault(step, batch)
  for step, state in states.items():
    resumed = pipeline.restore_state(pipeline.make_iterator(sources, tok, **args), state)
    assert_equal_batches([next(resumed) for _ in range(12)], [expected[s] for s in range(step, step + 12)])


def test_orbax_checkpoint_of_iterator(tmp_path, sp):
  ocp = pytest.importorskip("orbax.checkpoint")
  it = pipeline.make_iterator(JA, sp, **kw(seed=7))
  for _ in range(5):
    next(it)
  manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                                  options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  fresh = pipeline.make_iterator(JA, sp, **kw(seed=7))
  manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_equal_batches([next(fresh) for _ in range(3)], expected)
  manager.close()


def test_small_tokenizer_pipeline_reproduces_documents(small_sp):
  source = pipeline.open_source(JA)
  texts = {source[i]["text"] for i in range(len(source))}
  batches = list(pipeline.make_iterator(JA, small_sp, **kw(seq_len=512, num_epochs=1)))
  whole = 0
  for b in batches:
    for inputs, targets in segments(b):
      if inputs[0] == small_sp.bos_id() and targets[-1] == small_sp.eos_id():
        assert small_sp.decode(inputs[1:].tolist()) in texts
        whole += 1
  assert whole > 0.9 * len(pipeline.split_indices(source, "train", 0.1))


def test_shards_read_side_by_side_equal_separate_hosts(sp):
  """One process reading shards 0 and 1 of 2 gives the rows that two hosts with one shard each feed."""
  args = dict(seq_len=64, val_fraction=0.1, seed=0)
  both = pipeline.ShardsIterator(JA, sp, shards=[0, 1], shard_count=2, batch_size=8, **args)
  hosts = [pipeline.make_iterator(JA, sp, shard_index=k, shard_count=2, batch_size=4, **args) for k in (0, 1)]
  for _ in range(3):
    a, b = next(hosts[0]), next(hosts[1])
    assert_equal_batches([next(both)], [{k: np.concatenate([a[k], b[k]]) for k in a}])
  # Its state resumes exactly (and goes through JSON, as in the checkpoint).
  state = json.dumps(both.get_state())
  expected = [next(both) for _ in range(2)]
  fresh = pipeline.ShardsIterator(JA, sp, shards=[0, 1], shard_count=2, batch_size=8, **args)
  fresh.set_state(state.encode())
  assert_equal_batches([next(fresh) for _ in range(2)], expected)
  with pytest.raises(ValueError, match="multiple of the 2 local shards"):
    pipeline.ShardsIterator(JA, sp, shards=[0, 1], shard_count=2, batch_size=7, **args)


def test_validation_shards_end_together_with_empty_rows(sp):
  args = dict(seq_len=64, val_fraction=0.1, seed=0, split="validation")
  both = list(pipeline.ShardsIterator(JA, sp, shards=[0, 1, 2], shard_count=3, batch_size=6, **args))
  alone = [list(pipeline.make_iterator(JA, sp, shard_index=k, shard_count=3, batch_size=2, **args)) for k in range(3)]
  assert len(both) == max(len(a) for a in alone)
  weights = sum(b["weights"].sum() for b in both)
  assert weights == sum(b["weights"].sum() for a in alone for b in a)  # no token lost or repeated
