"""Reading and writing Hugging Face safetensors checkpoints, one tensor at a time.

`load_pretrained` preallocates each of our stacked arrays once and fills its layer slices as the tensors
are read, so converting a 70B model needs one copy of the weights in memory, not two. `save_pretrained`
converts and writes one shard at a time. Both return / accept numpy (or jax) arrays in our nested layout.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util
from safetensors import safe_open

from jpllm_jax.hf import mapping
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.models.layers import ParamSpec
from jpllm_jax.models.transformer import param_shapes, param_specs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def load_pretrained(path: str | os.PathLike, dtype: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
  """(config, params) of a local HF checkpoint directory (config.json + safetensors, sharded or not).

  Supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel, MixtralForCausalLM and
  DeepseekV3ForCausalLM, with the multi-token-prediction modules the checkpoint stores (`config.mtp.depth`:
  those of the `num_nextn_predict_layers` present as layers `num_hidden_layers + k`; transformers saves none).
  `dtype` is the dtype of the returned numpy arrays and of `config.numerics.param_dtype` (the DeepSeek-V3 router stays
  float32); None keeps the checkpoint's.
  Raises ValueError naming the tensor for a missing, unexpected or wrongly shaped tensor.
  """
  path = pathlib.Path(path)
  hf_config = json.loads((path / "config.json").read_text())
  files = _safetensors_files(path)
  stored_dtypes = _stored_dtypes(files)
  dtype = jnp.dtype(dtype) if dtype is not None else _checkpoint_dtype(stored_dtypes, hf_config)
  cfg = mapping.config_from_hf(hf_config).replace(param_dtype=dtype.name)
  if cfg.mtp.depth:
    cfg = cfg.replace(mtp_depth=_stored_mtp_depth(cfg, stored_dtypes))
  shapes, fixed = _param_shapes(cfg), _fixed_dtypes(cfg)
  expected = mapping.tensor_table(cfg, shapes)
  flat = {p: np.empty(s, fixed.get(p, dtype)) for p, s in shapes.items()}
  seen = set()
  for file in files:
    with safe_open(file, framework="np") as f:
      for stored in f.keys():
        name = mapping.checkpoint_name(cfg, stored, expected)
        if name is None:
          continue
        if name not in expected:
          raise ValueError(f"unexpected tensor {stored!r} in {file.name} for {cfg.family} config")
        if name in seen:
          raise ValueError(f"tensor {stored!r} is stored twice")
        tensor = expected[name]
        got = tuple(f.get_slice(stored).get_shape())
        if got != tensor.hf_shape:
          raise ValueError(f"tensor {stored!r} has shape {got}, expected {tensor.hf_shape} for the config")
        seen.add(name)
        if tensor.copy:
          continue
        parts = mapping.to_ours(f.get_tensor(stored), tensor.row.layout, list(tensor.shapes))
        for target, part in zip(tensor.ours(flat), parts):
          target[...] = part  # Fills the preallocated (layer slice of the) array, cast to `dtype`.
  missing = [n for n, t in expected.items() if n not in seen and not t.copy]
  if missing:
    raise ValueError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all) in {path}")
  return cfg, traverse_util.unflatten_dict(flat, sep=".")


def save_pretrained(config: ModelConfig, params: dict[str, Any], path: str | os.PathLike, dtype: Any = None,
                    max_shard_size: int | str = "5GB", token_ids: dict[str, int] | None = None,
                    tokenizer: str | os.PathLike | None = None) -> None:
  """Writes an HF checkpoint directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  `dtype` is the stored dtype (None: `config.numerics.param_dtype`; the DeepSeek-V3 router is stored in float32, as
  transformers keeps it). Shards above `max_shard_size` (bytes, or a string like "5GB" / "500MiB") get an index
  json, as transformers writes them. Tied models have no `lm_head.weight`; DeepSeek-V3 multi-token-prediction
  modules (`params["mtp"]`) are written as layers `num_hidden_layers + k`, as DeepSeek publishes them. Raises
  ValueError for options HF cannot represent (`scale_embedding`, ...). `token_ids` (the tokenizer's
  `bos_token_id`, `eos_token_id`, `pad_token_id`) go into config.json and a generation_config.json.
  `tokenizer` (a SentencePiece .model) makes the directory complete: its special ids are the default `token_ids`,
  and tokenizer.model with the HF tokenizer files (`tokenizer.hf_model.write_tokenizer_files`) are written, so
  transformers, vLLM and lm-evaluation-harness load the directory as it is.
  """
  path = pathlib.Path(path)
  if tokenizer is not None:
    from jpllm_jax.tokenizer import load_tokenizer, special_token_ids
    sp = load_tokenizer(os.fspath(tokenizer))
    if sp.get_piece_size() > config.vocab_size:
      raise ValueError(f"the tokenizer {tokenizer} has {sp.get_piece_size()} pieces but the model only "
                       f"{config.vocab_size} rows: not the model's tokenizer")
    token_ids = special_token_ids(sp) if token_ids is None else token_ids
  dtype = jnp.dtype(config.numerics.param_dtype if dtype is None else dtype)
  hf_config = {**mapping.config_to_hf(config, dtype.name), **(token_ids or {})}
  flat = traverse_util.flatten_dict(params, sep=".")
  shapes = _param_shapes(config)
  for p, s in shapes.items():
    if p not in flat or tuple(flat[p].shape) != s:
      raise ValueError(f"parameter {p!r} has shape {getattr(flat.get(p), 'shape', None)}, expected {s}")
  if unexpected := sorted(set(flat) - set(shapes)):
    raise ValueError(f"unexpected parameters {unexpected} for the config")
  table = mapping.tensor_table(config, shapes)
  fixed = _fixed_dtypes(config)
  stored = {name: np.dtype(next((fixed[p] for p in t.paths if p in fixed), dtype)) for name, t in table.items()}
  nbytes = {name: math.prod(t.hf_shape) * stored[name].itemsize for name, t in table.items()}
  shards = _plan_shards(list(nbytes.items()), _parse_size(max_shard_size))
  path.mkdir(parents=True, exist_ok=True)
  for stale in path.iterdir():  # A previous save's shards would shadow or mix with these.
    if stale.name in (SINGLE_FILE, INDEX_FILE) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", stale.name):
      stale.unlink()
  weight_map = {}
  for k, names in enumerate(shards):
    file = SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for name in names:
      parts = [np.asarray(a, stored[name]) for a in table[name].ours(flat)]
      tensors[name] = mapping.to_hf(parts, table[name].row.layout)
      weight_map[name] = file
    safetensors.numpy.save_file(tensors, path / file, metadata={"format": "pt"})
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  if token_ids:
    (path / "generation_config.json").write_text(json.dumps(token_ids, indent=2, sort_keys=True) + "\n")
  if tokenizer is not None:
    from jpllm_jax.tokenizer.hf_model import write_tokenizer_files  # it imports this module.
    write_tokenizer_files(os.fspath(tokenizer), path)


def _stored_dtypes(files: list[pathlib.Path]) -> dict[str, str]:
  """Stored tensor name -> safetensors dtype ("F32", "BF16", ...), read from the files' headers."""
  stored = {}
  for file in files:
    with safe_open(file, framework="np") as f:
      stored.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
  return stored


def _stored_mtp_depth(cfg: ModelConfig, stored: dict[str, str]) -> int:
  """How many of the config's multi-token-prediction modules (layers n_layers, n_layers + 1, ...) the checkpoint
  holds: checkpoints saved by transformers declare them but store none."""
  layers = {mapping.layer_index(name) for name in stored}
  depth = 0
  while depth < cfg.mtp.depth and cfg.n_layers + depth in layers:
    depth += 1
  return depth


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  return traverse_util.flatten_dict(jax.tree.map(lambda s: s.shape, param_shapes(cfg)), sep=".")


def _fixed_dtypes(cfg: ModelConfig) -> dict[str, str]:
  """Parameters whose dtype the model fixes whatever `param_dtype` (the sigmoid router: float32)."""
  dtypes = jax.tree.map(lambda s: s.dtype or "", param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))
  return {p: d for p, d in traverse_util.flatten_dict(dtypes, sep=".").items() if d}


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
  if (path / INDEX_FILE).exists():
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    return [path / f for f in sorted(set(weight_map.values()))]
  if (path / SINGLE_FILE).exists():
    return [path / SINGLE_FILE]
  raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _checkpoint_dtype(stored: dict[str, str], hf_config: dict[str, Any]) -> np.dtype:
  """The stored dtype; for a checkpoint of mixed dtypes, the one config.json declares."""
  dtypes = set(stored.values())
  if len(dtypes) == 1 and next(iter(dtypes)) in SAFETENSORS_DTYPES:
    return jnp.dtype(SAFETENSORS_DTYPES[dtypes.pop()])
  declared = hf_config.get("dtype") or hf_config.get("torch_dtype")
  if declared is None:
    raise ValueError(f"checkpoint has tensors of dtypes {sorted(dtypes)} and config.json declares none: pass dtype")
  return jnp.dtype(declared)


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
  """Greedy shards in order; a tensor larger than `max_bytes` gets a shard of its own."""
  shards, current, used = [], [], 0
  for name, size in sizes:
    if current and used + size > max_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += size
  return shards + [current] if current else shards


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", size.upper())
  if not m:
    raise ValueError(f"max_shard_size={size!r}: use bytes or e.g. '5GB', '500MiB'")
  return int(float(m.group(1)) * _UNITS[m.group(2)])
