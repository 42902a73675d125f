"""The parallel strategy the model is given: how to run the parts whose implementation depends on the devices.

The model never reads the mesh. Whoever lays out the computation (the train step, evaluation and generation,
through `jpllm_jax.parallel.axis_rules`) enters a `Strategy` with `use`, and the model asks `current()`:

  expert_ffn  the routed experts of a MoE layer, with `jpllm_jax.moe.moe_ffn`'s signature
              (x, expert_ids, gates, w_gate, w_up, w_down, *, capacity_factor, activation) -> (y, stats);
              None: `moe_ffn` itself, on one device (or as XLA partitions it).
  matmul      the FP8 policy of the dense projections (`jpllm_jax.models.fp8.Policy`, from the config's
              `numerics.matmul` by `fp8.policy`); None: einsums in the compute dtype.
  token_sum   x -> x summed over the devices that split the batch's tokens, for the MoE statistics (means over
              the batch, formed from summed parts): inside a shard_map manual over the batch axes (a pipeline
              stage), the psum over them; None: identity (one device, or XLA partitions the batch).
  probe       (name, x, axes) -> x, called by the model at every sub-layer boundary (`probe` below) with the
              activation and its logical axes; None: identity. `jpllm_jax.train.nonfinite` checks finiteness
              there (forward and backward) to locate the first non-finite value of a step.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Strategy:
  """What the model runs for its device-dependent parts; the defaults are the single-device ones."""

  expert_ffn: Callable | None = None
  matmul: Any = None  # fp8.Policy | None (fp8 imports this module)
  probe: Callable | None = None
  token_sum: Callable | None = None


_CURRENT: contextvars.ContextVar[Strategy] = contextvars.ContextVar("jpllm_strategy", default=Strategy())


@contextlib.contextmanager
def use(strategy: Strategy) -> Iterator[Strategy]:
  """Within this context, `current()` is `strategy`."""
  token = _CURRENT.set(strategy)
  try:
    yield strategy
  finally:
    _CURRENT.reset(token)


@contextlib.contextmanager
def update(**changes: Any) -> Iterator[Strategy]:
  """Within this context, `current()` is the current strategy with `changes` (e.g. `matmul=` a policy)."""
  with use(dataclasses.replace(current(), **changes)) as s:
    yield s


def current() -> Strategy:
  return _CURRENT.get()


def probe(name: str, x, axes: tuple[str | None, ...] | None = None):
  """`x` unchanged; in a checking run, also seen by the injected probe as sub-layer `name` (logical `axes`)."""
  fn = _CURRENT.get().probe
  return x if fn is None else fn(name, x, axes)


def token_sum(x):
  """`x` summed over the devices that split the tokens (the injected `token_sum`; identity without one)."""
  fn = _CURRENT.get().token_sum
  return x if fn is None else fn(x)
