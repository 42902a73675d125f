"""Pre-tokenised corpora: parallel encoding to numpy shards gives the pipeline the same batches as JSONL."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED_DATA
from jpllm_jax.data import pipeline
from jpllm_jax.data.token_shards import TokenSource, write_token_shards
from jpllm_jax.tokenizer import load_tokenizer, mistral_v1_path

JA = SHARED_DATA / "text_ja" / "pretrain_ja.jsonl"
pytestmark = pytest.mark.skipif(not JA.exists(), reason=f"no shared corpus at {JA}")


def test_token_directory_gives_the_jsonl_batches(tmp_path):
  sp = load_tokenizer()
  meta = write_token_shards(JA, mistral_v1_path(), tmp_path / "tok", workers=2, chunk_docs=300)
  assert meta["documents"] == 1210 and meta["vocab_size"] == 32000
  source = TokenSource(tmp_path / "tok")
  texts = [json.loads(line)["text"] for line in open(JA, encoding="utf-8")]
  for i in (0, 1, 599, 1209):
    np.testing.assert_array_equal(source[i]["tokens"], [sp.bos_id(), *sp.encode(texts[i]), sp.eos_id()])
  assert source.tokens.dtype == np.uint16
  for split in ("train", "validation"):
    kw = dict(seq_len=128, batch_size=4, seed=3, val_fraction=0.1, shard_index=0, shard_count=2, split=split)
    want = pipeline.make_iterator(JA, sp, **kw)
    got = pipeline.make_iterator(tmp_path / "tok", sp, **kw)
    for _ in range(5):
      a, b = next(want), next(got)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_token_directory_rejects_another_tokenizer(tmp_path):
  from jpllm_jax.tokenizer.train import train_sentencepiece
  other = train_sentencepiece([JA], str(tmp_path / "small"), 2000, max_sentences=600, character_coverage=0.995)
  write_token_shards(JA, other, tmp_path / "tok", workers=1)
  with pytest.raises(ValueError, match="differs from the tokenizer given"):
    pipeline.make_iterator(tmp_path / "tok", load_tokenizer(), seq_len=64, batch_size=2)


def test_encode_command(tmp_path):
  import subprocess
  import sys
  from conftest import REPO
  out = subprocess.run([sys.executable, "-m", "experiments.tokenizer", "encode", f"--input={JA}",
                        f"--output={tmp_path}", "--workers=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["documents"] == 1210 and len(TokenSource(tmp_path)) == 1210
