"""Activation checkpointing changes what the backward pass keeps, never the gradients: every policy in
`REMAT_POLICIES` against remat="none", on a dense and a mixture-of-experts tiny model."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.extend import core as jcore

from jpllm_jax import models
from jpllm_jax.models import moe
from jpllm_jax.models.config import REMAT_POLICIES
from jpllm_jax.train.step import loss_and_grads

# Two layers each (the scanned stacks remat wraps): llama's GQA, whose q/k/v carry the "qkv_proj" names, and a
# DeepSeek-style MLA model with one dense and one MoE layer (sigmoid router, shared expert, balance loss).
MODELS = {
    "dense": models.preset("llama2-7b", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                           max_seq_len=32),
    "moe": models.preset("deepseek-v3", vocab_size=64, d_model=32, n_heads=4, d_ff=48, max_seq_len=32, n_layers=2,
                         q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                         moe_d_ff=8, first_k_dense=1, n_experts=8, n_group=2, topk_group=1, n_experts_per_tok=2,
                         mtp_depth=0, rope_type="default", rope_scaling=(), moe_aux_loss_coef=0.01),
}


def _batch(cfg, b=2, t=16):
  rng = np.random.default_rng(0)
  ids = lambda: rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
  return dict(inputs=ids(), targets=ids(), segment_ids=np.ones((b, t), np.int32),
              positions=np.arange(t)[None].repeat(b, 0).astype(np.int32), weights=np.ones((b, t), np.float32))


def _loss_and_grads(cfg):
  return lambda p, b: loss_and_grads(cfg, p, b, z_loss=1e-4, micro_batches=1)


def _dots(jaxpr) -> int:
  """dot_generals the program runs (scan bodies times their length): recomputation in the backward adds some."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "dot_general"
    for v in eqn.params.values():
      for x in v if isinstance(v, (tuple, list)) else (v,):
        x = x.jaxpr if isinstance(x, jcore.ClosedJaxpr) else x
        if isinstance(x, jcore.Jaxpr):
          n += _dots(x) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
  return n


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_remat_policy_gives_the_gradients_of_none(name):
  cfg = MODELS[name]
  params = models.init(cfg, jax.random.key(0))
  batch = _batch(cfg)
  # One program for all policies: one compile (about half the time of one per policy).
  out = jax.jit(lambda p, b: {r: _loss_and_grads(cfg.replace(remat=r))(p, b) for r in REMAT_POLICIES})(params, batch)
  want_m, want = out["none"]
  # Every parameter is exercised, but the router biases: they select experts and get no gradient.
  assert all(np.abs(np.asarray(g)).max() > 0 for path, g in jax.tree_util.tree_leaves_with_path(want)
             if not moe.is_router_bias(path))
  dots = {p: _dots(jax.make_jaxpr(_loss_and_grads(cfg.replace(remat=p)))(params, batch).jaxpr)
          for p in REMAT_POLICIES}
  # The policies are applied: "full" keeps nothing, so it recomputes the most matmuls; the others keep some.
  assert all(dots["full"] > dots[p] >= dots["none"] for p in REMAT_POLICIES if p not in ("none", "full")), dots
  for policy in REMAT_POLICIES[1:]:
    m, got = out[policy]
    # Exact: the recomputed forward runs the same ops on the same inputs (measured bit-identical on CPU).
    np.testing.assert_array_equal(np.asarray(m["loss"]), np.asarray(want_m["loss"]), err_msg=policy)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{policy} {jax.tree_util.keystr(path)}")
