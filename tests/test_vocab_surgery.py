"""Vocabulary expansion: base logits unchanged, Swallow mean initialisation, padding, checkpoint round trip."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jpllm_jax import checkpoint, models
from jpllm_jax.models import llama, qwen2, vocab
from jpllm_jax.tokenizer import load_tokenizer, mistral_v1_path

V_BASE = 32000
SMALL = dict(vocab_size=V_BASE, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_seq_len=64,
             init_std=0.3)
PIECES = ["日本語", "東京都", "▁こんにちは", "▁形態素解析"]


def _configs():
  return {"llama2": llama.llama2(**SMALL), "qwen2_tied": qwen2.qwen2(**SMALL, tie_embeddings=True)}


def test_padded_vocab_size():
  assert vocab.padded_vocab_size(32000) == 32000
  assert vocab.padded_vocab_size(32001) == 32128
  assert vocab.padded_vocab_size(5, 1) == 5
  assert vocab.padded_vocab_size(43176, 256) == 43264


@pytest.mark.parametrize("name", sorted(_configs()))
def test_expand_embeddings(name):
  cfg = _configs()[name]
  params = models.init(cfg, jax.random.key(0))
  rows = [[100, 200, 300], [5], [28705, 29543], [1000, 1001, 1002, 1003]]
  new_cfg, new_params = vocab.expand_embeddings(cfg, params, V_BASE + len(rows), rows)
  assert new_cfg.vocab_size == 32128 and new_cfg.vocab_size % 128 == 0
  assert new_cfg.replace(vocab_size=V_BASE) == cfg

  emb, new_emb = np.asarray(params["embed"]["embedding"]), np.asarray(new_params["embed"]["embedding"])
  assert new_emb.shape == (32128, cfg.d_model) and new_emb.dtype == emb.dtype
  np.testing.assert_array_equal(new_emb[:V_BASE], emb)
  if cfg.tie_embeddings:
    assert "lm_head" not in new_params
    head, new_head = emb.T, new_emb.T
  else:
    head, new_head = np.asarray(params["lm_head"]["kernel"]), np.asarray(new_params["lm_head"]["kernel"])
    assert new_head.shape == (cfg.d_model, 32128) and new_head.dtype == head.dtype
    np.testing.assert_array_equal(new_head[:, :V_BASE], head)
  for i, ids in enumerate(rows):
    np.testing.assert_allclose(new_emb[V_BASE + i], emb[ids].mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new_head[:, V_BASE + i], head[:, ids].mean(1), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(new_emb[V_BASE + len(rows):], 0)
  np.testing.assert_array_equal(new_head[:, V_BASE + len(rows):], 0)

  tokens = np.array([[1, 400, 5000, 31999, 28705, 17], [2, 3, 4, 5, 6, 7]], np.int32)
  logits = np.asarray(models.forward(cfg, params, tokens))
  new_logits = np.asarray(models.forward(new_cfg, new_params, tokens))
  assert new_logits.shape == (2, 6, 32128)
  # The hidden states are bit-identical; the head matmul over a wider V may be tiled differently by XLA, so
  # the base logits agree to float32 rounding (exactly, in exact arithmetic).
  np.testing.assert_array_equal(np.asarray(models.hidden(new_cfg, new_params, tokens)),
                                np.asarray(models.hidden(cfg, params, tokens)))
  np.testing.assert_allclose(new_logits[..., :V_BASE], logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(new_logits[..., V_BASE + len(rows):], 0)

  masked = np.asarray(vocab.mask_padding_logits(new_logits, V_BASE + len(rows)))
  np.testing.assert_array_equal(masked[..., :V_BASE + len(rows)], new_logits[..., :V_BASE + len(rows)])
  assert (masked[..., V_BASE + len(rows):] == np.finfo(np.float32).min).all()


def test_expand_embeddings_keeps_bfloat16_and_checks_args():
  cfg = llama.llama2(**{**SMALL, "vocab_size": 300}, param_dtype="bfloat16")
  params = models.init(cfg, jax.random.key(1))
  new_cfg, new_params = vocab.expand_embeddings(cfg, params, 302, [[1, 2], []], pad_multiple=64)
  assert new_cfg.vocab_size == 320
  assert new_params["embed"]["embedding"].dtype == params["embed"]["embedding"].dtype
  assert new_params["lm_head"]["kernel"].dtype == params["lm_head"]["kernel"].dtype
  emb = np.asarray(params["embed"]["embedding"], np.float32)
  np.testing.assert_allclose(np.asarray(new_params["embed"]["embedding"][301], np.float32), emb.mean(0),
                             rtol=1e-2, atol=1e-3)
  with pytest.raises(ValueError, match="new_vocab_size"):
    vocab.expand_embeddings(cfg, params, 305, [[1]])
  with pytest.raises(ValueError, match="outside the base"):
    vocab.expand_embeddings(cfg, params, 301, [[300]])


def test_new_token_rows_mistral():
  base = load_tokenizer(mistral_v1_path())
  literal = vocab._literal_encoder(base)
  pieces = PIECES + ["hello", "▁hello", "▁東京"]
  rows = vocab.new_token_rows(pieces, base)
  for piece, ids in zip(pieces, rows):
    text = vocab.piece_text(piece)
    assert ids and all(0 <= i < V_BASE for i in ids)
    assert base.bos_id() not in ids and base.eos_id() not in ids
    assert literal.decode(ids) == text
    assert base.decode(ids) == text.lstrip(" ")  # the base decoder drops the leading (dummy-prefix) space.
  assert rows[pieces.index("hello")] != rows[pieces.index("▁hello")]
  assert base.id_to_piece(rows[pieces.index("▁hello")][0]).startswith("▁")
  assert not base.id_to_piece(rows[pieces.index("日本語")][0]).startswith("▁")


def _extended_tokenizer(tmp_path, pieces):
  from sentencepiece import sentencepiece_model_pb2 as pb
  m = pb.ModelProto()
  with open(mistral_v1_path(), "rb") as f:
    m.ParseFromString(f.read())
  for s in pieces:
    p = m.pieces.add()
    p.piece, p.score, p.type = s, -1e6, pb.ModelProto.SentencePiece.NORMAL
  path = tmp_path / "extended.model"
  path.write_bytes(m.SerializeToString())
  return str(path)


def test_expand_checkpoint_round_trip(tmp_path):
  new_pieces = ["日本語", "東京都", "▁こんにちは"]
  new_tok = _extended_tokenizer(tmp_path, new_pieces)
  assert load_tokenizer(new_tok).get_piece_size() == V_BASE + 3
  cfg = llama.llama2(**SMALL)
  params = models.init(cfg, jax.random.key(2))
  checkpoint.save_params(tmp_path / "base", cfg, params, step=7)

  new_cfg = vocab.expand_checkpoint(str(tmp_path / "base"), mistral_v1_path(), new_tok, str(tmp_path / "out"))
  assert new_cfg.vocab_size == 32128
  loaded_cfg, loaded = checkpoint.load_params(tmp_path / "out")
  assert loaded_cfg == new_cfg
  rows = vocab.new_token_rows(new_pieces, load_tokenizer(mistral_v1_path()))
  ref_cfg, ref = vocab.expand_embeddings(cfg, params, V_BASE + 3, rows)
  assert ref_cfg == new_cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, ref)

  with pytest.raises(ValueError, match="does not extend"):
    vocab.expand_checkpoint(str(tmp_path / "base"), new_tok, mistral_v1_path(), str(tmp_path / "bad"))


def test_expand_checkpoint_rejects_changed_pieces(tmp_path):
  from sentencepiece import sentencepiece_model_pb2 as pb
  m = pb.ModelProto()
  with open(mistral_v1_path(), "rb") as f:
    m.ParseFromString(f.read())
  m.pieces[500].piece = "差替"
  path = tmp_path / "changed.model"
  path.write_bytes(m.SerializeToString())
  with pytest.raises(ValueError, match="first at id 500"):
    vocab.expand_checkpoint(str(tmp_path / "missing"), mistral_v1_path(), str(path), str(tmp_path / "out"))
