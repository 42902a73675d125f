"""Vocabulary expansion: base ids kept, English unchanged, exact Japanese round trip, HF export parity, CLI."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm

from jpllm_jax.data.jsonl import iter_texts
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.tokenizer.expand import (_load_proto, english_sample_texts, expand_vocabulary, export_hf, has_japanese,
                                        report)

from conftest import REPO, SHARED_DATA

JA = SHARED_DATA / "text_ja" / "pretrain_ja.jsonl"
pytestmark = pytest.mark.skipif(not JA.exists(), reason="no shared Japanese corpus")

CRAFTED = ["𠮷野家", "ＡＢＣ１２３！", "😀🇯🇵", "東京都に住む", "Hello 東京 123 world.", "\t東京\n\n 都 ", "", " ", "  x",
           "a\nb\n\n c", "カタカナとひらがなと漢字、そして「括弧」。", "𩸽と𠀋と髙橋", "ﾊﾝｶｸｶﾀｶﾅ", "東京タワー🗼は333m"]


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("expand")
  learn = tmp / "learn.jsonl"
  with open(learn, "w", encoding="utf-8") as f:
    for text in itertools.islice(iter_texts(JA), 0, None, 2):  # every other document
      f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
  path = expand_vocabulary(mistral_v1_path(), learn, 2500, str(tmp / "out"), learn_vocab_size=4000,
                           max_sentences=50_000)
  return path


def test_base_ids_unchanged(expanded):
  base, new = _load_proto(mistral_v1_path()), _load_proto(expanded)
  assert len(new.pieces) > len(base.pieces)
  assert len(new.pieces) <= len(base.pieces) + 2500
  for b, n in zip(base.pieces, new.pieces):
    assert (b.piece, b.score, b.type) == (n.piece, n.score, n.type)
  added = new.pieces[len(base.pieces):]
  base_set = {p.piece for p in base.pieces}
  assert all(has_japanese(p.piece) and p.piece not in base_set for p in added)
  assert len({p.piece for p in added}) == len(added)
  scores = [p.score for p in added]
  assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


def test_english_identical_and_japanese_round_trip(expanded):
  base = spm.SentencePieceProcessor(model_file=mistral_v1_path())
  new = spm.SentencePieceProcessor(model_file=expanded)
  for text in english_sample_texts():
    assert new.encode(text) == base.encode(text)
  docs = list(itertools.islice(iter_texts(JA), 1, 400, 2))  # held-out documents
  for text in docs + CRAFTED:
    assert new.decode(new.encode(text)) == text
  assert new.encode("𠮷") and all(new.IsByte(i) for i in new.encode("𠮷")[-4:])
  ja_base = sum(len(base.encode(t)) for t in docs)
  ja_new = sum(len(new.encode(t)) for t in docs)
  assert ja_new < 0.8 * ja_base


def test_hf_export_matches_sentencepiece(expanded, tmp_path):
  transformers = pytest.importorskip("transformers")
  export_hf(expanded, str(tmp_path / "hf"))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  sp = spm.SentencePieceProcessor(model_file=expanded)
  texts = list(itertools.islice(iter_texts(JA), 300)) + CRAFTED + english_sample_texts()
  for text in texts:
    ids = sp.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids, text[:80]
    assert hf.encode(text) == [sp.bos_id(), *ids]  # BOS only; the data pipeline then ends the document with EOS
    assert hf.decode(ids) == text
  export_hf(expanded, str(tmp_path / "hf_bare"), add_bos_token=False, add_eos_token=False)
  hf_bare = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf_bare"))
  assert hf_bare.encode("東京タワー") == sp.encode("東京タワー")


def test_report_sane(expanded, tmp_path):
  en = tmp_path / "en.jsonl"
  en.write_text("".join(json.dumps({"text": t}) + "\n" for t in english_sample_texts()), encoding="utf-8")
  new = report(expanded, JA, english_paths=en)
  base = report(mistral_v1_path(), JA, english_paths=en)
  assert new["ja"]["docs"] == base["ja"]["docs"] > 1000
  assert 0.3 < new["ja"]["tokens_per_char"] < base["ja"]["tokens_per_char"] < 1.3
  assert new["ja"]["bytes_per_token"] > base["ja"]["bytes_per_token"] > 1
  assert 0 <= new["ja"]["byte_fallback_share"] < base["ja"]["byte_fallback_share"] < 0.5
  assert new["en"] == {**base["en"]}
  assert 0.1 < new["en"]["tokens_per_char"] < 0.5 and new["en"]["byte_fallback_share"] < 0.1


def test_cli_expand_and_report(tmp_path):
  out = tmp_path / "cli"
  run = lambda *args: subprocess.run([sys.executable, "-m", "experiments.tokenizer", *args], cwd=REPO,  # noqa: E731
                                     check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
  line = json.loads(run("expand", f"--input={JA}", "--add=200", "--learn_vocab_size=3500", f"--output={out}",
                        "--max_sentences=20000"))
  assert line["vocab_size"] == 32200 and os.path.exists(out / "tokenizer.model")
  assert os.path.exists(out / "tokenizer.json") and os.path.exists(out / "tokenizer_config.json")
  rep = json.loads(run("report", f"--tokenizer={out / 'tokenizer.model'}", f"--input={JA}"))
  assert rep["vocab_size"] == 32200 and rep["ja"]["tokens_per_char"] < 1.12
