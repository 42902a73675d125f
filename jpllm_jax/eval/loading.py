"""Finds what an evaluation needs from a training workdir (any step) or an imported Hugging Face directory:
the model config, the params and the SentencePiece tokenizer, with a description for the results file."""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jpllm_jax import checkpoint, hf
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.tokenizer import load_tokenizer


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  """`<workdir>/checkpoints` of a training run, or `workdir` itself when it is a `save_params` directory."""
  workdir = pathlib.Path(workdir).absolute()
  ckpt = workdir / "checkpoints"
  if (ckpt / checkpoint.CONFIG_FILE).exists():
    return ckpt
  if (workdir / checkpoint.CONFIG_FILE).exists():
    return workdir
  raise FileNotFoundError(f"{workdir} holds no checkpoints ({checkpoint.CONFIG_FILE} not found in it or in "
                          "its checkpoints/ folder)")


def checkpoint_steps(workdir: str | pathlib.Path) -> list[int]:
  """Every saved step of a run, ascending."""
  return sorted(ocp.utils.checkpoint_steps(checkpoint_dir(workdir)))


WORKDIR_TOKENIZER = pathlib.Path("tokenizer") / "tokenizer.model"  # with the HF tokenizer files beside it.


def workdir_tokenizer(workdir: str | pathlib.Path) -> pathlib.Path:
  """The tokenizer a training run trained with: the copy every run keeps in <workdir>/tokenizer/, so evaluation
  and export never depend on an outside path. Older runs: their trained spm.model, else the file config.json
  names."""
  workdir = pathlib.Path(workdir)
  for kept in (workdir / WORKDIR_TOKENIZER, workdir / "tokenizer" / "spm.model"):
    if kept.exists():
      return kept
  config_file = workdir / "config.json"
  if config_file.exists():
    named = json.loads(config_file.read_text()).get("data", {}).get("tokenizer")
    if named:
      return pathlib.Path(named)
  raise FileNotFoundError(f"no tokenizer found for {workdir}: pass --tokenizer")


def hf_tokenizer(hf_dir: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(hf_dir) / "tokenizer.model"
  if not path.exists():
    raise FileNotFoundError(f"{hf_dir} has no SentencePiece tokenizer.model: pass --tokenizer")
  return path


def sha256(path: str | pathlib.Path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def load_model(*, workdir: str | None = None, hf_dir: str | None = None, step: int | None = None,
               tokenizer: str | None = None) -> tuple[ModelConfig, Any, Any, dict[str, Any]]:
  """(config, params, tokenizer, description) from exactly one of `workdir` and `hf_dir`."""
  if bool(workdir) == bool(hf_dir):
    raise ValueError("give exactly one of workdir and hf_dir")
  if workdir:
    directory = checkpoint_dir(workdir)
    step = checkpoint_steps(workdir)[-1] if step is None else step
    cfg, params = checkpoint.load_params(directory, step)
    tok_path = pathlib.Path(tokenizer) if tokenizer else workdir_tokenizer(workdir)
    source = {"source": "workdir", "path": str(pathlib.Path(workdir).absolute()), "step": step}
  else:
    cfg, params = hf.load_pretrained(hf_dir)
    tok_path = pathlib.Path(tokenizer) if tokenizer else hf_tokenizer(hf_dir)
    source = {"source": "hf", "path": str(pathlib.Path(hf_dir).absolute()), "step": None}
  sp = load_tokenizer(str(tok_path))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  info = {**source, "family": cfg.family, "n_params": n_params, "config": cfg.to_dict(),
          "tokenizer": {"path": str(tok_path.absolute()), "sha256": sha256(tok_path), "pieces": sp.get_piece_size()}}
  return cfg, params, sp, info

