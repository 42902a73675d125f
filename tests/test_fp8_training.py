"""FP8 training: the matmul policy reaches every projection (jaxpr of the train step), the routed experts' layouts,
the statistics, the BF16 -> FP8 switch at `fp8_from_step`, and delayed scaling's amax histories (the previous
step's amax, rolled in the train state, saturation on a jump, checkpointed)."""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jcore
import pytest

from jpllm_jax import models
from jpllm_jax.models import config as mc
from jpllm_jax.models import fp8, strategy
from jpllm_jax.moe import ops
from jpllm_jax.train import step as train_step_lib
from jpllm_jax.train.checkpointing import TrainCheckpointer
from kernels_pallas.fp8_gemm import fp8_matmul

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, E = 320, 6  # sizes no other dimension has: a dot with one of them is the head's or the router's
# DeepSeek-like: MLA, a dense first layer, MoE with shared experts, multi-token prediction.
DEEPSEEK = mc.make(family="deepseek_v3", vocab_size=V, d_model=64, n_layers=2, d_ff=96, n_heads=4, attention="mla",
                   q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                   n_experts=E, n_experts_per_tok=2, moe_d_ff=32, n_shared_experts=1, first_k_dense=1,
                   router="sigmoid", mtp_depth=1, max_seq_len=64)
LLAMA = mc.make(family="llama", vocab_size=V, d_model=64, n_layers=2, d_ff=96, n_heads=4, n_kv_heads=2,
                max_seq_len=64)


def _dots(jaxpr):
  """Every dot_general equation of a jaxpr and its sub-jaxprs (scan, cond, switch, custom VJP, pjit bodies), not
  inside Pallas kernels (the FP8 GEMM's own tiles; Mosaic's widen FP8 to bf16)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    if eqn.primitive.name == "pallas_call":
      continue
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(sub, jcore.ClosedJaxpr):
          yield from _dots(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          yield from _dots(sub)


def _is_f8(eqn) -> bool:
  return any(jnp.issubdtype(v.aval.dtype, jnp.floating) and jnp.finfo(v.aval.dtype).bits == 8 for v in eqn.invars)


def _step_jaxpr(cfg):
  tx = optax.adamw(1e-3)
  state = jax.eval_shape(lambda: train_step_lib.init_state(cfg, tx, jax.random.key(0)))
  b, t = 2, 32
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32) for k in train_step_lib.BATCH_KEYS}
  fn = functools.partial(train_step_lib.train_step, cfg=cfg, tx=tx, schedule=optax.constant_schedule(1e-3),
                         step_cfg=train_step_lib.StepConfig(loss_chunk=16))
  return jax.make_jaxpr(fn)(state, batch).jaxpr


@pytest.mark.parametrize("cfg", [pytest.param(DEEPSEEK.replace(matmul="fp8_blockwise"), marks=pytest.mark.slow),
                                 LLAMA.replace(matmul="fp8_tensorwise"), LLAMA.replace(matmul="fp8_delayed")],
                         ids=["deepseek-blockwise", "llama-tensorwise", "llama-delayed"])
def test_every_projection_of_the_train_step_is_fp8(cfg):
  """No dot of the FP8 train step bypasses the policy except the excluded head and router and the attention
  products (batched over heads, not projections); the default policy has no FP8 dot."""
  jaxpr = _step_jaxpr(cfg)
  dots = list(_dots(jaxpr))
  f8 = [e for e in dots if _is_f8(e)]
  assert len(f8) >= 3 * 7  # forward, dgrad and wgrad of every projection
  for eqn in dots:
    if _is_f8(eqn):
      continue
    (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    shapes = [v.aval.shape for v in eqn.invars]
    excluded = any(V in s or E in s for s in shapes)
    assert lhs_batch or excluded, f"a projection bypasses the FP8 policy: {shapes}"
  assert not any(_is_f8(e) for e in _dots(_step_jaxpr(cfg.replace(matmul="default"))))


def test_exclusion_names_and_bad_recipes():
  jaxpr = _step_jaxpr(LLAMA.replace(matmul="fp8_blockwise", fp8_exclude="embed,lm_head,router,dense"))
  assert not any(_is_f8(e) for e in _dots(jaxpr))  # every GQA / MLP projection of transformer.py is "dense"
  with pytest.raises(ValueError, match="not projection names"):
    fp8.policy(LLAMA.replace(matmul="fp8_blockwise", fp8_exclude="attention"))
  assert fp8.policy(LLAMA.replace(matmul="fp8_delayed")) == fp8.Policy("tensorwise", delayed=True)
  with pytest.raises(ValueError, match="fp8_amax_history"):
    LLAMA.replace(matmul="fp8_delayed", fp8_amax_history=0)
  with pytest.raises(ValueError, match="matmul"):
    LLAMA.replace(matmul="fp8")


@pytest.mark.parametrize("impl", [pytest.param("padded", marks=pytest.mark.slow), "ragged", "pallas"])
def test_routed_experts_run_fp8_in_every_layout(impl):
  """Under the policy the padded layout's batched GEMM and the block layout (which ragged and pallas switch to)
  are FP8, forward and backward (a jaxpr check: compiling the switch of padded layouts takes ~20 s)."""
  n, d, f = 64, 32, 48
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (n, d))
  ids = jax.random.randint(ks[1], (n, 2), 0, E)
  gates = jax.nn.softmax(jax.random.normal(ks[2], (n, 2)))
  wg, wu = (0.1 * jax.random.normal(k, (E, d, f)) for k in ks[3:5])
  wd = 0.1 * jax.random.normal(ks[4], (E, f, d))

  def loss(x, wg, wu, wd):
    capacity = 2.0 if impl == "padded" else None  # (one padded layout: dropless traces a switch of several)
    return jnp.sum(ops.moe_ffn(x, ids, gates, wg, wu, wd, impl=impl, interpret=True,
                               capacity_factor=capacity)[0] ** 2)


  with strategy.update(matmul=fp8.Policy("blockwise")):
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, wg, wu, wd).jaxpr
    dots = list(_dots(jaxpr))
    assert any(_is_f8(e) for e in dots) and all(_is_f8(e) for e in dots if E not in e.invars[1].aval.shape[:1])
    assert not any(e.primitive.name in ("ragged_dot_general", "pallas_call") for e in jaxpr.eqns)



def test_fp8_statistics_count_flushed_elements():
  """The probe's gradient counts, per GEMM, the elements that E4M3 flushes to zero: a tensor-scaled operand with
  an outlier token flushes the small values; blockwise 1x128 tiles keep them."""
  x = jnp.full((128, 256), 1e-3).at[0].set(1e3)  # one outlier token: tensorwise scale 1e3 / 448
  w = jnp.full((256, 128), 0.01)
  for scaling, flushed in (("tensorwise", True), ("blockwise", False)):
    pol = fp8.Policy(scaling)

    def f(p):
      with fp8.probing(p) as p:
        return jnp.sum(fp8.einsum(pol, "mk,kn->mn", x, p["w"]))

    _, st = fp8.stats(jax.jit(jax.grad(f))(fp8.with_probe({"w": w})))
    assert float(st["fp8_overflow"]) == 0.0  # current scaling never saturates
    assert (float(st["fp8_underflow"]) > 0.2) == flushed, (scaling, st)


def test_delayed_scaling_uses_the_previous_steps_amax():
  """History length 1: the first step (empty history) is current scaling; its amaxes of x, w and dy come out as
  the history's gradient, and the next step's GEMMs (forward, dgrad, wgrad) are the tensorwise GEMMs at those
  amaxes; an input twice as large as the recorded one saturates (delayed scaling can, current scaling cannot)."""
  ks = jax.random.split(jax.random.key(0), 4)
  x0, w = jax.random.normal(ks[0], (128, 256)), 0.02 * jax.random.normal(ks[1], (256, 128))
  dy0, dy1 = jax.random.normal(ks[2], (128, 128)), jax.random.normal(ks[3], (128, 128))
  pol = fp8.Policy("tensorwise", delayed=True)

  @jax.jit
  def step(p, x, dy):
    def f(p, x):
      with fp8.probing(p) as p:
        return jnp.vdot(fp8.einsum(pol, "mk,kn->mn", x, p["w"], p[fp8.HISTORY]), dy)
    return jax.grad(f, argnums=(0, 1))(p, x)

  @jax.jit
  def reference(x, dy, amax=None):  # (dx, dw) of the tensorwise GEMM, at the current or the given amaxes
    return jax.grad(lambda x, w: jnp.vdot(fp8_matmul(x, w, scaling="tensorwise", amax=amax), dy), (0, 1))(x, w)

  p = fp8.with_probe({"w": w, fp8.HISTORY: jnp.zeros((1, 3))})
  g, dx = step(p, x0, dy0)
  _, st = fp8.stats(g)
  assert float(st["fp8_overflow"]) == 0.0
  np.testing.assert_array_equal(dx, reference(x0, dy0)[0])
  amax0 = np.array([np.abs(x0).max(), np.abs(w).max(), np.abs(dy0).max()])
  np.testing.assert_array_equal(g[fp8.HISTORY], amax0[None])

  history = fp8.roll({"h": p[fp8.HISTORY]}, {"h": g[fp8.HISTORY]})["h"]
  g, dx = step({**p, fp8.HISTORY: history}, 2 * x0, dy1)
  ref_dx, ref_dw = reference(2 * x0, dy1, tuple(amax0))
  np.testing.assert_array_equal(dx, ref_dx)
  np.testing.assert_array_equal(g["w"], ref_dw)
  assert not np.array_equal(dx, reference(2 * x0, dy1)[0])  # not current scaling
  _, st = fp8.stats(g)
  assert float(st["fp8_overflow"]) > 0.005  # the entries of 2 x0 beyond amax(x0), and dy1's beyond amax(dy0)


def _batch(seed=1):
  tokens = jax.random.randint(jax.random.key(seed), (2, 33), 0, V)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": jnp.ones((2, 32), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(32), (2, 32)), "weights": jnp.ones((2, 32), jnp.float32)}


@functools.cache
def _delayed_run():
  """(config, initial state, jitted step) of fp8_delayed training: history length 2, step 0 in BF16
  (fp8_from_step=1); shared by the tests (compiling the step is most of their time)."""
  cfg = LLAMA.replace(matmul="fp8_delayed", fp8_amax_history=2, fp8_from_step=1)
  tx = optax.adamw(1e-3)
  step = jax.jit(functools.partial(train_step_lib.train_step, cfg=cfg, tx=tx,
                                   schedule=optax.constant_schedule(1e-3), step_cfg=train_step_lib.StepConfig()))
  state = jax.jit(functools.partial(train_step_lib.init_state, cfg, tx))(jax.random.key(0))
  return cfg, jax.device_put(state, jax.devices()[0]), step  # (committed, as a restored state is: one compile)


def _jump(state, factor=100.0):
  """The state with every layer's attention-norm scale times `factor`: a jump in the q, k, v inputs."""
  params = {**state["params"], "layers": {**state["params"]["layers"]}}
  params["layers"]["attn_norm"] = {"scale": params["layers"]["attn_norm"]["scale"] * factor}
  return {**state, "params": params}


def test_delayed_history_rolls_in_the_train_state_and_saturates_on_a_jump():
  """fp8_delayed train steps: the histories sit in state["fp8"] (not in the params the optimizer sees), stay
  empty in the BF16 step before fp8_from_step, take each FP8 step's amaxes in row 0 and shift the older ones; a
  jump of the activations saturates E4M3 on that step, and enters the history."""
  _, state, step = _delayed_run()
  paths = lambda tree: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]  # noqa: E731
  assert not any(fp8.HISTORY in k for k in paths(state["params"]) + paths(state["opt_state"]))
  assert len(paths(state["fp8"])) == 7  # q, k, v, o, gate, up, down; each [layers, H, (x, w, dy)]
  assert state["fp8"]["layers"]["attn"]["q"][fp8.HISTORY].shape == (LLAMA.n_layers, 2, 3)
  batch, rows = _batch(), []
  for i in range(4):
    if i == 3:  # the same step without the jump: the reference for the jump's amaxes
      h_ref = jax.device_get(step(state, batch)[0]["fp8"])
    state, m = step(_jump(state) if i == 3 else state, batch)
    rows.append((jax.device_get(state["fp8"]), jax.device_get(m)))
  (h0, m0), (h1, m1), (h2, m2), (h3, m3) = rows
  assert all(np.all(h == 0) for h in jax.tree.leaves(h0)) and m0["fp8_underflow"] == 0  # step 0: BF16
  for a, b, c in zip(*(jax.tree.leaves(h) for h in (h1, h2, h3))):
    assert np.all(a[:, 0] > 0) and np.all(a[:, 1] == 0)  # step 1: the first FP8 step's amaxes
    np.testing.assert_array_equal(b[:, 1], a[:, 0])  # rolled: row 1 holds the previous step's row 0
    np.testing.assert_array_equal(c[:, 1], b[:, 0])
  q_x = lambda h: h["layers"]["attn"]["q"][fp8.HISTORY][:, 0, 0]  # noqa: E731  (newest amax of q's input)
  # layer 0's q input is exactly 100x the unjumped step's (bf16 rounding aside); deeper layers see layer 0's
  # changed output as well, so only a large jump is certain there.
  np.testing.assert_allclose(q_x(h3)[0], 100 * q_x(h_ref)[0], rtol=0.02)
  assert np.all(q_x(h3) > 10 * q_x(h_ref)), (q_x(h3), q_x(h_ref))
  assert m1["fp8_overflow"] == 0  # current scaling (empty history) cannot saturate
  assert m3["fp8_overflow"] > 0.05 and m3["fp8_overflow"] > 100 * m2["fp8_overflow"], (m2, m3)


def test_delayed_histories_are_checkpointed_and_a_resumed_run_continues_alike(tmp_path):
  """The histories are saved with the train state: restored, the next step's loss and histories are the
  uninterrupted run's, bit for bit."""
  cfg, state, step = _delayed_run()
  batch = _batch()
  for _ in range(3):
    state, _ = step(state, batch)

  class Position:  # what a checkpoint reads of the data iterator
    def get_state(self):
      return {"pos": 0}

  ckpt = TrainCheckpointer(tmp_path / "ck", cfg, save_every=1, keep=1, async_save=False)
  ckpt.save(3, state, Position(), force=True)
  ckpt.close()
  ckpt = TrainCheckpointer(tmp_path / "ck", cfg, save_every=1, keep=1, async_save=False)
  restored = ckpt.restore(3, jax.tree.map(jnp.zeros_like, state), None)
  ckpt.close()
  assert any(np.any(h != 0) for h in jax.tree.leaves(restored["fp8"]))
  jax.tree.map(np.testing.assert_array_equal, restored["fp8"], state["fp8"])
  (a, ma), (b, mb) = step(state, batch), step(restored, batch)
  assert float(ma["loss"]) == float(mb["loss"])
  jax.tree.map(np.testing.assert_array_equal, a["fp8"], b["fp8"])


@pytest.mark.slow
def test_hybrid_run_switches_to_fp8_at_fp8_from_step():
  """fp8_from_step=2: steps 0 and 1 are the compute-dtype steps (the same losses as a default run), step 2 on is
  FP8 (statistics logged) and close to the default run's loss."""
  tx = optax.adamw(1e-3)
  tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, V)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": jnp.ones((2, 32), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(32), (2, 32)), "weights": jnp.ones((2, 32), jnp.float32)}

  def run(cfg, steps=3):
    step = jax.jit(functools.partial(train_step_lib.train_step, cfg=cfg, tx=tx,
                                     schedule=optax.constant_schedule(1e-3), step_cfg=train_step_lib.StepConfig()))
    state = train_step_lib.init_state(cfg, tx, jax.random.key(0))
    out = []
    for _ in range(steps):
      state, m = step(state, batch)
      out.append(jax.device_get(m))
    return out

  hybrid = run(LLAMA.replace(matmul="fp8_blockwise", fp8_from_step=2))
  plain = run(LLAMA)
  for i in (0, 1):
    assert hybrid[i]["fp8_underflow"] == 0.0
    np.testing.assert_allclose(hybrid[i]["loss"], plain[i]["loss"], rtol=1e-6)
  assert hybrid[2]["fp8_underflow"] > 0.0 and hybrid[2]["fp8_overflow"] == 0.0
  np.testing.assert_allclose(hybrid[2]["loss"], plain[2]["loss"], rtol=1e-2)


TPU_SCRIPT = """
import functools, jax, jax.numpy as jnp
from jax.experimental import topologies
from jpllm_jax.models import config as mc
from jpllm_jax.parallel import make_mesh
from jpllm_jax.train.optimizer import make_optimizer
from jpllm_jax.train.step import BATCH_KEYS, StepConfig, init_state, make_train_step
devs = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
mesh = make_mesh({"data": -1}, devices=devs[:1])  # one chip: Mosaic calls are not auto-partitioned (see README)
cfg = mc.make(family="llama", vocab_size=512, d_model=256, n_layers=2, d_ff=512, n_heads=4, n_kv_heads=2,
              max_seq_len=256, dtype="bfloat16", matmul="fp8_blockwise")
tx, schedule = make_optimizer(1e-3, 1, 10)
step = make_train_step(cfg, tx, schedule, StepConfig(), mesh)
state = jax.eval_shape(functools.partial(init_state, cfg, tx), jax.random.key(0))
lowered = step.lower(state, {k: jax.ShapeDtypeStruct((8, 256), jnp.int32) for k in BATCH_KEYS})
compiled = lowered.compile()
print("mosaic_calls", lowered.as_text().count("tpu_custom_call"))
print("cost_analysis", compiled.cost_analysis())
print("memory_analysis", compiled.memory_analysis())
"""


@pytest.mark.skipif(not os.environ.get("JPLLM_SLOW_TESTS") or importlib.util.find_spec("libtpu") is None,
                    reason="opt-in (JPLLM_SLOW_TESTS=1; ~9 minutes of compiling on 2 busy cores) and needs libtpu")
def test_fp8_train_step_compiles_for_v5p():
  """The FP8 train step of a small Llama compiled ahead of time for a deviceless v5p chip: every projection's
  forward, dgrad and wgrad is the Mosaic FP8 kernel (`auto` picks it by the lowering platform)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TPU_WORKER_HOSTNAMES="localhost",
             TPU_ACCELERATOR_TYPE="v5p-8")
  proc = subprocess.run([sys.executable, "-c", TPU_SCRIPT], env=env, capture_output=True, text=True, timeout=1800)
  print(proc.stdout)
  assert proc.returncode == 0, proc.stderr[-5000:]
  out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
  assert out["mosaic_calls"] == str(3 * 7)  # q, k, v, o, gate, up, down: forward, dgrad, wgrad
