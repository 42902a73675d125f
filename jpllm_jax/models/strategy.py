"""The parallel strategy the model is given: how to run the parts whose implementation depends on the devices.

The model never reads the mesh. Whoever lays out the computation (the train step, evaluation and generation,
through `jpllm_jax.parallel.axis_rules`) enters a `Strategy` with `use`, and the model asks `current()`:

  expert_ffn  the routed experts of a MoE layer, with `jpllm_jax.moe.moe_ffn`'s signature
              (x, expert_ids, gates, w_gate, w_up, w_down, *, capacity_factor, activation) -> (y, stats);
              None: `moe_ffn` itself, on one device (or as XLA partitions it).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator


@dataclasses.dataclass(frozen=True)
class Strategy:
  """What the model runs for its device-dependent parts; the defaults are the single-device ones."""

  expert_ffn: Callable | None = None


_CURRENT: contextvars.ContextVar[Strategy] = contextvars.ContextVar("jpllm_strategy", default=Strategy())


@contextlib.contextmanager
def use(strategy: Strategy) -> Iterator[Strategy]:
  """Within this context, `current()` is `strategy`."""
  token = _CURRENT.set(strategy)
  try:
    yield strategy
  finally:
    _CURRENT.reset(token)


def current() -> Strategy:
  return _CURRENT.get()
