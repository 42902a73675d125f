"""Pipeline schedules (tick tables, bubbles, buffers) and the shard_map executor against plain value_and_grad."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fake_devices import run_on_fake_devices
from jpllm_jax.parallel import pipeline_schedule as ps
from jpllm_jax.parallel.pipeline import split_vjp

CASES = [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 8, 16, 1), ("1f1b", 4, 2, 1), ("interleaved", 4, 8, 2),
         ("interleaved", 2, 4, 2), ("interleaved", 4, 16, 4)]


@pytest.mark.parametrize("kind,S,M,V", CASES)
def test_schedule_valid_and_bubble_is_megatrons(kind, S, M, V):
  sched = ps.make_schedule(kind, S, M, V)
  ps.validate(sched)
  assert sched.bubble_fraction == pytest.approx(ps.megatron_bubble(S, M, V), abs=1e-12)
  assert sched.ticks == 2 * (V * M + S - 1)
  # One op per device and tick; each device runs 2 V M ops.
  assert np.all(np.sum(sched.field("action") != ps.IDLE, axis=0) == 2 * V * M)


def test_memory_of_1f1b_is_stages_and_gpipe_micro_batches():
  S, M = 4, 16
  gpipe, one = ps.make_schedule("gpipe", S, M), ps.make_schedule("1f1b", S, M)
  assert ps.max_in_flight(gpipe) == M and gpipe.res_slots == M
  assert ps.max_in_flight(one) == S and one.res_slots == S
  assert one.act_slots == 1 and one.grad_slots == 1  # an input waits for its forward, a cotangent for its backward
  inter = ps.make_schedule("interleaved", S, M, 2)
  assert inter.bubble_fraction < one.bubble_fraction


def test_validate_catches_a_broken_table():
  sched = ps.make_schedule("1f1b", 4, 4)
  table = sched.table.copy()
  t = int(np.argmax(sched.field("action")[:, 1] == ps.FORWARD))
  table[t - 1, 1], table[t, 1] = sched.table[t, 1], sched.table[t - 1, 1]  # forward before its input arrives
  with pytest.raises(AssertionError):
    ps.validate(dataclasses.replace(sched, table=table))
  table = sched.table.copy()
  b = np.flatnonzero(sched.field("action")[:, 0] == ps.BACKWARD)[:2]
  table[b, 0, ps.FIELDS.index("res_slot")] = table[b[::-1], 0, ps.FIELDS.index("res_slot")]  # swapped residuals
  with pytest.raises(AssertionError, match="res_slot"):
    ps.validate(dataclasses.replace(sched, table=table))


def test_invalid_combinations_name_the_fix():
  with pytest.raises(ValueError, match="micro_batches=4 or 8"):
    ps.make_schedule("interleaved", 4, 6, 2)
  with pytest.raises(ValueError, match="pipeline=interleaved"):
    ps.make_schedule("1f1b", 4, 8, 2)
  with pytest.raises(ValueError, match="one of"):
    ps.make_schedule("zero-bubble", 4, 8)


def test_render_text_and_png(tmp_path):
  sched = ps.make_schedule("1f1b", 4, 8)
  text = ps.render_text(sched).splitlines()
  assert len(text) == 5 and text[4].split()[5:7] == ["F0", "B0"]  # the last stage: F0 at tick 3, then B0
  ps.render_png(sched, str(tmp_path / "1f1b.png"))
  assert (tmp_path / "1f1b.png").stat().st_size > 1000


def test_split_vjp_stores_activations_not_weights():
  """The executor's forward / backward split of jax.vjp: without remat the stored residuals are the stage's
  activations (neither a weight nor its bfloat16 cast), under jax.checkpoint only the stage input; the split
  backward equals jax.vjp's."""
  L, B, D = 3, 4, 8
  k = jax.random.split(jax.random.key(0), 3)
  p = {"w": jax.random.normal(k[0], (L, D, D)) / D**0.5, "b": jnp.ones((L, D))}
  x, g, batch = jax.random.normal(k[1], (B, D)), jax.random.normal(k[2], (B, D)), {"scale": jnp.float32(2.0)}

  def stage(p, x, batch, v):
    def layer(h, w):
      y = jnp.tanh(h.astype(jnp.bfloat16) @ w["w"].astype(jnp.bfloat16)).astype(jnp.float32)
      return h + y * batch["scale"] + w["b"], None
    return jax.lax.scan(layer, x, p)[0], {}

  want = jax.vjp(lambda p, x: stage(p, x, batch, 0)[0], p, x)[1](g)
  for fn in (stage, jax.checkpoint(stage)):
    split = split_vjp(fn, p, x, batch, jnp.int32(0))
    stored = [r.shape for r in split.residuals]
    if fn is stage:  # per layer at least its input (for tanh's and the matmul's backward); each has a batch axis
      assert all(B in s for s in stored) and sum(map(np.prod, stored)) >= L * B * D, stored
    else:
      assert stored == [(B, D)], stored
    y, _, res = jax.jit(split.forward)(p, x, batch, jnp.int32(0))
    dp, dx, _, _ = jax.jit(lambda res: split.backward(res, g, p, None, batch, jnp.int32(0)))(res)
    np.testing.assert_allclose(y, stage(p, x, batch, 0)[0], rtol=1e-6)
    for got, ref in zip(jax.tree.leaves((dp, dx)), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


_EXECUTOR = r"""
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from fake_devices import rel_diff
from jpllm_jax.parallel import make_mesh
from jpllm_jax.parallel.pipeline import pipeline_value_and_grad
from jpllm_jax.parallel.pipeline_schedule import make_schedule

VOCAB, D = 64, 32

def stage_fn(p, h, batch=None, v=None):  # residual MLP layers stacked on the leading axis
  return jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w["w1"] + w["b"]) @ w["w2"], None), h, p)[0]

# The executor stores what the stage's pullback needs: its activations, or only its input under jax.checkpoint.
STAGES = {False: stage_fn, True: jax.checkpoint(stage_fn)}

def embed_fn(sh, batch):
  return sh["embed"][batch["tokens"]]

def loss_fn(sh, h, batch):  # tied embedding when there is no head: used by the first and the last stage
  logits = h @ (sh["head"] if "head" in sh else sh["embed"].T / D)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  return jnp.sum(nll * batch["weights"]), jnp.sum(batch["weights"])

def init(L, tied):
  k = jax.random.split(jax.random.key(0), 8)
  sp = {"w1": jax.random.normal(k[0], (L, D, D)) / D**0.5, "b": 0.1 * jax.random.normal(k[1], (L, D)),
        "w2": jax.random.normal(k[2], (L, D, D)) / D**0.5}
  sh = {"embed": jax.random.normal(k[3], (VOCAB, D))}
  if not tied:
    sh["head"] = jax.random.normal(k[4], (D, VOCAB)) / D**0.5
  return sp, sh

def batches(M):
  k = jax.random.split(jax.random.key(1), 3)
  return {"tokens": jax.random.randint(k[0], (M, 4, 8), 0, VOCAB),
          "targets": jax.random.randint(k[1], (M, 4, 8), 0, VOCAB),
          "weights": (jax.random.uniform(k[2], (M, 4, 8)) > 0.2).astype(jnp.float32)}

@jax.jit
def reference(sp, sh, mb):
  def total(sp, sh):
    def one(carry, b):
      l, n = loss_fn(sh, stage_fn(sp, embed_fn(sh, b)), b)
      return (carry[0] + l, carry[1] + n), None
    (l, n), _ = jax.lax.scan(one, (0.0, 0.0), mb)
    return l / n
  return jax.value_and_grad(total, argnums=(0, 1))(sp, sh)

def check(kind, axes, M, V=1, L=16, tied=True, shard_batch=False, remat=False):
  mesh = make_mesh(axes)
  sched = make_schedule(kind, axes["stage"], M, V)
  sp, sh = init(L, tied)
  mb = batches(M)
  if shard_batch:
    mb = jax.device_put(mb, NamedSharding(mesh, P(None, "data")))
  run = jax.jit(lambda sp, sh, mb: pipeline_value_and_grad(STAGES[remat], embed_fn, loss_fn, sp, sh, mb,
                                                           mesh=mesh, schedule=sched))
  loss, aux, grads = run(sp, sh, mb)
  ref_loss, ref_grads = reference(sp, sh, mb)
  e_loss, e_grad = rel_diff(loss, ref_loss), rel_diff(grads, ref_grads)
  print(kind, axes, f"M={M} V={V} tied={tied} remat={remat}: loss {float(loss):.6f} vs {float(ref_loss):.6f}, "
        f"rel diff loss {e_loss:.1e} grads {e_grad:.1e}")
  assert e_loss < 1e-5 and e_grad < 1e-5, (e_loss, e_grad)
  assert float(aux["tokens"]) == float(jnp.sum(mb["weights"]))
  assert all(g.shape == w.shape for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves((sp, sh))))

CASES
print("OK")
"""


def _run(cases: str) -> None:
  run_on_fake_devices(_EXECUTOR.replace("CASES", cases), devices=8)


def test_pipeline_equals_value_and_grad_stage8():
  _run('check("1f1b", {"stage": 8}, 8)\ncheck("gpipe", {"stage": 8}, 8, tied=False, remat=True)')


def test_pipeline_equals_value_and_grad_with_data_and_other_axes():
  _run('check("1f1b", {"stage": 4, "data": 2}, 4, shard_batch=True, remat=True)\n'
       'check("interleaved", {"stage": 4, "data": 2}, 4, V=2, shard_batch=True)\n'
       'check("gpipe", {"stage": 2, "data": 2, "tensor": 2}, 4, L=8, tied=False, shard_batch=True)')


def test_pipeline_equals_value_and_grad_other_remat_mode():
  _run('check("1f1b", {"stage": 8}, 8, remat=True)\ncheck("gpipe", {"stage": 8}, 8, tied=False)\n'
       'check("1f1b", {"stage": 4, "data": 2}, 4, shard_batch=True)\n'
       'check("interleaved", {"stage": 4, "data": 2}, 4, V=2, shard_batch=True, remat=True)\n'
       'check("gpipe", {"stage": 2, "data": 2, "tensor": 2}, 4, L=8, tied=False, shard_batch=True, remat=True)')
