"""`python -m experiments.convert`: HF -> orbax -> HF gives back the same tensors."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import REPO
from fake_devices import run_bounded
from hf_helpers import safetensors_contents, save_hf_model


def _convert(*flags: str) -> None:
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  result = run_bounded([sys.executable, "-m", "experiments.convert", *flags], 300, cwd=REPO, env=env)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("variant,dtype", [("llama3", torch.bfloat16), ("gpt2", torch.float32)])
def test_hf_to_orbax_to_hf(variant, dtype, tmp_path):
  save_hf_model(variant, tmp_path / "hf", dtype)
  _convert(f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'ckpt'}")
  assert (tmp_path / "ckpt" / "model_config.json").exists()
  _convert(f"--ckpt_dir={tmp_path / 'ckpt'}", f"--hf_out={tmp_path / 'back'}", "--max_shard_size=40KB")
  assert (tmp_path / "back" / "model.safetensors.index.json").exists()
  assert safetensors_contents(tmp_path / "back") == safetensors_contents(tmp_path / "hf")


def test_convert_needs_one_direction(tmp_path):
  with pytest.raises(AssertionError, match="either --hf_dir"):
    _convert(f"--hf_dir={tmp_path}", f"--hf_out={tmp_path}")


def test_convert_refuses_a_tokenizer_larger_than_the_model(tmp_path):
  from jpllm_jax.tokenizer import mistral_v1_path
  save_hf_model("gpt2", tmp_path / "hf")
  _convert(f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'ckpt'}")
  with pytest.raises(AssertionError, match="32000 pieces but the model only 128 rows"):
    _convert(f"--ckpt_dir={tmp_path / 'ckpt'}", f"--hf_out={tmp_path / 'back'}", f"--tokenizer={mistral_v1_path()}")
