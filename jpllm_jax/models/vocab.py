"""Vocabulary expansion ("vocab surgery") of a trained model, as in Swallow's continual pre-training.

A Japanese tokenizer is made by appending pieces to the base SentencePiece model (the base ids keep their
meaning). The model then grows its input embedding and its output head to the new vocabulary:

* base rows (and head columns) are copied exactly, so logits over the base vocabulary do not change;
* row `V_base + i` of the embedding is the mean of the base rows of the ids that the base tokenizer splits
  new piece `i` into (`new_token_rows`), and likewise head column `V_base + i` is the mean of the base head
  columns of those ids (Swallow's initialisation);
* the table is padded to a multiple of `pad_multiple` (128 by default) for efficient sharding. Padding rows
  are zero in the embedding and padding head columns are zero, so a padding logit is exactly 0: it is never
  a data token, the loss never targets it and training pushes it down only through the softmax. To exclude
  it exactly at sampling or evaluation time use `padding_logit_mask` / `mask_padding_logits` with the number
  of real pieces (the tokenizer size); `ModelConfig` has no field for it.

    new_cfg = expand_checkpoint(ckpt_dir, base_tokenizer_path, new_tokenizer_path, out_dir)
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpllm_jax.models.config import ModelConfig

Params = dict[str, Any]
SPACE = "\u2581"  # SentencePiece's "▁": a space in the surface text.


def padded_vocab_size(n: int, multiple: int = 128) -> int:
  """`n` rounded up to a multiple of `multiple` (`multiple` <= 1: `n` unchanged)."""
  if n <= 0:
    raise ValueError(f"vocabulary size must be positive, got {n}")
  if multiple <= 1:
    return n
  return -(-n // multiple) * multiple


def piece_text(piece: str) -> str:
  """The surface text of a SentencePiece piece: every "▁" is a space."""
  return piece.replace(SPACE, " ")


def _literal_encoder(base_tokenizer):
  """A copy of a SentencePiece processor that encodes text literally: no dummy-prefix space is added and
  whitespace is not collapsed. Other tokenizers (anything with `encode`) are returned as they are."""
  serialized = getattr(base_tokenizer, "serialized_model_proto", None)
  if serialized is None:
    return base_tokenizer
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as pb
  proto = pb.ModelProto()
  proto.ParseFromString(serialized())
  proto.normalizer_spec.add_dummy_prefix = False
  proto.normalizer_spec.remove_extra_whitespaces = False
  return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def new_token_rows(new_pieces: Sequence[str], base_tokenizer) -> list[list[int]]:
  """For each new piece, the base-tokenizer ids its surface text is split into (no BOS/EOS).

  The ids correspond to the piece's own text, exactly: Mistral's / Llama's SentencePiece model adds a dummy
  prefix space ("▁") before encoding, which would give "日本語" the ids of "▁日本語". We therefore encode with
  a copy of the base model whose `add_dummy_prefix` and `remove_extra_whitespaces` are off, so "日本語" maps
  to the ids of "日本語" and "▁こんにちは" (text " こんにちは") to the ids of " こんにちは" (its "▁" included).
  Decoding the ids with that literal processor gives back `piece_text(piece)`.
  """
  encoder = _literal_encoder(base_tokenizer)
  rows = []
  for piece in new_pieces:
    ids = [int(i) for i in encoder.encode(piece_text(piece))]
    rows.append(ids)
  return rows


def padding_logit_mask(vocab_size: int, n_real: int) -> np.ndarray:
  """Boolean [vocab_size]: True for the real pieces [0, n_real), False for the padding columns."""
  if not 0 < n_real <= vocab_size:
    raise ValueError(f"n_real={n_real} must be in (0, vocab_size={vocab_size}]")
  return np.arange(vocab_size) < n_real


def mask_padding_logits(logits: jax.Array, n_real: int) -> jax.Array:
  """`logits` [..., V] with the padding columns (>= n_real) set to the dtype's minimum: they get no
  probability in a softmax or in sampling."""
  mask = jnp.asarray(padding_logit_mask(logits.shape[-1], n_real))
  return jnp.where(mask, logits, jnp.finfo(logits.dtype).min)


def _grow(table: np.ndarray, axis: int, n_base: int, init_rows: Sequence[Sequence[int]], total: int) -> np.ndarray:
  """`table` grown along `axis` (the vocabulary axis) to `total`: [0, n_base) copied, then one mean per
  `init_rows` entry, then zeros. Means are taken in float32 and cast to the table's dtype."""
  t = np.moveaxis(table, axis, 0)
  out = np.zeros((total, *t.shape[1:]), dtype=t.dtype)
  out[:n_base] = t[:n_base]
  base32 = t[:n_base].astype(np.float32)
  for i, ids in enumerate(init_rows):
    ids = np.asarray(list(ids), dtype=np.int64)
    if ids.size == 0:
      mean = base32.mean(axis=0)  # nothing to average: the mean of the whole base vocabulary.
    else:
      if ids.min() < 0 or ids.max() >= n_base:
        raise ValueError(f"init_rows[{i}] has ids outside the base vocabulary [0, {n_base}): {ids.tolist()}")
      mean = base32[ids].mean(axis=0)
    out[n_base + i] = mean.astype(t.dtype)
  return np.moveaxis(out, 0, axis)


def expand_embeddings(cfg: ModelConfig, params: Params, new_vocab_size: int, init_rows: Sequence[Sequence[int]],
                      *, pad_multiple: int = 128, base_vocab_size: int | None = None
                      ) -> tuple[ModelConfig, Params]:
  """Grows the embedding [V, D] and the head ([D, V] `lm_head`, or the tied embedding) to
  `padded_vocab_size(new_vocab_size, pad_multiple)`; returns (new config, new params).

  `base_vocab_size` (default `cfg.vocab_size`) is the number of real base pieces; rows at or beyond it (the
  base model's own padding) are overwritten. New row / head column `base_vocab_size + i` is the mean of the
  base rows / head columns listed in `init_rows[i]` (the mean of all base rows if the list is empty). Padding
  rows and head columns are zero (see the module docstring). Other params are shared, not copied; dtypes and
  array kinds (numpy or jax) are kept.
  """
  n_base = cfg.vocab_size if base_vocab_size is None else base_vocab_size
  if not 0 < n_base <= cfg.vocab_size:
    raise ValueError(f"base_vocab_size={n_base} must be in (0, cfg.vocab_size={cfg.vocab_size}]")
  if new_vocab_size != n_base + len(init_rows):
    raise ValueError(f"new_vocab_size={new_vocab_size} != base {n_base} + {len(init_rows)} init_rows")
  total = padded_vocab_size(new_vocab_size, pad_multiple)

  def grow(w, axis):
    if w.shape[axis] != cfg.vocab_size:
      raise ValueError(f"vocabulary axis of a {w.shape} table is not cfg.vocab_size={cfg.vocab_size}")
    out = _grow(np.asarray(w), axis, n_base, init_rows, total)
    return jnp.asarray(out) if isinstance(w, jax.Array) else out

  new = dict(params)
  new["embed"] = {**params["embed"], "embedding": grow(params["embed"]["embedding"], 0)}
  if not cfg.tie_embeddings:
    new["lm_head"] = {**params["lm_head"], "kernel": grow(params["lm_head"]["kernel"], 1)}
  return cfg.replace(vocab_size=total), new


def _pieces(sp) -> list[str]:
  return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def expansion_rows(base_tokenizer_path: str, new_tokenizer_path: str) -> tuple[int, list[list[int]]]:
  """(V_base, `new_token_rows` of the new pieces): the new tokenizer must extend the base one (its first
  `V_base` pieces equal the base pieces, in order); its pieces from id V_base on are the new ones."""
  from jpllm_jax.tokenizer import load_tokenizer

  base, new_sp = load_tokenizer(base_tokenizer_path), load_tokenizer(new_tokenizer_path)
  base_pieces, new_all = _pieces(base), _pieces(new_sp)
  n_base = len(base_pieces)
  if len(new_all) < n_base or new_all[:n_base] != base_pieces:
    bad = next((i for i, (a, b) in enumerate(zip(base_pieces, new_all)) if a != b), min(n_base, len(new_all)))
    raise ValueError(f"the new tokenizer {new_tokenizer_path} does not extend the base {base_tokenizer_path}: "
                     f"pieces differ first at id {bad} (base has {n_base} pieces, new has {len(new_all)})")
  return n_base, new_token_rows(new_all[n_base:], base)


def expand_checkpoint(ckpt_dir: str | os.PathLike, base_tokenizer_path: str, new_tokenizer_path: str,
                      out_dir: str | os.PathLike, pad_multiple: int = 128) -> ModelConfig:
  """Expands the checkpoint in `ckpt_dir` (latest step) from the base tokenizer's vocabulary to the new
  tokenizer's (`expansion_rows`) and saves it (step 0) to `out_dir`; returns the new config."""
  from jpllm_jax import checkpoint

  n_base, rows = expansion_rows(base_tokenizer_path, new_tokenizer_path)
  cfg, params = checkpoint.load_params(ckpt_dir)
  if cfg.vocab_size < n_base:
    raise ValueError(f"checkpoint vocab_size={cfg.vocab_size} is smaller than the base tokenizer ({n_base})")
  new_cfg, new_params = expand_embeddings(cfg, params, n_base + len(rows), rows, pad_multiple=pad_multiple,
                                          base_vocab_size=n_base)
  checkpoint.save_params(out_dir, new_cfg, new_params, step=0)
  return new_cfg
