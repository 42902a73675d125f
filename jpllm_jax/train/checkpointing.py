"""Training checkpoints: orbax CheckpointManager with async saves, keep-last-K and exact resume.

Each step folder holds three items, so that a training checkpoint is also a params checkpoint that
`jpllm_jax.checkpoint.load_params` (evaluation, conversion to Hugging Face) reads:

    <workdir>/checkpoints/model_config.json
    <workdir>/checkpoints/<step>/params        the parameters
    <workdir>/checkpoints/<step>/train_state   optimizer state, step, loss EMA
    <workdir>/checkpoints/<step>/data          the grain iterator state, one JSON file per process
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jpllm_jax.checkpoint import CONFIG_FILE
from jpllm_jax.models.config import ModelConfig


class _IteratorSnapshot:
  """The iterator state taken now, so that an async save cannot see a later position."""

  def __init__(self, iterator):
    self._state = json.dumps(iterator.get_state()).encode()

  def get_state(self) -> bytes:
    return self._state


def _check_same_model(directory: pathlib.Path, config: ModelConfig) -> None:
  """Fails, before anything is written, when `directory` holds checkpoints of a different model."""
  path = directory / CONFIG_FILE
  if not path.exists() or not ocp.utils.checkpoint_steps(directory):
    return
  saved = ModelConfig.from_json(path.read_text())
  if saved != config:
    old, new = saved.to_dict(), config.to_dict()
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    raise ValueError(f"{directory} holds checkpoints of a different model (changed: {', '.join(changed)}); "
                     "train it with its own config or use a new workdir")


class TrainCheckpointer:
  """Saves and restores the train state and the data iterator of a run."""

  def __init__(self, directory: str | pathlib.Path, config: ModelConfig, *, save_every: int, keep: int,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    _check_same_model(self.directory, config)
    if jax.process_index() == 0:
      self.directory.mkdir(parents=True, exist_ok=True)
      (self.directory / CONFIG_FILE).write_text(config.to_json() + "\n")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("params", "train_state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict[str, Any], iterator, *, force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); returns whether a save started."""
    if not force and not self.manager.should_save(step):
      return False  # called every step: take no iterator snapshot unless saving.
    rest = {k: v for k, v in state.items() if k != "params"}
    args = ocp.args.Composite(params=ocp.args.PyTreeSave(state["params"]),
                              train_state=ocp.args.PyTreeSave(rest),
                              data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: dict[str, Any], iterator) -> dict[str, Any]:
    """The state at `step`, placed with the shardings of `abstract_state`; `iterator` is moved in place."""
    def restore_args(tree):
      return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                         dtype=x.dtype), tree)

    rest = {k: v for k, v in abstract_state.items() if k != "params"}
    args = ocp.args.Composite(
        params=ocp.args.PyTreeRestore(abstract_state["params"], restore_args=restore_args(abstract_state["params"])),
        train_state=ocp.args.PyTreeRestore(rest, restore_args=restore_args(rest)),
        data=grain.checkpoint.CheckpointRestore(iterator))
    restored = self.manager.restore(step, args=args)
    return {"params": restored["params"], **restored["train_state"]}

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
