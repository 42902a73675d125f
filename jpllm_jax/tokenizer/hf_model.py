"""A Hugging Face model directory grown to an expanded tokenizer: weights, configs and tokenizer files.

`expand_hf_model` is the weights half of Swallow-style continual pre-training for users who want the steps
apart: the checkpoint's embedding and head grow to the new vocabulary (`jpllm_jax.models.vocab`: base rows
kept, new rows the mean of their base pieces, padded to a multiple of 128), and the output directory loads in
transformers (`AutoModelForCausalLM`, `AutoTokenizer`) and encodes what our training pipeline feeds the model.
"""
from __future__ import annotations

import os
import shutil

from jpllm_jax import hf
from jpllm_jax.models import vocab
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.tokenizer import load_tokenizer, special_token_ids
from jpllm_jax.tokenizer.expand import export_hf

TOKENIZER_MODEL = "tokenizer.model"


def base_tokenizer_of(hf_dir: str | os.PathLike) -> str:
  """The base model's own SentencePiece model, `hf_dir/tokenizer.model` (FileNotFoundError if it has none)."""
  path = os.path.join(hf_dir, TOKENIZER_MODEL)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{hf_dir} has no {TOKENIZER_MODEL}: pass the base model's SentencePiece tokenizer")
  return path


def write_tokenizer_files(model_path: str, output_dir: str | os.PathLike) -> None:
  """`tokenizer.model` (a copy of `model_path`) and the HF tokenizer files (`export_hf`) in `output_dir`."""
  os.makedirs(output_dir, exist_ok=True)
  target = os.path.join(output_dir, TOKENIZER_MODEL)
  if not os.path.exists(target) or not os.path.samefile(model_path, target):
    shutil.copyfile(model_path, target)
  export_hf(target, os.fspath(output_dir))


def expand_hf_model(hf_dir: str | os.PathLike, new_tokenizer: str, output_dir: str | os.PathLike, *,
                    base_tokenizer: str | None = None, pad_multiple: int = 128, dtype=None) -> ModelConfig:
  """Writes the model of `hf_dir` with its vocabulary grown to `new_tokenizer` to `output_dir`; returns its config.

  `base_tokenizer` (default: `hf_dir/tokenizer.model`) is the tokenizer the model was trained with;
  `new_tokenizer` must extend it (`vocab.expansion_rows`). The output holds safetensors weights, config.json
  (new vocabulary size and the tokenizer's special ids), generation_config.json, tokenizer.model,
  tokenizer.json, tokenizer_config.json and special_tokens_map.json. `dtype`: stored dtype (None: the
  checkpoint's).
  """
  base_tokenizer = base_tokenizer or base_tokenizer_of(hf_dir)
  n_base, rows = vocab.expansion_rows(base_tokenizer, new_tokenizer)
  cfg, params = hf.load_pretrained(hf_dir, dtype=dtype)
  if cfg.vocab_size < n_base:
    raise ValueError(f"{hf_dir} has vocab_size={cfg.vocab_size}, smaller than its tokenizer {base_tokenizer} "
                     f"({n_base} pieces): wrong base tokenizer?")
  new_cfg, new_params = vocab.expand_embeddings(cfg, params, n_base + len(rows), rows, pad_multiple=pad_multiple,
                                                base_vocab_size=n_base)
  hf.save_pretrained(new_cfg, new_params, output_dir, token_ids=special_token_ids(load_tokenizer(new_tokenizer)))
  write_tokenizer_files(new_tokenizer, output_dir)
  return new_cfg
