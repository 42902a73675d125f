"""Hugging Face <-> jpllm-jax: one config translation and one tensor table per family.

A table row is (HF tensor name, our parameter path(s), layout). `{i}` in a name is the layer index; such
rows fill one slice of our stacked `layers` arrays. A row whose parameter the config does not have (a
bias, the untied head) is simply not expected. Rows written for `layers.` serve every stack of
`models.stacks` (HF layer i is row i - first of the stack that holds it: `layers`, `layers_moe`, the MTP
blocks), rows written for `layers_moe.` only the routed stacks. `{e}` is the expert index: a checkpoint stores one tensor
per expert (transformers 5 fuses them in memory but saves them so), our `[L, E, ...]` arrays one slice each.
The layout says how the HF tensor is laid out:

  VECTOR          norms and biases: our array flattened ([H, E] bias <-> [H*E]).
  MATRIX          embeddings and GPT-2 `Conv1D` weights [in, out]: our first axis, the rest flattened.
  LINEAR          `torch.nn.Linear` weights [out, in]: the transpose of MATRIX.
  HEADS_MATRIX    GPT-2 `c_proj` [H*E, D]: our two leading axes (heads, head_dim) form the rows.
  HEADS_LINEAR    Llama `o_proj` [D, H*E]: the transpose of HEADS_MATRIX.

A row with several parameters is a fused HF tensor (GPT-2 `c_attn` = q|k|v), split along its output axis.
RoPE uses the HF rotate_half layout in both codebases, so q/k weights need no permutation; DeepSeek's
interleaved RoPE pairs (`rope_interleave`) are reproduced by the model (`layers.deinterleave`), so its weights
need none either.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from jpllm_jax.models import stacks
from jpllm_jax.models.config import ModelConfig, make, rope_scaling_tuple


@dataclasses.dataclass(frozen=True)
class Layout:
  lead: int  # our leading axes flattened into the HF rows (0: the HF tensor is a vector).
  transpose: bool  # HF stores [out, in] (torch.nn.Linear).


VECTOR = Layout(0, False)
MATRIX = Layout(1, False)
LINEAR = Layout(1, True)
HEADS_MATRIX = Layout(2, False)
HEADS_LINEAR = Layout(2, True)


@dataclasses.dataclass(frozen=True)
class Row:
  hf: str
  ours: tuple[str, ...]  # dotted paths into the params dict, e.g. "layers.attn.q.kernel".
  layout: Layout


def _rows(*rows: tuple[str, str | tuple[str, ...], Layout]) -> tuple[Row, ...]:
  return tuple(Row(hf, (ours,) if isinstance(ours, str) else ours, layout) for hf, ours, layout in rows)


# Llama, Mistral and Qwen2 share the tensor names; biases exist only when the config has them.
LLAMA_TABLE = _rows(
    ("model.embed_tokens.weight", "embed.embedding", MATRIX),
    ("model.layers.{i}.input_layernorm.weight", "layers.attn_norm.scale", VECTOR),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.attn.q.kernel", LINEAR),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.attn.q.bias", VECTOR),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.attn.k.kernel", LINEAR),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.attn.k.bias", VECTOR),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.attn.v.kernel", LINEAR),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.attn.v.bias", VECTOR),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.attn.o.kernel", HEADS_LINEAR),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers.attn.o.bias", VECTOR),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.mlp_norm.scale", VECTOR),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.mlp.gate.kernel", LINEAR),
    ("model.layers.{i}.mlp.gate_proj.bias", "layers.mlp.gate.bias", VECTOR),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.mlp.up.kernel", LINEAR),
    ("model.layers.{i}.mlp.up_proj.bias", "layers.mlp.up.bias", VECTOR),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.mlp.down.kernel", LINEAR),
    ("model.layers.{i}.mlp.down_proj.bias", "layers.mlp.down.bias", VECTOR),
    ("model.norm.weight", "final_norm.scale", VECTOR),
    ("lm_head.weight", "lm_head.kernel", LINEAR),
)

GPT2_TABLE = _rows(
    ("transformer.wte.weight", "embed.embedding", MATRIX),
    ("transformer.wpe.weight", "pos_embed.embedding", MATRIX),
    ("transformer.h.{i}.ln_1.weight", "layers.attn_norm.scale", VECTOR),
    ("transformer.h.{i}.ln_1.bias", "layers.attn_norm.bias", VECTOR),
    ("transformer.h.{i}.attn.c_attn.weight",
     ("layers.attn.q.kernel", "layers.attn.k.kernel", "layers.attn.v.kernel"), MATRIX),
    ("transformer.h.{i}.attn.c_attn.bias", ("layers.attn.q.bias", "layers.attn.k.bias", "layers.attn.v.bias"),
     VECTOR),
    ("transformer.h.{i}.attn.c_proj.weight", "layers.attn.o.kernel", HEADS_MATRIX),
    ("transformer.h.{i}.attn.c_proj.bias", "layers.attn.o.bias", VECTOR),
    ("transformer.h.{i}.ln_2.weight", "layers.mlp_norm.scale", VECTOR),
    ("transformer.h.{i}.ln_2.bias", "layers.mlp_norm.bias", VECTOR),
    ("transformer.h.{i}.mlp.c_fc.weight", "layers.mlp.up.kernel", MATRIX),
    ("transformer.h.{i}.mlp.c_fc.bias", "layers.mlp.up.bias", VECTOR),
    ("transformer.h.{i}.mlp.c_proj.weight", "layers.mlp.down.kernel", MATRIX),
    ("transformer.h.{i}.mlp.c_proj.bias", "layers.mlp.down.bias", VECTOR),
    ("transformer.ln_f.weight", "final_norm.scale", VECTOR),
    ("transformer.ln_f.bias", "final_norm.bias", VECTOR),
    ("lm_head.weight", "lm_head.kernel", LINEAR),
)


MIXTRAL_TABLE = LLAMA_TABLE + _rows(
    ("model.layers.{i}.block_sparse_moe.gate.weight", "layers_moe.router.kernel", LINEAR),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", "layers_moe.experts.gate", LINEAR),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", "layers_moe.experts.down", LINEAR),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", "layers_moe.experts.up", LINEAR),
)

# DeepSeek-V3: Llama's names (q_proj: MLA without q compression; no k/v projections or biases) plus the latent
# projections and the experts. MLA projections keep their fused HF form in our params (q_b/kv_b [rank, heads,
# nope|rope or nope|v], kv_a [D, latent|rope]) and are split in the model, so every row is a plain transpose.
DEEPSEEK_V3_TABLE = LLAMA_TABLE + _rows(
    ("model.layers.{i}.self_attn.q_a_proj.weight", "layers.attn.q_a.kernel", LINEAR),
    ("model.layers.{i}.self_attn.q_a_layernorm.weight", "layers.attn.q_norm.scale", VECTOR),
    ("model.layers.{i}.self_attn.q_b_proj.weight", "layers.attn.q_b.kernel", LINEAR),
    ("model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight", "layers.attn.kv_a.kernel", LINEAR),
    ("model.layers.{i}.self_attn.kv_a_layernorm.weight", "layers.attn.kv_norm.scale", VECTOR),
    ("model.layers.{i}.self_attn.kv_b_proj.weight", "layers.attn.kv_b.kernel", LINEAR),
    ("model.layers.{i}.mlp.gate.weight", "layers_moe.router.kernel", LINEAR),
    ("model.layers.{i}.mlp.gate.e_score_correction_bias", "layers_moe.router.bias", VECTOR),
    ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "layers_moe.experts.gate", LINEAR),
    ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "layers_moe.experts.up", LINEAR),
    ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", "layers_moe.experts.down", LINEAR),
    ("model.layers.{i}.mlp.shared_experts.gate_proj.weight", "layers_moe.shared.gate.kernel", LINEAR),
    ("model.layers.{i}.mlp.shared_experts.up_proj.weight", "layers_moe.shared.up.kernel", LINEAR),
    ("model.layers.{i}.mlp.shared_experts.down_proj.weight", "layers_moe.shared.down.kernel", LINEAR),
)

# DeepSeek-V3 multi-token prediction: module k is stored as layer `num_hidden_layers + k`, holding a decoder layer
# (the table's `{i}` rows, our `mtp.block` slice k) and these. Its embedding and output head are copies of the
# main model's (our model shares them): written on save, not read on load.
DEEPSEEK_V3_MTP_TABLE = _rows(
    ("model.layers.{i}.embed_tokens.weight", "embed.embedding", MATRIX),
    ("model.layers.{i}.enorm.weight", "mtp.enorm.scale", VECTOR),
    ("model.layers.{i}.hnorm.weight", "mtp.hnorm.scale", VECTOR),
    ("model.layers.{i}.eh_proj.weight", "mtp.proj.kernel", LINEAR),
    ("model.layers.{i}.shared_head.norm.weight", "mtp.norm.scale", VECTOR),
    ("model.layers.{i}.shared_head.head.weight", "lm_head.kernel", LINEAR),
)


@dataclasses.dataclass(frozen=True)
class Architecture:
  name: str  # HF `architectures` entry.
  family: str  # ours.
  model_type: str
  table: tuple[Row, ...]
  prefix: str  # of the base model's tensors, which base-model checkpoints (the original `gpt2`) omit.
  mtp_table: tuple[Row, ...] = ()  # the multi-token-prediction modules' own tensors (DeepSeek-V3).


ARCHITECTURES = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "llama", "llama", LLAMA_TABLE, "model."),
    Architecture("MistralForCausalLM", "mistral", "mistral", LLAMA_TABLE, "model."),
    Architecture("Qwen2ForCausalLM", "qwen2", "qwen2", LLAMA_TABLE, "model."),
    Architecture("GPT2LMHeadModel", "gpt", "gpt2", GPT2_TABLE, "transformer."),
    Architecture("MixtralForCausalLM", "mixtral", "mixtral", MIXTRAL_TABLE, "model."),
    Architecture("DeepseekV3ForCausalLM", "deepseek_v3", "deepseek_v3", DEEPSEEK_V3_TABLE, "model.",
                 DEEPSEEK_V3_MTP_TABLE),
)}
BY_FAMILY = {a.family: a for a in ARCHITECTURES.values()}

# Buffers some checkpoints carry that are not parameters: GPT-2's causal-mask buffers, old Llama inv_freq.
IGNORED_TENSORS = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq)$")

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
GPT2_ACTIVATIONS_BACK = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("factor", "original_max_position_embeddings")}
ROPE_OPTIONAL_KEYS = {"yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")}
MOE_FAMILIES = ("mixtral", "deepseek_v3")


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


# ------------------------------------------------------------------------------------------ layouts
def hf_shape(layout: Layout, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
  """Shape of the HF tensor holding our (per-layer) arrays of `shapes`."""
  cols = sum(math.prod(s[layout.lead:]) for s in shapes)
  shape = (math.prod(shapes[0][:layout.lead]), cols) if layout.lead else (cols,)
  return shape[::-1] if layout.transpose else shape


def to_ours(x: np.ndarray, layout: Layout, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
  """Splits and reshapes an HF tensor into our arrays of `shapes`."""
  x = x.T if layout.transpose else x
  splits = np.cumsum([math.prod(s[layout.lead:]) for s in shapes])[:-1]
  return [part.reshape(s) for part, s in zip(np.split(x, splits, axis=-1), shapes)]


def to_hf(arrays: list[np.ndarray], layout: Layout) -> np.ndarray:
  """The inverse of `to_ours`: a contiguous HF tensor."""
  flat = [a.reshape(math.prod(a.shape[:layout.lead]), -1) if layout.lead else a.reshape(-1) for a in arrays]
  x = np.concatenate(flat, axis=-1) if len(flat) > 1 else flat[0]
  return np.ascontiguousarray(x.T if layout.transpose else x)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor of a checkpoint: its table row, our parameter paths, the index of its slice of our
  stacked arrays ((): the whole array, (layer,) or (layer, expert)) and our per-slice shapes. A `copy` repeats
  a tensor stored elsewhere in the checkpoint (written, not read)."""
  row: Row
  paths: tuple[str, ...]
  index: tuple[int, ...]
  shapes: tuple[tuple[int, ...], ...]
  copy: bool = False

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return hf_shape(self.row.layout, list(self.shapes))

  def ours(self, flat: dict[str, Any]) -> list[Any]:
    """Our arrays (slices: views of the stacked numpy arrays) that this tensor holds."""
    return [flat[p][self.index] if self.index else flat[p] for p in self.paths]


def tensor_table(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
  """HF name -> `Tensor` for every tensor a checkpoint of `cfg` holds, in table order.

  `shapes` maps our dotted parameter paths to their shapes (`param_shapes`, flattened).
  """
  arch = BY_FAMILY[cfg.family]
  names = {}
  for row in arch.table:
    if "{i}" not in row.hf:
      if all(p in shapes for p in row.ours):
        names[row.hf] = Tensor(row, row.ours, (), tuple(shapes[p] for p in row.ours))
      continue
    for stack in stacks.stacks(cfg):
      first = stack.first
      paths = tuple(_in_stack(p, stack) for p in row.ours)
      if not all(p in shapes for p in paths):
        continue
      for i in range(stack.n):
        for e in range(cfg.moe.n_experts) if "{e}" in row.hf else [None]:
          index = (i,) if e is None else (i, e)
          names[row.hf.format(i=first + i, e=e)] = Tensor(row, paths, index,
                                                          tuple(shapes[p][len(index):] for p in paths))
  for k in range(cfg.mtp.depth):  # (after the blocks' rows: a module's tensors in the order of the others)
    for row in arch.mtp_table:
      if all(p in shapes for p in row.ours):
        copy = not row.ours[0].startswith("mtp.")
        index = () if copy else (k,)
        names[row.hf.format(i=cfg.n_layers + k)] = Tensor(row, row.ours, index,
                                                          tuple(shapes[p][len(index):] for p in row.ours), copy)
  return names


def _in_stack(path: str, stack: stacks.Stack) -> str | None:
  """The table's per-layer path (written for `layers.` or, for the MoE rows, `layers_moe.`) in `stack`: a
  `layers.` row's in every stack, a `layers_moe.` row's only in the routed ones (`layers_moe`, and the MTP blocks
  of a MoE model); None for a row that is not per-layer."""
  head, _, rest = path.partition(".")
  if head == "layers" or (head == "layers_moe" and stack.moe):
    return f"{stack.key}.{rest}"
  return None


def checkpoint_name(cfg: ModelConfig, name: str, expected: dict[str, Tensor]) -> str | None:
  """The table name of a stored tensor, or None for a buffer to skip (a tied model's stored head too, and
  DeepSeek-V3's multi-token-prediction layers `model.layers.{n_layers + k}` past the config's `mtp_depth`)."""
  prefix = BY_FAMILY[cfg.family].prefix
  if name not in expected and prefix + name in expected:
    name = prefix + name
  if name not in expected and (IGNORED_TENSORS.search(name) or (cfg.tie_embeddings and name == "lm_head.weight")):
    return None
  layer = layer_index(name)
  if cfg.family == "deepseek_v3" and layer is not None and layer >= cfg.n_layers + cfg.mtp.depth:
    return None
  return name


def layer_index(name: str) -> int | None:
  """The layer index of a stored `model.layers.{i}.` tensor (None for others)."""
  m = re.match(r"(?:model\.)?layers\.(\d+)\.", name)
  return int(m[1]) if m else None


# ------------------------------------------------------------------------------------------ configs
def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """Our `ModelConfig` for an HF config.json dict (`architectures`, else `model_type`, names the family);
  raises ValueError for what we cannot represent."""
  archs = hf.get("architectures") or [a.name for a in ARCHITECTURES.values() if a.model_type == hf.get("model_type")]
  _check(len(archs) == 1 and archs[0] in ARCHITECTURES, f"unsupported Hugging Face architecture "
         f"{archs or hf.get('model_type')}; supported: {sorted(ARCHITECTURES)}")
  family = ARCHITECTURES[archs[0]].family
  try:
    if family == "gpt":
      fields = _gpt2_from_hf(hf)
    elif family == "deepseek_v3":
      fields = _deepseek_v3_from_hf(hf)
    else:
      fields = _llama_from_hf(family, hf)
    return make(family=family, vocab_size=hf["vocab_size"], init_std=hf.get("initializer_range", 0.02), **fields)
  except KeyError as e:
    raise ValueError(f"{archs[0]} config.json has no {e.args[0]!r}") from None


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """The HF config.json dict of `cfg`, whose tensors are stored in `dtype`; raises ValueError for options
  HF cannot represent."""
  _check(not cfg.scale_embedding, "scale_embedding=True has no Hugging Face equivalent")
  arch = BY_FAMILY[cfg.family]
  hf = {"architectures": [arch.name], "model_type": arch.model_type, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "dtype": dtype, "torch_dtype": dtype}  # transformers >= 5 reads `dtype`, older versions `torch_dtype`.
  _check(cfg.family in MOE_FAMILIES or (cfg.moe.n_experts == 0 and cfg.attention.kind == "gqa" and cfg.mtp.depth == 0),
         f"{cfg.family} on Hugging Face has no experts, latent attention or multi-token prediction")
  if cfg.family == "gpt":
    hf.update(_gpt2_to_hf(cfg))
  elif cfg.family == "deepseek_v3":
    hf.update(_deepseek_v3_to_hf(cfg))
  else:
    hf.update(_llama_to_hf(cfg))
  return hf


def _llama_from_hf(family: str, hf: dict[str, Any]) -> dict[str, Any]:
  """Llama, Mistral, Qwen2 and Mixtral fields (Llama's `attention_bias` covers q, k, v and o; Qwen2 has q/k/v
  bias; Mixtral is Mistral with a softmax top-k MoE in every layer, `intermediate_size` being an expert's)."""
  _check(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r}: only silu is supported")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or d // heads
  attention_bias = family == "llama" and hf.get("attention_bias", False)
  rope_theta, rope_type, rope_scaling = _rope_from_hf(hf)
  return dict(
      d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
      n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=None if head_dim == d // heads else head_dim,
      d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"], norm="rms",
      norm_eps=hf["rms_norm_eps"], mlp="swiglu", activation="silu",
      qkv_bias=family == "qwen2" or attention_bias, out_bias=attention_bias,
      mlp_bias=family == "llama" and hf.get("mlp_bias", False),
      rope_theta=rope_theta, rope_type=rope_type, rope_scaling=rope_scaling,
      sliding_window=_sliding_window_from_hf(family, hf),
      tie_embeddings=hf.get("tie_word_embeddings", False),
      **(dict(n_experts=hf["num_local_experts"], n_experts_per_tok=hf["num_experts_per_tok"], router="softmax",
              moe_aux_loss_coef=hf.get("router_aux_loss_coef", 0.0)) if family == "mixtral" else {}))


def _llama_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  a = cfg.attention
  _check(cfg.norm == "rms" and cfg.mlp == "swiglu" and cfg.activation == "silu",
         f"{cfg.family} on Hugging Face needs norm=rms, mlp=swiglu, activation=silu")
  _check(cfg.rope_theta is not None and not cfg.learned_positions,
         f"{cfg.family} on Hugging Face needs rotary positions and no learned position table")
  biases = (a.qkv_bias, a.out_bias, cfg.mlp_bias)
  ok = {"llama": a.qkv_bias == a.out_bias,  # `attention_bias` covers q, k, v and o.
        "mistral": biases == (False, False, False), "mixtral": biases == (False, False, False),
        "qwen2": biases == (True, False, False)}[cfg.family]
  _check(ok, f"{cfg.family} on Hugging Face cannot have (qkv_bias, out_bias, mlp_bias)={biases}")
  _check(cfg.family != "llama" or a.sliding_window is None, "llama on Hugging Face has no sliding window")
  hf = {"hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.num_heads_kv, "head_dim": cfg.dim_per_head,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        **_rope_to_hf(cfg)}
  if cfg.family == "llama":
    hf.update(attention_bias=a.qkv_bias, mlp_bias=cfg.mlp_bias)
  elif cfg.family == "mistral":
    hf.update(sliding_window=a.sliding_window)
  elif cfg.family == "mixtral":
    _check(cfg.moe.router == "softmax" and cfg.moe.norm_topk_prob and cfg.moe.routed_scaling_factor == 1.0
           and cfg.moe.n_shared_experts == 0 and cfg.moe.first_k_dense == 0 and cfg.expert_d_ff == cfg.d_ff
           and a.kind == "gqa" and cfg.mtp.depth == 0 and cfg.moe.n_experts > 0,
           "Mixtral on Hugging Face has experts in every layer of width d_ff, a softmax router with renormalised "
           "top-k gates, no shared experts, grouped-query attention and no multi-token prediction")
    hf.update(sliding_window=a.sliding_window, num_local_experts=cfg.moe.n_experts,
              num_experts_per_tok=cfg.moe.n_experts_per_tok, router_aux_loss_coef=cfg.moe.moe_aux_loss_coef,
              output_router_logits=False)
  else:  # Qwen2 slides the window in layers >= max_window_layers.
    window = a.sliding_window is not None
    hf.update(use_sliding_window=window, sliding_window=a.sliding_window,
              max_window_layers=0 if window else cfg.n_layers)
  return hf


def _rope_from_hf(hf: dict[str, Any], yarn: bool = False) -> tuple[float, str, tuple[tuple[str, float], ...]]:
  """(theta, type, scaling) from transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling`.
  YaRN is accepted only where the model supports it (`yarn`: latent attention)."""
  params = {k: v for k, v in dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {}).items()
            if v is not None}  # transformers' own precedence; DeepSeek configs carry unset (None) YaRN keys.
  theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.pop("rope_type", params.pop("type", "default"))
  supported = sorted(t for t in ROPE_KEYS if yarn or t != "yarn")
  _check(rope_type in supported, f"unsupported rope_type {rope_type!r}; supported: {supported}")
  if rope_type == "llama3":
    params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
  _check(params.get("partial_rotary_factor", 1.0) == 1.0, "partial_rotary_factor is not supported")
  params.pop("partial_rotary_factor", None)
  optional = set(ROPE_OPTIONAL_KEYS.get(rope_type, ()))
  _check(set(ROPE_KEYS[rope_type]) <= set(params) <= set(ROPE_KEYS[rope_type]) | optional,
         f"rope_type {rope_type!r} expects parameters {sorted(ROPE_KEYS[rope_type])} (optional: "
         f"{sorted(optional)}), got {sorted(params)}")
  return float(theta), rope_type, rope_scaling_tuple(params)


def _sliding_window_from_hf(family: str, hf: dict[str, Any]) -> int | None:
  if family in ("mistral", "mixtral"):
    return hf.get("sliding_window")
  if family == "llama" or not hf.get("use_sliding_window", False):
    return None
  n_layers, first = hf["num_hidden_layers"], hf.get("max_window_layers", 28)  # Qwen2Config's default.
  layer_types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                          for i in range(n_layers)]
  _check(len(set(layer_types)) == 1,
         f"Qwen2 with a sliding window in only some layers (max_window_layers={first} < num_hidden_layers="
         f"{n_layers}) is not supported")
  return hf["sliding_window"] if layer_types[0] == "sliding_attention" else None


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """transformers 5 `rope_parameters`, plus `rope_theta` and `rope_scaling` for older versions."""
  rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta,
          **{k: int(v) if k == "original_max_position_embeddings" else v for k, v in cfg.rope_params.items()}}
  hf = {"rope_parameters": rope, "rope_theta": cfg.rope_theta}
  if cfg.rope_type != "default":
    hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
  return hf


def _deepseek_v3_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """DeepSeek-V3: MLA, the dense first `first_k_dense_replace` layers, sigmoid group-limited routing."""
  _check(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r}: only silu is supported")
  _check(not hf.get("attention_bias", False), "DeepSeek-V3 with attention_bias=True is not supported")
  heads = hf["num_attention_heads"]
  _check(hf.get("num_key_value_heads") in (None, heads),
         f"num_key_value_heads={hf.get('num_key_value_heads')} must equal num_attention_heads={heads} (MLA)")
  rope_theta, rope_type, rope_scaling = _rope_from_hf(hf, yarn=True)
  return dict(
      d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads, n_kv_heads=None,
      d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"], norm="rms",
      norm_eps=hf["rms_norm_eps"], mlp="swiglu", activation="silu", rope_theta=rope_theta, rope_type=rope_type,
      rope_scaling=rope_scaling, tie_embeddings=hf.get("tie_word_embeddings", False), attention="mla",
      q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
      qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
      rope_interleave=hf.get("rope_interleave", True), n_experts=hf["n_routed_experts"],
      n_experts_per_tok=hf["num_experts_per_tok"], moe_d_ff=hf["moe_intermediate_size"],
      n_shared_experts=hf.get("n_shared_experts") or 0, first_k_dense=hf.get("first_k_dense_replace") or 0,
      router="sigmoid", n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
      norm_topk_prob=hf.get("norm_topk_prob", True), routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
      moe_aux_loss_coef=hf.get("aux_loss_alpha", 0.0),  # DeepSeek's config.json name; transformers ignores it.
      mtp_depth=hf.get("num_nextn_predict_layers") or 0)  # (hf.load_pretrained: 0 if the checkpoint has none)


def _deepseek_v3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """Multi-token-prediction modules are written as DeepSeek publishes them (num_nextn_predict_layers, layers
  `num_hidden_layers + k`); transformers skips them on load and does not run them."""
  a, m = cfg.attention, cfg.moe
  _check(a.kind == "mla" and m.router == "sigmoid" and m.n_experts > 0 and cfg.norm == "rms"
         and cfg.mlp == "swiglu" and cfg.activation == "silu" and a.sliding_window is None
         and not (a.qkv_bias or a.out_bias or cfg.mlp_bias) and not cfg.learned_positions,
         "DeepSeek-V3 on Hugging Face needs attention=mla, a sigmoid router with experts, RMSNorm, SwiGLU (silu), "
         "rotary positions only, no sliding window and no biases")
  return {"hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "moe_intermediate_size": cfg.expert_d_ff,
          "num_hidden_layers": cfg.n_layers, "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_heads,
          "n_shared_experts": m.n_shared_experts, "n_routed_experts": m.n_experts,
          "routed_scaling_factor": m.routed_scaling_factor, "kv_lora_rank": a.kv_lora_rank,
          "q_lora_rank": a.q_lora_rank, "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim,
          "qk_nope_head_dim": a.qk_nope_head_dim, "n_group": m.n_group, "topk_group": m.topk_group,
          "num_experts_per_tok": m.n_experts_per_tok, "first_k_dense_replace": m.first_k_dense,
          "norm_topk_prob": m.norm_topk_prob, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
          "rms_norm_eps": cfg.norm_eps, "rope_interleave": a.rope_interleave, "attention_bias": False,
          "num_nextn_predict_layers": cfg.mtp.depth, "aux_loss_alpha": m.moe_aux_loss_coef, **_rope_to_hf(cfg)}


def _gpt2_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  for flag, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                     ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
    _check(hf.get(flag, want) == want, f"GPT-2 with {flag}={hf.get(flag)} is not supported")
  act = hf.get("activation_function", "gelu_new")
  _check(act in GPT2_ACTIVATIONS, f"unsupported GPT-2 activation_function {act!r}; supported: "
         f"{sorted(GPT2_ACTIVATIONS)}")
  d, heads = hf["n_embd"], hf["n_head"]
  return dict(d_model=d, n_layers=hf["n_layer"], n_heads=heads, n_kv_heads=heads, d_ff=hf.get("n_inner") or 4 * d,
              max_seq_len=hf["n_positions"], norm="layer", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
              mlp="gelu", activation=GPT2_ACTIVATIONS[act], qkv_bias=True, out_bias=True, mlp_bias=True,
              rope_theta=None, learned_positions=True, tie_embeddings=hf.get("tie_word_embeddings", True))


def _gpt2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  a = cfg.attention
  ok = (cfg.norm == "layer" and cfg.mlp == "gelu" and cfg.activation in GPT2_ACTIVATIONS_BACK
        and a.qkv_bias and a.out_bias and cfg.mlp_bias and cfg.rope_theta is None and cfg.learned_positions
        and a.sliding_window is None and a.num_heads_kv == a.n_heads and cfg.dim_per_head * a.n_heads
        == cfg.d_model)
  _check(ok, "GPT-2 on Hugging Face needs LayerNorm, a gelu/relu MLP, all biases, learned positions only, no "
         "sliding window, multi-head attention and head_dim = d_model / n_heads")
  return {"n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": a.n_heads, "n_inner": cfg.d_ff,
          "n_positions": cfg.max_seq_len, "activation_function": GPT2_ACTIVATIONS_BACK[cfg.activation],
          "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
          "reorder_and_upcast_attn": False}
