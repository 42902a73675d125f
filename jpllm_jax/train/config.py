"""The run config of `train.loop.train`: every field's default (defined here once), user configs merged onto
them (unknown fields fail with a suggestion), and the run's `config.json` in the workdir.

`model` holds `ModelConfig` fields; the ones a config leaves out take `ModelConfig`'s own defaults.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from jpllm_jax.models import config as model_config
from jpllm_jax.train.optimizer import RECIPE
from jpllm_jax.train.step import StepConfig

CONFIG_JSON = "config.json"


class ConfigError(ValueError):
  """A config field that does not exist or cannot hold the value given; the message is one line."""


def defaults() -> ml_collections.ConfigDict:
  """Every field the training loop reads, with its default."""
  step = StepConfig()
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict()  # ModelConfig fields; vocab_size 0: the tokenizer's, padded below.
  c.model_vocab_multiple = 128
  c.init_from_hf = ""  # continual pre-training: an HF directory whose architecture replaces `model`.
  # With init_from_hf: learn up to N Japanese pieces on its tokenizer and grow the embedding and head (0: off),
  # from `expand_vocab_from` (comma-separated JSONL files; empty: the data sources).
  c.expand_vocab = 0
  c.expand_vocab_from = ""
  c.export_hf = ""  # a directory: the final params as a complete HF model (weights, configs, tokenizer).
  c.data = ml_collections.ConfigDict(dict(
      sources="",  # comma-separated `path[=weight]` sources, mixed by weight.
      tokenizer="",  # a SentencePiece .model; empty: train one into <workdir>/tokenizer.
      tokenizer_vocab_size=8000, seq_len=256, val_fraction=0.05,
      shards=0,  # data shards (0: one per process); the same value gives the same batches on any host count.
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=200, batch_size=16, micro_batches=1, log_every=10, eval_every=25, eval_batches=4,
      checkpoint_every=50, keep_checkpoints=3, async_checkpoint=True,
      stop_after=0,  # > 0: leave the loop after this step (the schedule still spans `steps`), with a checkpoint.
      max_bad_steps=5, spike_factor=step.spike_factor,
      peak_tflops=0.0,  # the machine's peak (all devices); 0: no MFU in the logs, tokens/s and TFLOP/s only.
      consistency_every=0,  # > 0: every N steps check that replicated params and optimizer state still agree.
      # A non-finite step (the first of a launch is located: <workdir>/nonfinite_step<N>.json): skip it, stop,
      # or roll back to the last good checkpoint and go on past the batches since.
      on_nonfinite="skip",
      # With mesh.stage > 1: the schedule (gpipe, 1f1b, interleaved; "": 1f1b) of micro_batches micro-batches,
      # and the model chunks per device of the interleaved one.
      pipeline=step.pipeline, virtual_stages=step.virtual_stages,
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, warmup_steps=2000, **RECIPE, z_loss=step.z_loss, router_bias_rate=step.router_bias_rate,
      mtp_loss_coef=step.mtp_loss_coef))
  # Japanese task evaluation every `every` steps (0: off) on the first `limit` examples, logged as eval/<task>.
  c.eval = ml_collections.ConfigDict(dict(
      every=0, tasks="jcommonsenseqa,jmmlu", scoring="loglik", limit=50, shots=4, loglik_norm="char",
      batch_size=8, max_len=0, data_dir=""))
  # Axis sizes (-1: the devices left over) and `rules`: overrides of parallel.DEFAULT_RULES ("mlp=tensor,...").
  c.mesh = ml_collections.ConfigDict(dict(data=-1, stage=1, fsdp=1, expert=1, tensor=1, rules=""))
  return c


def _unknown(name: str, known) -> ConfigError:
  close = difflib.get_close_matches(name.rpartition(".")[2], list(known), n=1)
  hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(known))}"
  return ConfigError(f"unknown field {name}{hint}")


def _model_fields() -> set[str]:
  """The names a `model` section may set: ModelConfig's fields and the flat names of its groups."""
  return {f.name for f in dataclasses.fields(model_config.ModelConfig)} | set(getattr(model_config, "FLAT", ()))


def _merge(base: ml_collections.ConfigDict, user: Mapping[str, Any], prefix: str) -> None:
  for key, value in user.items():
    name = prefix + key
    if key not in base:
      raise _unknown(name, base.keys())
    if isinstance(base[key], ml_collections.ConfigDict) and name not in ("model", "mesh.rules"):
      if not isinstance(value, Mapping):
        raise ConfigError(f"field {name} is a section; set its fields ({', '.join(sorted(base[key]))})")
      _merge(base[key], value, name + ".")
      continue
    if name == "model":
      fields = _model_fields()
      for k in value:
        if k not in fields:
          raise _unknown(f"model.{k}", fields)
      base.model = ml_collections.ConfigDict(dict(value))
    elif name == "mesh.rules" and not isinstance(value, str):
      base.mesh.rules = ml_collections.ConfigDict(dict(value))  # a mapping of overrides.
    else:
      try:
        base[key] = value
      except TypeError as e:
        raise ConfigError(f"field {name}: {str(e).splitlines()[0]}") from None


def with_defaults(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`config` merged onto `defaults()`: a config written for an older version (fewer fields) still loads."""
  base = defaults()
  user = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  with base.unlocked():
    _merge(base, user, "")
  return base


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {prefix + k: v})
  return out


def write_run_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, step: int) -> list[str]:
  """Writes `<workdir>/config.json`; a different previous one is kept as `config.<step>.json` (`step`: the
  checkpoint it ran to) and the changed fields are logged and returned as "field: old -> new" lines."""
  path = workdir / CONFIG_JSON
  text = config.to_json_best_effort(indent=2) + "\n"
  changes = []
  if path.exists() and path.read_text() != text:
    old, new = _flat(json.loads(path.read_text())), _flat(json.loads(text))
    changes = [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]
    kept = workdir / f"config.{step}.json"
    path.replace(kept)
    logging.info("config changed since the last launch (previous kept as %s):\n  %s", kept.name,
                 "\n  ".join(changes) or "(formatting only)")
  path.write_text(text)
  return changes
