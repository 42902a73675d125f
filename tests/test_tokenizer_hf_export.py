"""The exported HF tokenizer encodes what training feeds the model; `expand --hf_dir` writes a complete expanded
HF model that transformers loads; the tokenizer commands skip and report bad lines; size errors name our flag."""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from jpllm_jax.data.jsonl import iter_texts
from jpllm_jax.data.pipeline import _Tokenize
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.tokenizer.expand import expand_vocabulary, export_hf

from conftest import REPO, SHARED_DATA

JA = SHARED_DATA / "text_ja" / "pretrain_ja.jsonl"
EN = SHARED_DATA / "text_en" / "pretrain_en.jsonl"
transformers = pytest.importorskip("transformers")


def cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.tokenizer", *args], cwd=REPO, capture_output=True,
                        text=True)


def last_json(proc: subprocess.CompletedProcess) -> dict:
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def expanded(tmp_path_factory) -> str:
  tmp = tmp_path_factory.mktemp("expand")
  return expand_vocabulary(mistral_v1_path(), JA, 300, str(tmp), learn_vocab_size=3500, max_sentences=20_000)


@pytest.mark.parametrize("which", ["mistral", "expanded"])
def test_exported_tokenizer_encodes_what_training_feeds(which, expanded, tmp_path):
  model = mistral_v1_path() if which == "mistral" else expanded
  export_hf(model, str(tmp_path))
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  sp = spm.SentencePieceProcessor(model_file=model)
  pipeline_ids = _Tokenize(sp)  # what the data pipeline feeds the model for one document
  texts = list(itertools.islice(iter_texts(JA), 300)) + list(itertools.islice(iter_texts(EN), 300))
  for text in texts:
    fed = pipeline_ids({"text": text}).tolist()
    assert fed[0] == sp.bos_id() and fed[-1] == sp.eos_id()
    assert tok(text)["input_ids"] + [sp.eos_id()] == fed, text[:80]  # the pipeline's EOS ends the document
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text) == fed[1:-1], text[:80]
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["add_bos_token"] is True and config["add_eos_token"] is False
  assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
  assert tok.decode(tok(texts[0])["input_ids"], skip_special_tokens=True) == texts[0]
  post = json.loads((tmp_path / "tokenizer.json").read_text())["post_processor"]
  assert [p.get("SpecialToken", {}).get("id") for p in post["single"]] == ["<s>", None]


def test_export_with_eos_gives_the_pipelines_whole_document(expanded, tmp_path):
  export_hf(expanded, str(tmp_path), add_bos_token=True, add_eos_token=True)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  sp = spm.SentencePieceProcessor(model_file=expanded)
  assert tok("東京タワー")["input_ids"] == _Tokenize(sp)({"text": "東京タワー"}).tolist()
  assert tok("東京タワー")["input_ids"] == sp.encode("東京タワー", add_bos=True, add_eos=True)


def _base_hf_dir(path, vocab_size: int):
  """A small random HF Llama whose vocabulary is the Mistral tokenizer's, with its tokenizer.model."""
  import torch
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    initializer_range=0.2, max_position_embeddings=128)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  model.save_pretrained(path)
  shutil.copyfile(mistral_v1_path(), path / "tokenizer.model")


def test_expand_hf_dir_writes_a_complete_model(tmp_path):
  import torch
  from jpllm_jax import hf, models
  from jpllm_jax.models.vocab import new_token_rows

  base_dir, out = tmp_path / "base", tmp_path / "out"
  _base_hf_dir(base_dir, 32000)
  line = last_json(cli("expand", f"--hf_dir={base_dir}", f"--input={JA}", "--add=200", "--learn_vocab_size=3500",
                       "--max_sentences=20000", f"--output={out}"))
  assert line["base"] == str(base_dir / "tokenizer.model")
  assert line["vocab_size"] == 32200 and line["model_vocab_size"] == 32256  # padded to a multiple of 128
  for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json"):
    assert (out / name).exists(), name
  config = json.loads((out / "config.json").read_text())
  assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (32256, 1, 2)
  assert "pad_token_id" not in config  # the tokenizer defines no pad piece
  assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}

  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
  prompt = "東京タワーは" + "、".join(sp.decode([i]) for i in range(32000, 32004)) + "です。"
  ids = tok(prompt)["input_ids"]
  assert ids == [sp.bos_id(), *sp.encode(prompt)] and max(ids) >= 32000  # BOS only; uses new pieces
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor([ids])).logits.float().numpy()
  cfg, params = hf.load_pretrained(out)
  ours = np.asarray(models.forward(cfg, params, np.asarray([ids]), positions=np.arange(len(ids))[None],
                                   segment_ids=np.ones((1, len(ids)), np.int32)))
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
  base_emb = base.get_input_embeddings().weight.detach().numpy()
  emb = model.get_input_embeddings().weight.detach().numpy()
  np.testing.assert_array_equal(emb[:32000], base_emb)
  new_piece = sp.id_to_piece(32000)
  rows = new_token_rows([new_piece], spm.SentencePieceProcessor(model_file=mistral_v1_path()))
  np.testing.assert_allclose(emb[32000], base_emb[rows[0]].mean(0), rtol=1e-6, atol=1e-6)
  assert not emb[32200:].any()  # padding rows


def test_cli_skips_bad_lines_and_names_our_flag(tmp_path):
  good = JA.read_bytes().splitlines(keepends=True)
  bad = [b'{"text": "broken\n', b'{"id": 7, "title": "no text"}\n', b'{"text": "\xff\xfe not utf-8"}\n']
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_bytes(b"".join(good[:5] + bad + good[5:]))
  proc = cli("report", f"--input={mixed}")
  rep = last_json(proc)
  assert (rep["ja"]["docs"], rep["ja"]["lines"]) == (len(good), len(good) + 3)
  assert (rep["ja"]["skipped_malformed"], rep["ja"]["skipped_non_utf8"]) == (2, 1)
  for lineno in (6, 7, 8):
    assert f"{mixed}:{lineno}:" in proc.stderr
  assert "3 lines skipped" in proc.stderr

  proc = cli("expand", f"--input={mixed}", "--add=100", "--learn_vocab_size=3500", "--max_sentences=20000",
             f"--output={tmp_path / 'out'}")
  line = last_json(proc)
  assert line["ja"]["skipped_malformed"] == 2 and f"{mixed}:8:" in proc.stderr and "3 lines skipped" in proc.stderr
  assert line["base"] == mistral_v1_path() and "default Mistral-7B v1" in proc.stderr  # the base is said

  proc = cli("expand", f"--input={mixed}", "--add=100", "--learn_vocab_size=300", f"--output={tmp_path / 'o2'}")
  assert proc.returncode != 0 and "--learn_vocab_size" in proc.stderr and "Traceback" not in proc.stderr
  assert "vocabulary size 300 (--learn_vocab_size)" in proc.stderr and "required_chars" not in proc.stderr
