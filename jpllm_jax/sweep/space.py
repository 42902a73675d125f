"""What a sweep runs: grid and random search spaces over config fields, run names, and the checks that a
typo in a field name stops the sweep before anything is launched.

Space syntax (fields separated by `;`): `optim.lr=1e-3,3e-3` (values), `log(lo,hi)`, `uniform(lo,hi)`,
`int(lo,hi)` (both ends included) and `choice(a,b)`. `--grid` takes values only; `--space` any of them.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import random
import re
from collections.abc import Mapping, Sequence

import ml_collections

DISTRIBUTIONS = ("log", "uniform", "int", "choice")


class SweepError(ValueError):
  """A malformed space or an unknown or mistyped config field; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One swept field: a list of values (text as given) or a distribution to sample from."""
  key: str
  kind: str  # "values" or one of DISTRIBUTIONS
  args: tuple[str, ...]

  def sample(self, rng: random.Random) -> str:
    """One value as the text passed on the command line (floats to 4 significant digits)."""
    if self.kind in ("values", "choice"):
      return rng.choice(self.args)
    lo, hi = (float(a) for a in self.args)
    if self.kind == "int":
      return str(rng.randint(int(lo), int(hi)))
    value = math.exp(rng.uniform(math.log(lo), math.log(hi))) if self.kind == "log" else rng.uniform(lo, hi)
    return f"{value:.4g}"


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its directory name and the overrides that make it differ from the others."""
  name: str
  overrides: dict[str, str]


def _split_fields(spec: str) -> list[tuple[str, str]]:
  fields = []
  for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
    key, eq, value = part.partition("=")
    if not eq or not key.strip() or not value.strip():
      raise SweepError(f"expected field=value, got {part!r}")
    fields.append((key.strip(), value.strip()))
  return fields


def parse_space(spec: str, *, grid: bool = False) -> list[Dimension]:
  """`"optim.eps=1e-8,1e-5;optim.lr=log(1e-4,1e-2)"` -> Dimensions; `grid` allows value lists only."""
  dims = []
  for key, text in _split_fields(spec):
    m = re.fullmatch(r"(\w+)\((.*)\)", text)
    if m and m.group(1) in DISTRIBUTIONS:
      kind, args = m.group(1), tuple(a.strip() for a in m.group(2).split(","))
      if grid and kind != "choice":
        raise SweepError(f"--grid takes value lists ({key}=a,b,c); sample {kind}(...) with --random=N --space")
      if kind != "choice":
        if len(args) != 2:
          raise SweepError(f"{key}: {kind}(lo,hi) takes two bounds, got {text!r}")
        try:
          lo, hi = float(args[0]), float(args[1])
        except ValueError:
          raise SweepError(f"{key}: {kind}(lo,hi) needs numbers, got {text!r}") from None
        if not lo <= hi or (kind == "log" and lo <= 0):
          raise SweepError(f"{key}: {kind}({args[0]},{args[1]}) needs {'0 < ' if kind == 'log' else ''}lo <= hi")
      if grid:
        kind = "values"
    elif m:
      raise SweepError(f"{key}: unknown distribution {m.group(1)}(...); use one of {', '.join(DISTRIBUTIONS)}")
    else:
      kind, args = "values", tuple(a.strip() for a in text.split(","))
    if not all(args):
      raise SweepError(f"{key}: empty value in {text!r}")
    if key in (d.key for d in dims):
      raise SweepError(f"{key} is given twice")
    dims.append(Dimension(key, kind, args))
  return dims


def parse_set(spec: str) -> dict[str, str]:
  """`"train.steps=100;data.seq_len=64"` -> {"train.steps": "100", ...}: overrides common to every run."""
  return dict(_split_fields(spec))


def _field(config: ml_collections.ConfigDict, key: str):
  """The config's value at dotted `key`; an unknown field raises with the closest known name."""
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=1)
      where = ".".join(parts[:i]) or "the config"
      hint = f"; did you mean {'.'.join(parts[:i] + close)}?" if close else f" (fields of {where}: {', '.join(known)})"
      raise SweepError(f"unknown field {key}{hint}")
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise SweepError(f"field {key} is a section; sweep its fields ({', '.join(node.keys())})")
  return node


def coerce(config: ml_collections.ConfigDict, key: str, text: str):
  """`text` as the type of the config field `key` (how `--config.<key>=<text>` is read), or a SweepError."""
  current = _field(config, key)
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise SweepError(f"field {key} is a bool, got {text!r}")
    return text.lower() in ("true", "1")
  if isinstance(current, (int, float, str)):
    try:
      value = type(current)(text)
    except ValueError:
      raise SweepError(f"field {key} is {type(current).__name__}, got {text!r}") from None
    if isinstance(current, int) and not isinstance(current, bool) and "." in text:
      raise SweepError(f"field {key} is int, got {text!r}")
    return value
  if current is None:
    return text
  raise SweepError(f"field {key} holds a {type(current).__name__}; sweep scalar fields only")


def check(config: ml_collections.ConfigDict, keys_values: Mapping[str, Sequence[str]]) -> None:
  """Every key exists in `config` and every listed value reads as the field's type."""
  for key, values in keys_values.items():
    _field(config, key)
    for text in values:
      coerce(config, key, text)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
  """The last part of each dotted key, or the whole key where two last parts collide."""
  last = [k.rpartition(".")[2] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def run_name(overrides: Mapping[str, str]) -> str:
  """`{"optim.eps": "1e-8", "optim.lr": "3e-3"}` -> `eps=1e-8_lr=3e-3` (file-name safe)."""
  short = _short_names(list(overrides))
  name = "_".join(f"{short[k]}={v}" for k, v in overrides.items()) or "base"
  return re.sub(r"[^A-Za-z0-9._=+-]", "-", name)


def plan(config: ml_collections.ConfigDict, *, grid: str = "", space: str = "", n_random: int = 0,
         seed: int = 0, seeds: int = 1, common: Mapping[str, str] | None = None) -> list[Run]:
  """The runs of a sweep: the grid's cartesian product, times `n_random` samples of `space` (drawn with
  `seed`), times `seeds` repeats (config field `seed` = the config's seed + 0..seeds-1). Every field is
  checked against `config` first."""
  grid_dims = parse_space(grid, grid=True)
  space_dims = parse_space(space)
  if space_dims and not n_random:
    raise SweepError("--space needs --random=N (the number of samples)")
  if n_random and not space_dims:
    raise SweepError("--random=N needs --space")
  keys = [d.key for d in grid_dims + space_dims]
  if len(set(keys)) != len(keys):
    raise SweepError(f"a field is in both --grid and --space: {sorted(k for k in keys if keys.count(k) > 1)}")
  check(config, {d.key: d.args if d.kind in ("values", "choice") else () for d in grid_dims + space_dims})
  check(config, {k: [v] for k, v in (common or {}).items()})
  if overlap := set(keys) & set(common or {}):
    raise SweepError(f"{sorted(overlap)} both swept and set")
  if seeds < 1:
    raise SweepError("--seeds must be at least 1")
  if seeds > 1:
    if "seed" in keys or "seed" in (common or {}):
      raise SweepError("--seeds sets the field seed; do not also sweep or set it")
    _field(config, "seed")
  rng = random.Random(seed)
  samples = [{d.key: d.sample(rng) for d in space_dims} for _ in range(n_random)] or [{}]
  for s in samples:
    for d in space_dims:
      coerce(config, d.key, s[d.key])
  runs, names = [], set()
  for point in itertools.product(*[[(d.key, v) for v in d.args] for d in grid_dims]):
    for sample in samples:
      for i in range(seeds):
        overrides = {**dict(point), **sample}
        if seeds > 1:
          overrides["seed"] = str(config.seed + i)
        name, n = run_name(overrides), 2
        while name in names:  # two random samples that round to the same values.
          name, n = f"{run_name(overrides)}-{n}", n + 1
        names.add(name)
        runs.append(Run(name, overrides))
  return runs
