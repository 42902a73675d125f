"""Training checkpoints: orbax CheckpointManager with async saves, keep-last-K and exact resume.

Each step folder holds three items, so that a training checkpoint is also a params checkpoint that
`jpllm_jax.checkpoint.load_params` (evaluation, conversion to Hugging Face) reads:

    <workdir>/checkpoints/model_config.json
    <workdir>/checkpoints/<step>/params        the parameters
    <workdir>/checkpoints/<step>/train_state   optimizer state, step, loss EMA
    <workdir>/checkpoints/<step>/data          the grain iterator state, one JSON file per process
    <workdir>/checkpoints/checksums/<step>.json  per-array checksums, shapes and dtypes taken at save time

Faults it survives: a corrupted or truncated latest step (checksums or a failed read) is renamed
`<step>.corrupt` with a warning and the previous good step restored; a save that fails is raised at once (at the
latest on the next step for an asynchronous one) as `CheckpointSaveError` naming the path and the cause.
"""
from __future__ import annotations

import atexit
import json
import os
import pathlib
import socket
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from jpllm_jax.checkpoint import CONFIG_FILE
from jpllm_jax.models.config import ModelConfig
from jpllm_jax.parallel.consistency import checksum


CHECKSUMS = "checksums"


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the message names the path and the cause."""


class CorruptCheckpoint(RuntimeError):
  """No checkpoint step could be restored; the message names each step tried and why it failed."""


@jax.jit
def _checksums(tree):
  """Two uint32 words per leaf over its raw bits (sum, position-weighted sum): sharding-independent and exact."""
  return jax.tree.map(checksum, tree)


def _manifest(tree) -> dict[str, dict[str, Any]]:
  sums = jax.device_get(_checksums(tree))
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): {"shape": list(x.shape), "dtype": str(x.dtype), "sum": [int(w) for w in c]}
          for (k, x), c in zip(leaves, jax.tree.leaves(sums))}


def _mismatches(expected: dict[str, dict[str, Any]], tree) -> list[str]:
  got = _manifest(tree)
  return sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))


def _check_layout(expected: dict[str, dict[str, Any]], abstract) -> None:
  """Fails, before anything is read or compiled, when the saved arrays' shapes or dtypes differ from the run's."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  want = {jax.tree_util.keystr(k): {"shape": list(x.shape), "dtype": str(x.dtype)} for k, x in leaves}
  have = {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in expected.items()}
  if want != have:
    bad = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    raise ValueError(f"the checkpoint holds a different model state: {len(bad)} arrays differ, e.g. {bad[0]} "
                     f"saved {have.get(bad[0], 'absent')}, this run {want.get(bad[0], 'absent')}")


class WorkdirLocked(RuntimeError):
  """Another live process trains in this workdir."""


class WorkdirLock:
  """`<workdir>/run.lock` holding {"pid", "host"} (process 0 only): a second run on the same workdir refuses
  instead of deleting the first one's in-flight saves; the lock of a dead process on this host is taken over."""

  def __init__(self, workdir: str | pathlib.Path):
    self.path = pathlib.Path(workdir) / "run.lock"
    self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
    if jax.process_index() != 0:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    while not self._create():
      holder = self._holder()
      if holder is not None and not self._stale(holder):
        raise WorkdirLocked(f"{self.path.parent} is in use by pid {holder['pid']} on {holder['host']} "
                            f"({self.path}); stop that run or use another workdir")
      logging.warning("taking over the stale lock %s of %s", self.path, holder or "an unreadable file")
      self.path.unlink(missing_ok=True)
    atexit.register(self.release)

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(self.owner) + "\n")
    return True

  def _holder(self) -> dict[str, Any] | None:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None

  def _stale(self, holder: dict[str, Any]) -> bool:
    if holder["host"] != self.owner["host"]:
      return False  # cannot tell whether a process on another host lives.
    if holder["pid"] == self.owner["pid"]:
      return True  # this process's own lock, left by an earlier run that raised.
    try:
      os.kill(holder["pid"], 0)
    except ProcessLookupError:
      return True
    except PermissionError:
      return False
    return False

  def release(self) -> None:
    if jax.process_index() == 0 and self._holder() == self.owner:
      self.path.unlink(missing_ok=True)


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
    # Step folders created in save() itself, so that an unwritable directory fails there and then (not 300 s
    # later in a background thread); the write itself stays asynchronous.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save, create=True,
        async_options=ocp.options.AsyncOptions(timeout_secs=600, create_directories_asynchronously=False))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("params", "train_state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict[str, Any], iterator, *, force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); returns whether a save started. Called every step,
    it also raises the failure of a previous asynchronous save."""
    self.check_for_errors()
    if not force and not self.manager.should_save(step):
      return False  # called every step: take no iterator snapshot unless saving.
    rest = {k: v for k, v in state.items() if k != "params"}
    args = ocp.args.Composite(params=ocp.args.PyTreeSave(state["params"]),
                              train_state=ocp.args.PyTreeSave(rest),
                              data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)))
    path = self.directory / str(step)
    try:
      if jax.process_index() == 0:  # the expected values, kept beside the step (ignored unless it completes).
        (self.directory / CHECKSUMS).mkdir(exist_ok=True)
        (self.directory / CHECKSUMS / f"{step}.json").write_text(json.dumps(_manifest(state)) + "\n")
      return self.manager.save(step, args=args, force=force)
    except Exception as e:
      raise CheckpointSaveError(f"saving checkpoint step {step} to {path} failed: {type(e).__name__}: {e}") from e

  def check_for_errors(self) -> None:
    """Raises `CheckpointSaveError` if an asynchronous save has failed."""
    try:
      self.manager.check_for_errors()
    except Exception as e:
      raise CheckpointSaveError(f"saving a checkpoint to {self.directory} failed: {type(e).__name__}: {e}") from e

  def restore(self, step: int, abstract_state: dict[str, Any], iterator) -> dict[str, Any]:
    """The state at `step` (or, if that step is corrupted or truncated, at the newest good earlier one, with a
    warning), placed with the shardings of `abstract_state`; `iterator` is moved in place (None: left alone)."""
    failures = []
    for s in [t for t in sorted(self.manager.all_steps(), reverse=True) if t <= step]:
      expected = self._expected(s)
      if expected is not None:
        _check_layout(expected, abstract_state)  # a different model: no fallback, a clear error.
      try:
        state = self._restore_step(s, abstract_state, iterator)
        bad = [] if expected is None else _mismatches(expected, state)
        if bad:
          raise ValueError(f"checksums differ in {len(bad)} arrays ({', '.join(bad[:3])})")
      except Exception as e:  # a truncated file, garbage bytes, a checksum: this step is unusable.
        failures.append(f"step {s} ({self.directory / str(s)}): {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        logging.warning("checkpoint %s is corrupted, trying the previous one: %s", self.directory / str(s),
                        failures[-1])
        self._set_aside(s)
        continue
      if failures:
        logging.warning("restored step %d instead of step %d", s, step)
      return state
    raise CorruptCheckpoint(f"no checkpoint in {self.directory} could be restored:\n  " + "\n  ".join(failures))

  def _expected(self, step: int) -> dict[str, Any] | None:
    path = self.directory / CHECKSUMS / f"{step}.json"
    if not path.exists():
      return None  # a checkpoint of an older version: restored unchecked.
    try:
      return json.loads(path.read_text())
    except ValueError:
      return None

  def _set_aside(self, step: int) -> None:
    """Renames a bad step folder `<step>.corrupt` (kept for inspection; orbax no longer lists it)."""
    if jax.process_index() == 0:
      src = self.directory / str(step)
      if src.exists():
        src.rename(src.with_name(f"{step}.corrupt"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"set aside {step}")
    self.manager.reload()

  def roll_back(self, step: int, abstract_state: dict[str, Any]) -> dict[str, Any] | None:
    """The state of the newest good checkpoint at or before `step` (None: there is none), without its data
    position: the iterator goes on past the batches since, so a rolled-back run skips them. Later checkpoints
    are deleted (the run recomputes those steps)."""
    self.manager.wait_until_finished()
    self.check_for_errors()
    for s in [t for t in self.manager.all_steps() if t > step]:
      self.manager.delete(s)
    self.manager.reload()
    if not [t for t in self.manager.all_steps() if t <= step]:
      return None
    return self.restore(step, abstract_state, None)

  def _restore_step(self, step: int, abstract_state: dict[str, Any], iterator) -> dict[str, Any]:
    for f in sorted((self.directory / str(step) / "data").glob("*.json")):
      try:
        json.loads(f.read_text())
      except ValueError as e:  # grain would raise a bare JSONDecodeError naming neither file nor step.
        raise ValueError(f"{f.relative_to(self.directory)} of step {step} is not valid JSON ({e})") from None

    def restore_args(tree):
      return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                         dtype=x.dtype), tree)

    rest = {k: v for k, v in abstract_state.items() if k != "params"}
    args = ocp.args.Composite(
        params=ocp.args.PyTreeRestore(abstract_state["params"], restore_args=restore_args(abstract_state["params"])),
        train_state=ocp.args.PyTreeRestore(rest, restore_args=restore_args(rest)),
        **({} if iterator is None else {"data": grain.checkpoint.CheckpointRestore(iterator)}))
    restored = self.manager.restore(step, args=args)
    return {"params": restored["params"], **restored["train_state"]}

  def close(self) -> None:
    """Waits for the last save; raises `CheckpointSaveError` if it failed."""
    try:
      self.manager.wait_until_finished()
      self.check_for_errors()
    finally:
      self.manager.close()
