"""Orbax checkpoints of our params, with the `ModelConfig` next to them as JSON.

Layout of a checkpoint directory:

    model_config.json   ModelConfig.to_json()
    <step>/params/...   the params pytree (orbax PyTreeSave), one step folder per save

The training code extends this module with optimizer state; keep one helper per concept.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jpllm_jax.models.config import ModelConfig
from jpllm_jax.models.transformer import param_shapes

CONFIG_FILE = "model_config.json"


def _manager(directory: pathlib.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, item_names=("params",))


def save_params(directory: str | os.PathLike, config: ModelConfig, params: Any, step: int = 0) -> None:
  """Saves `params` (numpy or jax arrays) at `step` and writes the config; blocks until written."""
  directory = pathlib.Path(directory).absolute()  # Orbax needs an absolute path.
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(config.to_json() + "\n")
  with _manager(directory) as manager:
    manager.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params)))
    manager.wait_until_finished()


def load_config(directory: str | os.PathLike) -> ModelConfig:
  """The `ModelConfig` of a checkpoint directory, without reading the weights."""
  return ModelConfig.from_json((pathlib.Path(directory) / CONFIG_FILE).read_text())


def load_params(directory: str | os.PathLike, step: int | None = None) -> tuple[ModelConfig, Any]:
  """(config, params) saved by `save_params`; `step` None is the latest.

  Arrays come back as host numpy arrays in `config.numerics.param_dtype` (as `hf.load_pretrained` returns them), so
  a model larger than one accelerator still converts; `jax.device_put` them with the shardings you need.
  """
  directory = pathlib.Path(directory).absolute()
  config = load_config(directory)
  with _manager(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint steps in {directory}")
    restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype),
                                param_shapes(config))
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
        restore_args=restore_args)))
  return config, restored["params"]
