"""MoE in the training stack: auxiliary-loss-free balancing, the router bias outside the optimizer, the MTP loss,
active-parameter FLOPs, and a small DeepSeek-style model trained with `train()` on CPU."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import moe_tiny
from fake_devices import packed_batch
from jpllm_jax import models
from jpllm_jax.models import moe
from jpllm_jax.parallel import make_mesh
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.train import flops
from jpllm_jax.train.loop import train
from jpllm_jax.train.optimizer import make_optimizer
from jpllm_jax.train.step import StepConfig, init_state, loss_and_grads, make_train_step, state_shardings

TINY = models.preset("deepseek-v3", vocab_size=128, d_model=32, n_heads=4, d_ff=48, max_seq_len=64, n_layers=2,
                     q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                     moe_d_ff=8, first_k_dense=1, n_experts=16, n_group=4, topk_group=2, n_experts_per_tok=4,
                     mtp_depth=1, rope_type="default", rope_scaling=(), init_std=0.3)


def _batch(cfg):
  return packed_batch(np.random.default_rng(0), cfg.vocab_size, batch=4, length=16, pad=3)


def test_bias_updates_move_a_skewed_router_toward_uniform_load():
  cfg = TINY.replace(n_group=1, topk_group=1)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2048, cfg.d_model)), jnp.float32)
  kernel = rng.normal(size=(cfg.d_model, cfg.moe.n_experts)) * 0.1
  kernel[:, :3] += 0.5 * np.abs(rng.normal(size=(cfg.d_model, 1)))  # three experts favoured by most tokens
  kernel = jnp.asarray(kernel, jnp.float32)
  x = x + 0.5  # a shared direction: the favoured experts win for most tokens

  @jax.jit
  def load_and_gates(bias):
    ids, gates, _, _ = moe.route(cfg, {"kernel": kernel, "bias": bias}, x)
    load = jnp.bincount(ids.reshape(-1), length=cfg.moe.n_experts) / ids.size
    return load, gates

  bias = jnp.zeros(cfg.moe.n_experts, jnp.float32)
  load0, gates0 = load_and_gates(bias)
  recent = []
  for i in range(600):
    load, _ = load_and_gates(bias)
    bias = moe.update_router_bias(bias, load, 0.002)
    if i >= 500:
      recent.append(np.asarray(load))
  load1, gates1 = load_and_gates(bias)
  imbalance = lambda load: float(jnp.max(load) * cfg.moe.n_experts)  # 1 = uniform
  assert imbalance(load0) > 3.0 and imbalance(load1) < 1.5, (imbalance(load0), imbalance(load1))
  # Fixed +-gamma steps oscillate around balance; averaged over the last 100 updates every expert is near 1/E.
  mean_load = np.mean(recent, axis=0) * cfg.moe.n_experts
  assert mean_load.max() < 1.25 and mean_load.min() > 0.75, mean_load
  # The bias only selects: the gates stay normalised unbiased affinities times the scaling factor.
  np.testing.assert_allclose(np.asarray(gates1.sum(-1)), cfg.moe.routed_scaling_factor, rtol=1e-5)


def test_train_step_moves_router_bias_by_the_rule_not_the_optimizer():
  cfg = TINY
  tx, schedule = make_optimizer(1e-2, 1, 10)
  step_cfg = StepConfig(router_bias_rate=0.01, mtp_loss_coef=0.3)
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  # On the step's shardings: a state without them would make the second step trace and compile again.
  init = jax.jit(lambda key: init_state(cfg, tx, key), out_shardings=state_shardings(cfg, tx, mesh))
  state = init(jax.random.key(0))
  before = jax.tree.map(np.asarray, state["params"])
  batch = _batch(cfg)
  step = make_train_step(cfg, tx, schedule, step_cfg, mesh)
  state, metrics = step(state, batch)
  state, metrics = step(state, batch)  # lr > 0 from step 2
  assert step._cache_size() == 1
  load = np.asarray(metrics["expert_load"])  # rows: the MoE layer, then the MTP block
  assert cfg.n_routed_layers == cfg.n_moe_layers + 1 == 2
  assert load.shape == (cfg.n_routed_layers, cfg.moe.n_experts) and np.allclose(load.sum(-1), 1.0)
  for name, stack in (("MoE layers", lambda p: p["layers_moe"]), ("MTP block", lambda p: p["mtp"]["block"])):
    # Two rule steps of +-gamma (sign(mean - load), 0 where equal): every entry moved by a whole number of gammas.
    moved = (np.asarray(stack(state["params"])["router"]["bias"]) - stack(before)["router"]["bias"]) / 0.01
    assert np.allclose(moved, np.round(moved), atol=1e-4) and np.abs(moved).max() <= 2 + 1e-4, name
    assert np.abs(moved).max() > 0, name
    assert not np.allclose(np.asarray(stack(state["params"])["router"]["kernel"]), stack(before)["router"]["kernel"])
  for key in ("moe_loss", "mtp_loss", "moe_load_max", "moe_load_min", "router_bias_norm"):
    assert np.isfinite(float(metrics[key])), key
  assert float(metrics["moe_load_max"]) >= 1.0 >= float(metrics["moe_load_min"])


def test_router_biases_of_each_routed_stack_move_by_their_rows_of_the_load():
  e = 4
  params = {"layers_moe": {"router": {"kernel": np.zeros((2, 3, e)), "bias": np.zeros((2, e), np.float32)}},
            "mtp": {"block": {"router": {"kernel": np.zeros((1, 3, e)), "bias": np.ones((1, e), np.float32)}}}}
  load = np.array([[0.4, 0.2, 0.2, 0.2], [0.25] * 4, [0.1, 0.1, 0.1, 0.7]], np.float32)
  new = moe.update_router_biases(params, load, 0.5)
  np.testing.assert_allclose(new["layers_moe"]["router"]["bias"], [[-0.5, 0.5, 0.5, 0.5], [0.0] * 4])
  np.testing.assert_allclose(new["mtp"]["block"]["router"]["bias"], [[1.5, 1.5, 1.5, 0.5]])
  assert np.all(params["mtp"]["block"]["router"]["bias"] == 1.0)  # the input is not modified
  assert [b.shape for b in moe.router_biases(new)] == [(2, e), (1, e)]


def test_loss_adds_the_moe_and_mtp_terms():
  cfg = TINY.replace(moe_aux_loss_coef=0.01)
  params = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(1))
  batch = _batch(cfg)
  grads_fn = jax.jit(lambda p, b, micro: loss_and_grads(cfg, p, b, z_loss=1e-4, micro_batches=micro,
                                                       mtp_loss_coef=0.3), static_argnums=2)
  metrics_fn = lambda p, b, micro: grads_fn(p, b, micro)[0]
  m = metrics_fn(params, batch, 1)
  total = m["ce"] + 1e-4 * m["z_loss"] + m["moe_loss"] + 0.3 * m["mtp_loss"]
  np.testing.assert_allclose(float(m["loss"]), float(total), rtol=1e-6)
  assert float(m["mtp_loss"]) > 0 and float(m["moe_loss"]) > 0
  m2, g2 = grads_fn(params, batch, 2)
  # ce and z_loss are sums over the loss tokens: micro-batching only reorders the additions (measured 1.6e-7).
  for k in ("ce", "z_loss"):
    np.testing.assert_allclose(float(m2[k]), float(m[k]), rtol=1e-6)
  # The other terms are means within a micro-batch, then weighted by its loss tokens: the balance loss averages
  # its rows (DeepSeek-V3 eq. 17-20), the router z-loss and expert load count non-padding tokens (61 here, not
  # the 57 loss tokens), the MTP loss its own targets. So they differ from whole-batch means (measured: moe_loss
  # 2e-3, mtp_loss 5e-4, loss 1e-4). Exact is the accumulation: the loss-token-weighted mean of the halves.
  halves = [grads_fn(params, jax.tree.map(lambda x: x[i * 2:(i + 1) * 2], batch), 1) for i in range(2)]
  n = [float(h[0]["tokens"]) for h in halves]
  assert sum(n) == float(m2["tokens"]) == float(m["tokens"]) and n[0] != n[1]
  for k in ("loss", "ce", "z_loss", "moe_loss", "mtp_loss", "expert_load"):
    want = sum(np.asarray(h[0][k]) * w for h, w in zip(halves, n)) / sum(n)
    np.testing.assert_allclose(np.asarray(m2[k]), want, rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(float(m2["moe_dropped"]), sum(float(h[0]["moe_dropped"]) for h in halves))
  for got, g0, g1, full in zip(*map(jax.tree.leaves, (g2, halves[0][1], halves[1][1], grads_fn(params, batch, 1)[1]))):
    np.testing.assert_allclose(np.asarray(got), (np.asarray(g0) * n[0] + np.asarray(g1) * n[1]) / sum(n),
                               rtol=1e-5, atol=1e-6 * float(np.abs(full).max()))
  # The MTP targets: position i predicts token i + 2 within its document, against the plain logits' loss.
  fwd = jax.jit(lambda p, b: models.forward(cfg, p, b["inputs"], positions=b["positions"],
                                            segment_ids=b["segment_ids"], return_aux=True)[1]["mtp_logits"])
  mtp_logits = fwd(params, batch)
  lp = np.asarray(jax.nn.log_softmax(mtp_logits[0], axis=-1))
  t, seg, w = batch["targets"], batch["segment_ids"], batch["weights"]
  num = den = 0.0
  for b in range(t.shape[0]):
    for i in range(t.shape[1] - 1):
      if w[b, i] and w[b, i + 1] and seg[b, i] == seg[b, i + 1]:
        num -= float(lp[b, i, t[b, i + 1]])
        den += 1
  np.testing.assert_allclose(float(m["mtp_loss"]), num / den, rtol=1e-4)


def test_mtp_loss_trains_the_mtp_block_with_the_fused_head():
  """The fused head + loss (the default) differentiates the MTP loss like the materialised logits do: the MTP
  block gets gradients, and every gradient equals loss_chunk=0's."""
  cfg = TINY.replace(mtp_depth=1)
  params = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(1))
  grads = jax.jit(lambda p, b, chunk: loss_and_grads(cfg, p, b, z_loss=1e-4, micro_batches=1, loss_chunk=chunk,
                                                     mtp_loss_coef=0.3)[1], static_argnums=2)
  fused, full = grads(params, _batch(cfg), 16), grads(params, _batch(cfg), 0)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(fused["mtp"]["proj"]))
  for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(full)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6 * float(jnp.abs(want).max()))


def test_active_parameter_flops_match_the_published_counts():
  ds = models.preset("deepseek-v3")
  embed = ds.vocab_size * ds.d_model
  assert abs((flops.matmul_params(ds.replace(mtp_depth=0)) + embed) / 37e9 - 1) < 0.03  # "37B activated"
  mx = models.preset("mixtral-8x7b")
  assert abs((flops.matmul_params(mx) + mx.vocab_size * mx.d_model) / 12.9e9 - 1) < 0.02  # "12.9B active"
  dense = models.preset("llama2-7b")
  assert flops.train_flops_per_token(dense, 4096) == 6.0 * flops.matmul_params(dense) + 12.0 * 32 * 4096 * 4096


@pytest.mark.slow
def test_small_deepseek_style_model_trains_on_cpu(tmp_path):
  c = moe_tiny.get_config()
  c.data.tokenizer = mistral_v1_path()
  c.data.seq_len = 64
  c.model.update(d_model=64, n_experts=16, n_group=4, topk_group=2, n_experts_per_tok=4, moe_d_ff=32)
  c.train.update(steps=12, batch_size=4, log_every=1, eval_every=0, checkpoint_every=6, async_checkpoint=False,
                 peak_tflops=1.0)
  c.optim.update(warmup_steps=2, lr=3e-3, router_bias_rate=0.01)
  train(c, str(tmp_path))
  log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(log) == 12 and log[-1]["ce"] < log[0]["ce"] - 0.5
  assert all(len(r["expert_load"]) == 3 and len(r["expert_load"][0]) == 16 for r in log)  # 2 MoE layers, MTP
  assert log[-1]["router_bias_norm"] > 0 and log[-1]["mtp_loss"] > 0
  from jpllm_jax import checkpoint
  cfg, params = checkpoint.load_params(tmp_path / "checkpoints")
  assert cfg.family == "deepseek_v3" and "layers_moe" in params and "mtp" in params


def test_mesh_checks_name_the_expert_dimensions():
  from types import SimpleNamespace

  from jpllm_jax.parallel import check_model_fits_mesh
  shape = dict(data=1, stage=1, fsdp=1, expert=1, tensor=1)
  check_model_fits_mesh(TINY, SimpleNamespace(shape={**shape, "expert": 8, "tensor": 4}))
  with pytest.raises(ValueError, match="expert=16 is not divisible by mesh axes"):
    check_model_fits_mesh(TINY, SimpleNamespace(shape={**shape, "expert": 3}))
  with pytest.raises(ValueError, match="mlp=6 is not divisible"):  # moe_d_ff 6 over tensor 4
    check_model_fits_mesh(TINY.replace(moe_d_ff=6), SimpleNamespace(shape={**shape, "tensor": 4}))


def test_capacity_factor_drops_and_counts_assignments():
  cfg = TINY.replace(mtp_depth=0)
  params = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(2))
  batch = _batch(cfg)
  fwd = jax.jit(lambda c, p, b: models.forward(c, p, b["inputs"], positions=b["positions"],
                                              segment_ids=b["segment_ids"], return_aux=True), static_argnums=0)
  full, aux = fwd(cfg, params, batch)
  capped, aux_c = fwd(cfg.replace(capacity_factor=0.5), params, batch)
  assert int(aux["moe_dropped"]) == 0
  # 64 tokens x 4 slots over 16 experts at capacity ceil(0.5 x 256 / 16) = 8: at least half the slots are dropped.
  assert int(aux_c["moe_dropped"]) >= 128
  assert not np.allclose(np.asarray(full), np.asarray(capped))
  np.testing.assert_array_equal(np.asarray(aux["expert_load"]), np.asarray(aux_c["expert_load"]))  # before dropping
