"""`ModelConfig`: the one description of a decoder, shared by every family.

A config is frozen and hashable so that it can be a static argument of `jax.jit`. Families
(`llama.py`, `mistral.py`, `qwen2.py`, `gpt.py`, `mixtral.py`, `deepseek.py`) are presets and Hugging Face
mappings over it. Dense models leave the mixture-of-experts (`moe.py`), latent attention (`mla.py`) and
multi-token prediction fields at their defaults.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "gpt", "mixtral", "deepseek_v3")
NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # yarn: with latent attention only (DeepSeek-V3).
ATTENTIONS = ("gqa", "mla")  # grouped-query (multi-head when K = H) or DeepSeek's multi-head latent attention.
ROUTERS = ("softmax", "sigmoid")  # Mixtral's softmax top-k, DeepSeek-V3's sigmoid with group-limited top-k.
# Activation checkpointing of each layer: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_qkv_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder-only transformer, dense or mixture-of-experts."""

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
  # Attention. "mla" (DeepSeek-V2/V3, mla.py) uses the fields below instead of n_kv_heads / head_dim.
  attention: str = "gqa"
  q_lora_rank: int | None = None  # MLA query compression rank; None: a plain query projection.
  kv_lora_rank: int = 512  # MLA joint key/value latent (what the KV cache holds per token).
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64  # the decoupled RoPE part of q, and the RoPE key shared by all heads.
  v_head_dim: int = 128
  rope_interleave: bool = False  # DeepSeek checkpoints rotate adjacent pairs (2i, 2i + 1) of the RoPE dims.
  # Mixture of experts (moe.py); n_experts = 0: every layer has the dense MLP of width d_ff.
  n_experts: int = 0  # routed experts of each MoE layer.
  n_experts_per_tok: int = 2  # top-k.
  moe_d_ff: int | None = None  # width of one routed expert; None: d_ff.
  n_shared_experts: int = 0  # DeepSeek: a dense SwiGLU of width n_shared_experts * moe_d_ff in every MoE layer.
  first_k_dense: int = 0  # DeepSeek first_k_dense_replace: the first layers keep the dense MLP.
  router: str = "softmax"  # one of ROUTERS.
  n_group: int = 1  # sigmoid router: experts form n_group groups; tokens pick experts in topk_group groups.
  topk_group: int = 1
  norm_topk_prob: bool = True  # gates renormalised over the selected experts.
  routed_scaling_factor: float = 1.0  # multiplies the routed experts' gates (DeepSeek-V3: 2.5).
  # Auxiliary losses, returned (already multiplied by these) by `forward(..., return_aux=True)`: the Switch
  # load-balancing loss (softmax router) or DeepSeek-V3's sequence-wise balance loss (sigmoid router).
  moe_aux_loss_coef: float = 0.0
  router_z_loss_coef: float = 0.0  # ST-MoE router z-loss.
  capacity_factor: float | None = None  # expert capacity for the grouped-matmul op; None: no token dropped.
  # DeepSeek-V3 multi-token prediction: extra blocks that predict token t + 1 + k at depth k.
  mtp_depth: int = 0

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
    _check(self.rope_theta is None or self.rope_dim % 2 == 0,
           f"rotary embedding needs an even head_dim, got {self.rope_dim}")
    _check(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive")
    _check(self.rope_theta is not None or self.learned_positions,
           "the model has no positional information: set rope_theta or learned_positions")
    _check(self.attention in ATTENTIONS, f"attention={self.attention!r} not in {ATTENTIONS}")
    _check(self.router in ROUTERS, f"router={self.router!r} not in {ROUTERS}")
    if self.attention == "mla":
      _check(self.rope_theta is not None and not self.learned_positions,
             "attention='mla' needs rotary positions (rope_theta) and no learned position table")
      for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        _check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
      _check(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or None")
    _check(self.rope_type != "yarn" or self.attention == "mla", "rope_type='yarn' is supported with attention='mla'")
    _check(self.n_experts >= 0 and self.n_shared_experts >= 0 and self.mtp_depth >= 0,
           "n_experts, n_shared_experts and mtp_depth must be >= 0")
    if self.n_experts:
      e, k = self.n_experts, self.n_experts_per_tok
      _check(0 < k <= e, f"n_experts_per_tok={k} must be in [1, n_experts={e}]")
      _check(0 <= self.first_k_dense < self.n_layers,
             f"first_k_dense={self.first_k_dense} must leave at least one of n_layers={self.n_layers} MoE layers")
      _check(self.expert_d_ff > 0, f"moe_d_ff must be positive, got {self.moe_d_ff}")
      _check(e % self.n_group == 0 and 0 < self.topk_group <= self.n_group,
             f"n_experts={e} must split into n_group={self.n_group} groups, and 0 < topk_group <= n_group")
      if self.n_group > 1:
        _check(self.router == "sigmoid", "group-limited routing (n_group > 1) needs router='sigmoid'")
        _check(e // self.n_group >= 2, "group-limited routing scores groups by their top 2: >= 2 experts per group")
        _check(k <= self.topk_group * (e // self.n_group), f"top-{k} does not fit in {self.topk_group} groups")
      _check(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor must be positive or None")

  @property
  def num_heads_kv(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  @property
  def rope_dim(self) -> int:
    """Rotated dimensions per head: the whole head, or MLA's decoupled RoPE part."""
    return self.qk_rope_head_dim if self.attention == "mla" else self.dim_per_head

  @property
  def expert_d_ff(self) -> int:
    return self.d_ff if self.moe_d_ff is None else self.moe_d_ff

  @property
  def n_dense_layers(self) -> int:
    """Layers with the dense MLP (the `layers` stack); the rest are MoE layers (`layers_moe`)."""
    return self.first_k_dense if self.n_experts else self.n_layers

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  @property
  def n_routed_layers(self) -> int:
    """Layers with a router: the MoE layers, then the multi-token-prediction blocks of a MoE model (the rows of
    the "expert_load" statistics)."""
    return self.n_moe_layers + self.mtp_depth if self.n_experts else 0

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
