"""Vocabulary expansion (Swallow's method): append Japanese BPE pieces to a SentencePiece base vocabulary.

`expand_vocabulary` trains a Japanese BPE model on a corpus and appends its pieces that contain a Japanese
character and are missing from the base, after every base piece, so every base id keeps its meaning (the base
embedding rows stay valid for continual pre-training). Appended pieces get scores below every base score, so
SentencePiece's BPE (which always applies the highest-scoring available merge) prefers base merges, and since
each appended piece contains a Japanese character, text without Japanese characters encodes exactly as before.

`export_hf` writes a Hugging Face `tokenizer.json` (built directly with the `tokenizers` library: a BPE model
with byte fallback whose merges are ranked by the merged piece's SentencePiece score) that encodes to the same
ids as SentencePiece, with BOS and EOS around each text as the training pipeline feeds a document. `report`
measures tokens per character, UTF-8 bytes per token and the byte-fallback share.
"""
from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from jpllm_jax.data.jsonl import STAT_KEYS, _paths
from jpllm_jax.tokenizer.train import corpus, corpus_texts, train_sentencepiece

_NORMAL = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
_BYTE = sentencepiece_model_pb2.ModelProto.SentencePiece.BYTE
_USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
_SENTINEL = -1e8  # scores at or below this are treated as "last resort" sentinels
_JAPANESE_RANGES = ((0x3000, 0x30FF), (0x3400, 0x9FFF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF))


def is_japanese_char(ch: str) -> bool:
  """Whether `ch` is in the CJK punctuation / kana / kanji / full-width ranges."""
  o = ord(ch)
  return any(lo <= o <= hi for lo, hi in _JAPANESE_RANGES)


def has_japanese(piece: str) -> bool:
  """Whether a piece contains at least one Japanese character."""
  return any(is_japanese_char(c) for c in piece)


def _load_proto(path: str) -> sentencepiece_model_pb2.ModelProto:
  m = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    m.ParseFromString(f.read())
  return m


def english_sample_texts() -> list[str]:
  """Deterministic English text that every Python install has (shared/ holds no English corpus): the Zen
  of Python and CPython's license, split into paragraphs. Used to check that expansion leaves English alone."""
  with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
    import this  # pylint: disable=import-outside-toplevel,unused-import
  text = codecs.decode(this.s, "rot13")
  license_path = os.path.join(os.path.dirname(os.__file__), "LICENSE.txt")
  if os.path.exists(license_path):
    with open(license_path, encoding="utf-8") as f:
      text += "\n\n" + f.read()
  return [p for p in text.split("\n\n") if p.strip()]


def _reachable(piece: str, vocab: set[str]) -> bool:
  """Whether BPE can build `piece`: every character is a piece and some split gives two pieces."""
  if len(piece) == 1:
    return True
  if any(c not in vocab for c in piece):
    return False
  return any(piece[:i] in vocab and piece[i:] in vocab for i in range(1, len(piece)))


def select_pieces(base: sentencepiece_model_pb2.ModelProto, learned: sentencepiece_model_pb2.ModelProto,
                  add: int) -> list[str]:
  """The learned pieces to append, in order: missing Japanese single characters first, then merges.

  A SentencePiece BPE model lists its merged pieces in merge order (scores 0, -1, ...) and its single
  characters last; the characters come first here so that a cap `add` never keeps a merge whose characters
  would be missing. Merged pieces are kept only when reachable (both halves of some split are in the vocab).
  Pieces containing the whitespace marker "▁" are skipped.
  """
  vocab = {p.piece for p in base.pieces}
  learned_normal = [p.piece for p in learned.pieces
                    if p.type == _NORMAL and has_japanese(p.piece) and "▁" not in p.piece]
  chars = [p for p in learned_normal if len(p) == 1 and p not in vocab]
  merges = [p for p in learned_normal if len(p) > 1 and p not in vocab]
  out: list[str] = []
  for piece in chars + merges:
    if len(out) >= add:
      break
    if piece in vocab or not _reachable(piece, vocab):
      continue
    vocab.add(piece)
    out.append(piece)
  return out


def expand_vocabulary(base_model: str, jsonl_paths: str | os.PathLike | Sequence[str | os.PathLike], add: int,
                      output_dir: str, *, learn_vocab_size: int | None = None, max_sentences: int = 2_000_000,
                      holdout: Callable[[str], bool] | None = None, character_coverage: float = 0.9995) -> str:
  """Appends up to `add` learned Japanese pieces to `base_model`; writes and returns `output_dir/tokenizer.model`.

  `learn_vocab_size` is the size of the Japanese BPE model trained on the texts (default `add + 1000`, which
  leaves room for the pieces the base already has); a size the corpus cannot give raises ValueError naming
  `--learn_vocab_size`. `holdout(text)` True excludes a document from learning. Skipped input lines are
  logged with file:line and counted (`corpus(jsonl_paths).stats`).
  """
  paths = _paths(jsonl_paths)
  os.makedirs(output_dir, exist_ok=True)
  size_name = "--learn_vocab_size" if learn_vocab_size else "--learn_vocab_size, default --add + 1000"
  learn_vocab_size = learn_vocab_size or add + 1000
  with tempfile.TemporaryDirectory() as tmp:
    if holdout is not None:
      learn_path = os.path.join(tmp, "learn.jsonl")
      with open(learn_path, "w", encoding="utf-8") as f:
        for text in corpus_texts(paths):
          if not holdout(text):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
      paths = [learn_path]
    learned_path = train_sentencepiece(paths, os.path.join(tmp, "learned"), learn_vocab_size, model_type="bpe",
                                       max_sentences=max_sentences, character_coverage=character_coverage,
                                       size_name=size_name)
    learned = _load_proto(learned_path)
  base = _load_proto(base_model)
  if base.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    raise ValueError(f"{base_model} is not a BPE model; only BPE bases are supported")
  base_pieces = [(p.piece, p.score, p.type) for p in base.pieces]
  new = sentencepiece_model_pb2.ModelProto()
  new.CopyFrom(base)
  # Below every mergeable base piece, except Mistral's whitespace runs ("▁", "▁▁", ... score -1e9): scores near
  # -1e9 are 64 apart in float32, so consecutive appended scores there would collapse. Appended pieces never
  # contain "▁" (see `select_pieces`), so they never compete with those whitespace merges.
  low = min(p.score for p in base.pieces if p.type in (_NORMAL, _USER_DEFINED) and p.score > _SENTINEL)
  for k, piece in enumerate(select_pieces(base, learned, add)):
    sp_piece = new.pieces.add()
    sp_piece.piece = piece
    sp_piece.score = low - 1.0 - k
    sp_piece.type = _NORMAL
  new.trainer_spec.vocab_size = len(new.pieces)
  assert [(p.piece, p.score, p.type) for p in new.pieces[:len(base_pieces)]] == base_pieces, "base ids changed"
  out = os.path.join(output_dir, "tokenizer.model")
  with open(out, "wb") as f:
    f.write(new.SerializeToString())
  return out


def _merges(proto: sentencepiece_model_pb2.ModelProto, vocab: dict[str, int]) -> list[tuple[str, str]]:
  """BPE merges ranked as SentencePiece applies them: by the merged piece's score (descending), then id."""
  ranked = []
  for i, p in enumerate(proto.pieces):
    if p.type not in (_NORMAL, _USER_DEFINED):
      continue
    s = p.piece
    for j in range(1, len(s)):
      left, right = s[:j], s[j:]
      if left in vocab and right in vocab:
        ranked.append((-p.score, i, vocab[left], vocab[right], left, right))
  ranked.sort()
  return [(r[4], r[5]) for r in ranked]


def build_hf_tokenizer(model_path: str):
  """A `tokenizers.Tokenizer` equivalent to the SentencePiece BPE model at `model_path` (no special tokens added)."""
  from tokenizers import Tokenizer, decoders, models, normalizers

  proto = _load_proto(model_path)
  if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    raise ValueError("export_hf supports SentencePiece BPE models only")
  if proto.normalizer_spec.name not in ("identity", "") or proto.normalizer_spec.remove_extra_whitespaces:
    raise ValueError("export_hf needs identity normalisation without remove_extra_whitespaces")
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  unk = proto.pieces[proto.trainer_spec.unk_id].piece
  bpe = models.BPE(vocab=vocab, merges=_merges(proto, vocab), unk_token=unk, fuse_unk=True,
                   byte_fallback=proto.trainer_spec.byte_fallback)
  tk = Tokenizer(bpe)
  steps = [normalizers.Prepend("▁")] if proto.normalizer_spec.add_dummy_prefix else []
  tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
  dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  if proto.normalizer_spec.add_dummy_prefix:
    dec.append(decoders.Strip(content=" ", left=1, right=0))
  tk.decoder = decoders.Sequence(dec)
  specials = [p.piece for p in proto.pieces if p.type in (sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL,
                                                          sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN)]
  tk.add_special_tokens(specials)
  return tk


def export_hf(model_path: str, output_dir: str, *, add_bos_token: bool = True, add_eos_token: bool = False) -> str:
  """Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`; returns `output_dir`.

  The defaults encode a document as training starts it: `encode(text)` is `[bos] + sp.encode(text)`, and the
  data pipeline (`jpllm_jax.data.pipeline`) feeds exactly that followed by the `[eos]` that ends the document;
  `encode(text, add_special_tokens=False)` is `sp.encode(text)`. EOS is not appended by default, as in the Llama
  and Mistral tokenizers: a prompt ending in `</s>` would tell the model that the document is over (generation,
  vLLM, lm-evaluation-harness contexts). `add_eos_token=True` gives the pipeline's whole document; the
  post-processor in tokenizer.json and the flags in tokenizer_config.json agree. Caveat: the HF tokenizer matches the control pieces (`<s>`,
  `</s>`, `<unk>`) as special tokens when they occur literally in text, which SentencePiece does not do; pass
  `split_special_tokens=True` to the HF tokenizer to encode them as text.
  """
  import transformers
  from tokenizers import processors

  proto = _load_proto(model_path)
  tk = build_hf_tokenizer(model_path)
  spec = proto.trainer_spec

  def piece(i: int, name: str, needed: bool) -> str | None:
    if needed and i < 0:
      raise ValueError(f"{model_path} has no {name} piece")
    return proto.pieces[i].piece if i >= 0 else None

  bos, eos = piece(spec.bos_id, "BOS", add_bos_token), piece(spec.eos_id, "EOS", add_eos_token)
  pad = piece(spec.pad_id, "PAD", False)
  single = " ".join([bos] * add_bos_token + ["$A"] + [eos] * add_eos_token)
  pair = single + " " + single.replace("$A", "$B")
  special = [(bos, spec.bos_id)] * add_bos_token + [(eos, spec.eos_id)] * add_eos_token
  tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad,
                                            unk_token=piece(spec.unk_id, "UNK", True),
                                            add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                                            clean_up_tokenization_spaces=False)
  os.makedirs(output_dir, exist_ok=True)
  hf.save_pretrained(output_dir)
  # Stated explicitly for every reader: transformers 4 names the class PreTrainedTokenizerFast (5 saves its new
  # name, TokenizersBackend) and reads add_bos_token / add_eos_token and special_tokens_map.json.
  config_path = os.path.join(output_dir, "tokenizer_config.json")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos_token, add_eos_token=add_eos_token)
  specials = {"bos_token": bos, "eos_token": eos, "unk_token": hf.unk_token, "pad_token": pad}
  for name, data in (("tokenizer_config.json", config),
                     ("special_tokens_map.json", {k: v for k, v in specials.items() if v is not None})):
    with open(os.path.join(output_dir, name), "w", encoding="utf-8") as f:
      json.dump(data, f, indent=2, ensure_ascii=False, sort_keys=True)
      f.write("\n")
  return output_dir


def report(model_path: str, jsonl_paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
           english_paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
           texts: Iterable[str] | None = None) -> dict:
  """Tokens per character, UTF-8 bytes per token and byte-fallback token share of the texts.

  Measures the `text` fields of `jsonl_paths` (and/or the given `texts`) under key "ja", and of
  `english_paths` under key "en" when given. Each part: {"docs", "chars", "tokens", "tokens_per_char",
  "bytes_per_token", "byte_fallback_share"}, and for files "lines" plus the skipped-line counts
  ("skipped_malformed", "skipped_empty", "skipped_non_utf8"; each skipped line is logged as file:line).
  """
  sp = spm.SentencePieceProcessor(model_file=model_path)
  is_byte = [sp.IsByte(i) for i in range(sp.GetPieceSize())]

  def measure(it: Iterable[str]) -> dict:
    docs = chars = nbytes = tokens = byte_tokens = 0
    for text in it:
      ids = sp.encode(text)
      docs += 1
      chars += len(text)
      nbytes += len(text.encode("utf-8"))
      tokens += len(ids)
      byte_tokens += sum(is_byte[i] for i in ids)
    return {"docs": docs, "chars": chars, "tokens": tokens, "tokens_per_char": tokens / max(chars, 1),
            "bytes_per_token": nbytes / max(tokens, 1), "byte_fallback_share": byte_tokens / max(tokens, 1)}

  def line_counts(paths) -> dict:
    stats = corpus(_paths(paths)).stats
    return {k: stats[k] for k in STAT_KEYS if k != "read"}

  out = {"tokenizer": model_path, "vocab_size": sp.GetPieceSize()}
  ja: list[Iterable[str]] = []
  if jsonl_paths is not None:
    ja.append(corpus_texts(_paths(jsonl_paths)))
  if texts is not None:
    ja.append(texts)
  if ja:
    out["ja"] = measure(t for it in ja for t in it)
    if jsonl_paths is not None:
      out["ja"].update(line_counts(jsonl_paths))
  if english_paths is not None:
    out["en"] = {**measure(corpus_texts(_paths(english_paths))), **line_counts(english_paths)}
  return out
