"""`ModelConfig`: the one description of a decoder, shared by every family.

A config is frozen and hashable so that it can be a static argument of `jax.jit`. It keeps the shape of the
network (widths, depth, norms, MLP, positions, embeddings, initialisation) and groups the rest:

  attention  AttentionConfig: heads, biases, the sliding window, and DeepSeek's latent attention (mla.py).
  moe        MoEConfig: routed and shared experts, the router, auxiliary losses (moe.py); n_experts = 0: dense.
  mtp        MTPConfig: DeepSeek-V3 multi-token prediction blocks.
  numerics   NumericsConfig: storage and compute dtypes, activation checkpointing, the matmul (FP8) policy.

Inside a group the fields keep their old flat names (`moe.n_experts`, `numerics.dtype`), except
`attention.kind` (flat `attention`) and `mtp.depth` (flat `mtp_depth`). `make(**flat)` maps flat names to
groups; `from_dict`, `replace` and the family presets (`llama.py`, `mistral.py`, ...) go through it, so saved
flat `model_config.json` files and `--config.model.dtype=...` flags keep working.
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
# The matmul policy of every dense projection (models/fp8.py): the compute dtype, or FP8 (E4M3) with per-tensor
# current scaling, per-tensor delayed scaling (an amax history per tensor, kept in the train state), or
# DeepSeek-V3's 1x128 / 128x128 blockwise scaling.
MATMULS = ("default", "fp8_tensorwise", "fp8_delayed", "fp8_blockwise")


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(f"ModelConfig: {message}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Self-attention: grouped-query ("gqa") or multi-head latent attention ("mla", DeepSeek-V2/V3, mla.py),
  which uses the latent fields below instead of n_kv_heads / head_dim."""

  kind: str = "gqa"  # one of ATTENTIONS.
  n_heads: int = 32
  n_kv_heads: int | None = None  # None: equal to n_heads (multi-head attention).
  head_dim: int | None = None  # None: d_model // n_heads.
  qkv_bias: bool = False  # Qwen2, GPT.
  out_bias: bool = False  # bias of the output projection (GPT).
  sliding_window: int | None = None  # Mistral: query i sees keys j with i - j < window.
  q_lora_rank: int | None = None  # MLA query compression rank; None: a plain query projection.
  kv_lora_rank: int = 512  # MLA joint key/value latent (what the KV cache holds per token).
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64  # the decoupled RoPE part of q, and the RoPE key shared by all heads.
  v_head_dim: int = 128
  rope_interleave: bool = False  # DeepSeek checkpoints rotate adjacent pairs (2i, 2i + 1) of the RoPE dims.

  def __post_init__(self):
    _check(self.kind in ATTENTIONS, f"attention={self.kind!r} not in {ATTENTIONS}")
    _check(self.n_heads > 0, f"n_heads must be positive, got {self.n_heads}")
    _check(self.num_heads_kv > 0 and self.n_heads % self.num_heads_kv == 0,
           f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    _check(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive")
    if self.kind == "mla":
      for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        _check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
      _check(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or None")

  @property
  def num_heads_kv(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-experts feed-forward layers (moe.py); n_experts = 0: every layer has the dense MLP."""

  n_experts: int = 0  # routed experts of each MoE layer.
  n_experts_per_tok: int = 2  # top-k.
  moe_d_ff: int | None = None  # width of one routed expert; None: the dense d_ff.
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

  def __post_init__(self):
    _check(self.router in ROUTERS, f"router={self.router!r} not in {ROUTERS}")
    _check(self.n_experts >= 0 and self.n_shared_experts >= 0, "n_experts and n_shared_experts must be >= 0")
    if not self.n_experts:
      return
    e, k = self.n_experts, self.n_experts_per_tok
    _check(0 < k <= e, f"n_experts_per_tok={k} must be in [1, n_experts={e}]")
    _check(self.first_k_dense >= 0, f"first_k_dense must be >= 0, got {self.first_k_dense}")
    _check(self.moe_d_ff is None or self.moe_d_ff > 0, f"moe_d_ff must be positive, got {self.moe_d_ff}")
    _check(e % self.n_group == 0 and 0 < self.topk_group <= self.n_group,
           f"n_experts={e} must split into n_group={self.n_group} groups, and 0 < topk_group <= n_group")
    if self.n_group > 1:
      _check(self.router == "sigmoid", "group-limited routing (n_group > 1) needs router='sigmoid'")
      _check(e // self.n_group >= 2, "group-limited routing scores groups by their top 2: >= 2 experts per group")
      _check(k <= self.topk_group * (e // self.n_group), f"top-{k} does not fit in {self.topk_group} groups")
    _check(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor must be positive or None")


@dataclasses.dataclass(frozen=True)
class MTPConfig:
  """DeepSeek-V3 multi-token prediction: `depth` extra blocks, block k predicting token t + 1 + k."""

  depth: int = 0

  def __post_init__(self):
    _check(self.depth >= 0, f"mtp_depth must be >= 0, got {self.depth}")


@dataclasses.dataclass(frozen=True)
class NumericsConfig:
  """Parameters are stored in `param_dtype`, matmuls run in `dtype`, norms and softmax in float32."""

  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"  # one of REMAT_POLICIES; gradients are identical, memory and time differ.
  matmul: str = "default"  # one of MATMULS: the policy of the dense projections (models/fp8.py).
  # Comma-separated projection names kept in the compute dtype under an FP8 policy (DeepSeek-V3 and Transformer
  # Engine keep the embedding, output head and router in higher precision); names in models/fp8.py NAMES.
  fp8_exclude: str = "embed,lm_head,router"
  fp8_from_step: int = 0  # > 0: steps before it train in the compute dtype, the rest in FP8 (LLM-jp's hybrid run).
  # fp8_delayed: steps of amax history per tensor (the scale is the history's max / 448), Transformer Engine's and
  # flax's default length.
  fp8_amax_history: int = 1024

  def __post_init__(self):
    _check(self.remat in REMAT_POLICIES, f"remat={self.remat!r} not in {REMAT_POLICIES}")
    _check(self.matmul in MATMULS, f"matmul={self.matmul!r} not in {MATMULS}")
    _check(self.fp8_from_step >= 0, f"fp8_from_step must be >= 0, got {self.fp8_from_step}")
    _check(self.fp8_amax_history >= 1, f"fp8_amax_history must be >= 1, got {self.fp8_amax_history}")

  @property
  def fp8_excluded(self) -> frozenset[str]:
    return frozenset(n.strip() for n in self.fp8_exclude.split(",") if n.strip())


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder-only transformer, dense or mixture-of-experts."""

  family: str = "llama"
  vocab_size: int = 32000
  d_model: int = 4096
  n_layers: int = 32
  d_ff: int = 11008
  max_seq_len: int = 4096
  # Blocks.
  norm: str = "rms"  # "rms" (Llama) or "layer" (GPT).
  norm_eps: float = 1e-5
  mlp: str = "swiglu"  # "swiglu" (gate * up) or "gelu" (a two-matrix MLP with `activation`).
  activation: str = "silu"
  mlp_bias: bool = False  # GPT.
  # Positions.
  rope_theta: float | None = 10000.0  # None: no rotary embedding.
  rope_type: str = "default"
  # Extra RoPE scaling parameters as a sorted tuple of (name, value): hashable for jit.
  rope_scaling: tuple[tuple[str, float], ...] = ()
  learned_positions: bool = False  # GPT's absolute position table of `max_seq_len` rows.
  # Embeddings and head.
  tie_embeddings: bool = False
  scale_embedding: bool = False  # LLM-jp / "Spike No More": multiply embeddings by sqrt(d_model).
  # Initialisation (Megatron / LLM-jp): normal(init_std); output projections divided by sqrt(2 * n_layers).
  init_std: float = 0.02
  scaled_out_init: bool = True
  # Groups.
  attention: AttentionConfig = AttentionConfig()
  moe: MoEConfig = MoEConfig()
  mtp: MTPConfig = MTPConfig()
  numerics: NumericsConfig = NumericsConfig()

  def __post_init__(self):
    for name, cls in GROUPS.items():
      _check(isinstance(getattr(self, name), cls), f"{name} must be a {cls.__name__}: build configs with make()")
    _check(self.family in FAMILIES, f"family={self.family!r} not in {FAMILIES}")
    _check(self.norm in NORMS, f"norm={self.norm!r} not in {NORMS}")
    _check(self.mlp in MLPS, f"mlp={self.mlp!r} not in {MLPS}")
    _check(self.activation in ACTIVATIONS, f"activation={self.activation!r} not in {ACTIVATIONS}")
    _check(self.rope_type in ROPE_TYPES, f"rope_type={self.rope_type!r} not in {ROPE_TYPES}")
    for name in ("vocab_size", "d_model", "n_layers", "d_ff", "max_seq_len"):
      _check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
    a = self.attention
    _check(a.head_dim is not None or self.d_model % a.n_heads == 0,
           f"d_model={self.d_model} is not divisible by n_heads={a.n_heads}: set head_dim")
    _check(self.rope_theta is None or self.rope_dim % 2 == 0,
           f"rotary embedding needs an even head_dim, got {self.rope_dim}")
    _check(self.rope_theta is not None or self.learned_positions,
           "the model has no positional information: set rope_theta or learned_positions")
    if a.kind == "mla":
      _check(self.rope_theta is not None and not self.learned_positions,
             "attention='mla' needs rotary positions (rope_theta) and no learned position table")
    _check(self.rope_type != "yarn" or a.kind == "mla", "rope_type='yarn' is supported with attention='mla'")
    if self.moe.n_experts:
      _check(self.moe.first_k_dense < self.n_layers, f"first_k_dense={self.moe.first_k_dense} must leave at "
             f"least one of n_layers={self.n_layers} MoE layers")

  @property
  def dim_per_head(self) -> int:
    return self.attention.head_dim if self.attention.head_dim is not None else self.d_model // self.attention.n_heads

  @property
  def rope_dim(self) -> int:
    """Rotated dimensions per head: the whole head, or MLA's decoupled RoPE part."""
    return self.attention.qk_rope_head_dim if self.attention.kind == "mla" else self.dim_per_head

  @property
  def expert_d_ff(self) -> int:
    return self.d_ff if self.moe.moe_d_ff is None else self.moe.moe_d_ff

  @property
  def n_dense_layers(self) -> int:
    """Layers with the dense MLP (the `layers` stack); the rest are MoE layers (`layers_moe`)."""
    return self.moe.first_k_dense if self.moe.n_experts else self.n_layers

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  @property
  def n_routed_layers(self) -> int:
    """Layers with a router: the MoE layers, then the multi-token-prediction blocks of a MoE model (the rows of
    the "expert_load" statistics)."""
    return self.n_moe_layers + self.mtp.depth if self.moe.n_experts else 0

  @property
  def rope_params(self) -> dict[str, float]:
    return dict(self.rope_scaling)

  def replace(self, **changes: Any) -> "ModelConfig":
    """A copy with `changes`: flat names (`n_group=1`, `dtype="bfloat16"`) or whole groups (`moe=MoEConfig()`)."""
    return make(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """The nested form: one dict per group."""
    d = dataclasses.asdict(self)
    d["rope_scaling"] = dict(self.rope_scaling)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """Reads `to_dict`'s nested form, the flat form of older runs, or a mix."""
    return make(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls.from_dict(json.loads(text))


GROUPS: dict[str, type] = {"attention": AttentionConfig, "moe": MoEConfig, "mtp": MTPConfig,
                           "numerics": NumericsConfig}
# Flat name -> (group, field) for every grouped field; the names differ only for `attention` and `mtp_depth`.
FLAT: dict[str, tuple[str, str]] = {
    **{f.name: (g, f.name) for g, cls in GROUPS.items() for f in dataclasses.fields(cls)},
    "attention": ("attention", "kind"), "mtp_depth": ("mtp", "depth")}
del FLAT["kind"], FLAT["depth"]
_CORE = frozenset(f.name for f in dataclasses.fields(ModelConfig)) - set(GROUPS)
KEYS = _CORE | set(FLAT) | set(GROUPS)  # every key `make` and `from_dict` accept.


def make(base: ModelConfig | None = None, **changes: Any) -> ModelConfig:
  """`base` (default: `ModelConfig()`) with `changes`, each a core field, a flat name of a grouped field
  (see FLAT), or a whole group (a group dataclass or a dict of its fields, flat names of that group allowed).

  Whole groups are applied before single fields, so `make(moe={...}, n_group=1)` sets both.
  """
  base = ModelConfig() if base is None else base
  core: dict[str, Any] = {}
  groups: dict[str, dict[str, Any]] = {}
  fields: dict[str, dict[str, Any]] = {}
  for key, value in changes.items():
    if key in GROUPS and not isinstance(value, str):  # a whole group (flat `attention` is the kind, a str).
      groups[key] = _group_fields(key, value)
    elif key in FLAT:
      group, name = FLAT[key]
      fields.setdefault(group, {})[name] = value
    elif key in _CORE:
      core[key] = value
    else:
      _check(False, f"unknown ModelConfig field {key!r}")
  if "rope_scaling" in core:
    rs = core["rope_scaling"]
    core["rope_scaling"] = rope_scaling_tuple(rs) if isinstance(rs, dict) else tuple(tuple(kv) for kv in rs or ())
  for name in set(groups) | set(fields):
    start = GROUPS[name](**groups[name]) if name in groups else getattr(base, name)
    core[name] = dataclasses.replace(start, **fields.get(name, {}))
  return dataclasses.replace(base, **core)


def _group_fields(name: str, value: Any) -> dict[str, Any]:
  """The fields of group `name` given as its dataclass or a dict (inner names or flat names)."""
  if isinstance(value, GROUPS[name]):
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
  _check(isinstance(value, dict), f"{name} must be a {GROUPS[name].__name__} or a dict, got {type(value).__name__}")
  inner = {f.name for f in dataclasses.fields(GROUPS[name])}
  out = {}
  for key, v in value.items():
    field = key if key in inner else (FLAT[key][1] if FLAT.get(key, ("",))[0] == name else None)
    _check(field is not None, f"unknown {name} field {key!r}")
    out[field] = v
  return out


def rope_scaling_tuple(params: dict[str, Any] | None) -> tuple[tuple[str, float], ...]:
  """Turns a dict of RoPE scaling numbers into the sorted, hashable form the config stores."""
  return tuple(sorted((k, float(v)) for k, v in (params or {}).items()))
