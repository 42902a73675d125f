"""The decoder's stacks of layers, described once as data.

A model's layers live in up to three stacks, each a pytree of [L, ...] arrays run by one `scan`:
- `layers`: the layers with the dense MLP (every layer of a dense model; DeepSeek's first `first_k_dense`);
- `layers_moe`: the mixture-of-experts layers after them;
- `mtp`: DeepSeek-V3's multi-token-prediction blocks (`params["mtp"]["block"]`), run after the main stack from the
  last hidden state, MoE layers in a MoE model.
`stacks(cfg)` lists the non-empty ones in order with where their weights are, which global layer index (Hugging
Face's `model.layers.{i}`) each starts at, whether they are routed, and their rows in the routed layers' statistics
("expert_load"). The parameter table, the forward and cached forward, the pipeline's stage layout, the routed-stack
updates, the non-finite locator and the Hugging Face tables all read this list.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jpllm_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Stack:
  name: str  # "layers" | "layers_moe" | "mtp"
  path: tuple[str, ...]  # the stacked weights' keys in the params: ("layers",) or ("mtp", "block")
  n: int  # layers in the stack
  first: int  # global index of its first layer (a checkpoint's `model.layers.{first}`)
  moe: bool  # MoE feed-forward (a router) rather than the dense MLP
  main: bool  # in the decoder's sequence; False: the MTP blocks, run from the main stack's output
  routed_row: int  # its first row in the routed layers' statistics ("expert_load"); -1 when not routed

  @property
  def key(self) -> str:
    """The dotted path ("mtp.block"), as the Hugging Face tables spell our parameters."""
    return ".".join(self.path)


# Every stack a parameter tree can hold, in order (name, path): the routed ones' statistics rows follow this order.
PATHS: tuple[tuple[str, tuple[str, ...]], ...] = (("layers", ("layers",)), ("layers_moe", ("layers_moe",)),
                                                  ("mtp", ("mtp", "block")))


def stacks(cfg: ModelConfig) -> tuple[Stack, ...]:
  """The config's non-empty stacks, in order."""
  is_moe = cfg.moe.n_experts > 0
  sizes = {"layers": (cfg.n_dense_layers, 0, False, True),
           "layers_moe": (cfg.n_moe_layers, cfg.n_dense_layers, True, True),
           "mtp": (cfg.mtp.depth, cfg.n_layers, is_moe, False)}
  out, row = [], 0
  for name, path in PATHS:
    n, first, moe, main = sizes[name]
    if n:
      out.append(Stack(name, path, n, first, moe, main, row if moe else -1))
      row += n if moe else 0
  return tuple(out)


def main_stacks(cfg: ModelConfig) -> tuple[Stack, ...]:
  """The stacks of the decoder's sequence (`layers`, then `layers_moe`): what a forward or a pipeline runs."""
  return tuple(s for s in stacks(cfg) if s.main)


def by_name(cfg: ModelConfig, name: str) -> Stack | None:
  return next((s for s in stacks(cfg) if s.name == name), None)


def get(params: dict[str, Any], stack: Stack) -> Any:
  """The stack's stacked weights in `params`."""
  for k in stack.path:
    params = params[k]
  return params


def put(tree: dict[str, Any], stack: Stack, value: Any) -> None:
  """Sets the stack's entry of a params-structured nested dict (in place)."""
  for k in stack.path[:-1]:
    tree = tree.setdefault(k, {})
  tree[stack.path[-1]] = value
