"""`ModelConfig`: the one description of a dense decoder, shared by every family.

A config is frozen and hashable so that it can be a static argument of `jax.jit`. Families
(`llama.py`, `mistral.py`, `qwen2.py`, `gpt.py`) are presets and Hugging Face mappings over it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "gpt")
NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3")
# Activation checkpointing of each layer: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_qkv_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a dense decoder-only transformer."""

  family: str = "llama"
  vocab_size: int = 32000
  d_model: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int | None = None  # None: equal to n_heads (multi-head attention).
  head_dim: int | None = None  # None: d_model // n_heads.
  d_ff: int = 11008
  max_seq_len: int = 4096
  # Blocks.
  norm: str = "rms"  # "rms" (Llama) or "layer" (GPT).
  norm_eps: float = 1e-5
  mlp: str = "swiglu"  # "swiglu" (gate * up) or "gelu" (a two-matrix MLP with `activation`).
  activation: str = "silu"
  qkv_bias: bool = False  # Qwen2, GPT.
  out_bias: bool = False  # bias of the attention output projection (GPT).
  mlp_bias: bool = False  # GPT.
  # Positions.
  rope_theta: float | None = 10000.0  # None: no rotary embedding.
  rope_type: str = "default"
  # Extra RoPE scaling parameters as a sorted tuple of (name, value): hashable for jit.
  rope_scaling: tuple[tuple[str, float], ...] = ()
  learned_positions: bool = False  # GPT's absolute position table of `max_seq_len` rows.
  sliding_window: int | None = None  # Mistral: query i sees keys j with i - j < window.
  # Embeddings and head.
  tie_embeddings: bool = False
  scale_embedding: bool = False  # LLM-jp / "Spike No More": multiply embeddings by sqrt(d_model).
  # Initialisation (Megatron / LLM-jp): normal(init_std); output projections divided by sqrt(2 * n_layers).
  init_std: float = 0.02
  scaled_out_init: bool = True
  # Numerics: parameters are stored in `param_dtype`, matmuls run in `dtype`, norms and softmax in float32.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"  # one of REMAT_POLICIES; gradients are identical, memory and time differ.

  def __post_init__(self):
    _check(self.family in FAMILIES, f"family={self.family!r} not in {FAMILIES}")
    _check(self.norm in NORMS, f"norm={self.norm!r} not in {NORMS}")
    _check(self.mlp in MLPS, f"mlp={self.mlp!r} not in {MLPS}")
    _check(self.activation in ACTIVATIONS, f"activation={self.activation!r} not in {ACTIVATIONS}")
    _check(self.remat in REMAT_POLICIES, f"remat={self.remat!r} not in {REMAT_POLICIES}")
    _check(self.rope_type in ROPE_TYPES, f"rope_type={self.rope_type!r} not in {ROPE_TYPES}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
      _check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
    _check(self.num_heads_kv > 0 and self.n_heads % self.num_heads_kv == 0,
           f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    _check(self.head_dim is not None or self.d_model % self.n_heads == 0,
           f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: set head_dim")
    _check(self.rope_theta is None or self.dim_per_head % 2 == 0,
           f"rotary embedding needs an even head_dim, got {self.dim_per_head}")
    _check(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive")
    _check(self.rope_theta is not None or self.learned_positions,
           "the model has no positional information: set rope_theta or learned_positions")

  @property
  def num_heads_kv(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  @property
  def rope_params(self) -> dict[str, float]:
    return dict(self.rope_scaling)

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = dict(self.rope_scaling)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    _check(not unknown, f"unknown ModelConfig fields: {unknown}")
    d = dict(d)
    if isinstance(d.get("rope_scaling"), dict):
      d["rope_scaling"] = rope_scaling_tuple(d["rope_scaling"])
    elif d.get("rope_scaling") is not None:
      d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls.from_dict(json.loads(text))


def rope_scaling_tuple(params: dict[str, Any] | None) -> tuple[tuple[str, float], ...]:
  """Turns a dict of RoPE scaling numbers into the sorted, hashable form the config stores."""
  return tuple(sorted((k, float(v)) for k, v in (params or {}).items()))


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(f"ModelConfig: {message}")
