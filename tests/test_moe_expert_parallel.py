"""Expert-parallel MoE (8 fake CPU devices): outputs, stats and gradients equal the single-device reference."""
from __future__ import annotations

import textwrap

from fake_devices import run_on_fake_devices

SCRIPT = textwrap.dedent("""
    from fake_devices import rel_diff
    import math, jax, jax.numpy as jnp, numpy as np
    from jpllm_jax.moe import moe_ffn_reference
    from jpllm_jax.parallel.expert import moe_ffn_expert_parallel
    from jpllm_jax.parallel import make_mesh

    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    N, D, F = 64, 16, 32

    def routing(e, k, skew):
      # k distinct experts per token; skewed: experts 0, 5, 9 (those < e) never chosen, expert 3 hot;
      # "one": every token to experts 0..k-1 (one rank gets every row: the block layout's case).
      if skew == "one":
        return np.broadcast_to(np.arange(k, dtype=np.int32), (N, k)).copy()
      p = np.ones(e)
      if skew:
        p[[i for i in (0, 5, 9) if i < e]] = 0
        p[3] = 30
      return np.stack([rng.choice(e, k, replace=False, p=p / p.sum()) for _ in range(N)]).astype(np.int32)

    def kept_mask(ids, e, c, shards):
      # moe_ffn's capacity on each device's tokens: expert e keeps its first ceil(c * A_local / E) assignments.
      keep = np.zeros(ids.size, bool)
      a = ids.size // shards
      for s in range(shards):
        seen = np.zeros(e, int)
        for i in range(s * a, (s + 1) * a):
          keep[i] = seen[ids.flat[i]] < math.ceil(c * a / e)
          seen[ids.flat[i]] += 1
      return keep.reshape(ids.shape)


    def check(sizes, e, k, skew=False, c=None, impl="auto"):
      devices = jax.devices()[:math.prod(sizes.values())]
      mesh = make_mesh(sizes, devices)
      ids = routing(e, k, skew)
      gates = rng.uniform(0.1, 1.0, (N, k)).astype(np.float32)
      x = rng.normal(size=(N, D)).astype(np.float32)
      w = [rng.normal(size=s).astype(np.float32) * 0.3 for s in [(e, D, F), (e, D, F), (e, F, D)]]
      ct = rng.normal(size=(N, D)).astype(np.float32)
      shards = math.prod(sizes.get(a, 1) for a in ("data", "fsdp", "expert"))
      keep = np.ones(ids.shape, bool) if c is None else kept_mask(ids, e, c, shards)

      def loss_ep(x, gates, wg, wu, wd):
        y, stats = moe_ffn_expert_parallel(x, ids, gates, wg, wu, wd, mesh=mesh, capacity_factor=c, impl=impl)
        return jnp.sum(y * ct), (y, stats)

      def loss_ref(x, gates, wg, wu, wd):
        y = moe_ffn_reference(x, ids, gates * keep, wg, wu, wd)
        return jnp.sum(y * ct), y

      argnums = (0, 1, 2, 3, 4)
      (loss, (y, stats)), grads = jax.jit(jax.value_and_grad(loss_ep, argnums, has_aux=True))(x, gates, *w)
      (loss_r, y_r), grads_r = jax.jit(jax.value_and_grad(loss_ref, argnums, has_aux=True))(x, gates, *w)
      # The loss is a sum of terms of both signs: its error is relative to the scale of the terms.
      errs = [abs(float(loss) - float(loss_r)) / float(np.linalg.norm(y_r) * np.linalg.norm(ct)), rel_diff(y, y_r)]
      errs += [rel_diff(g, g_r) for g, g_r in zip(grads, grads_r)]
      print(sizes, f"E={e} k={k} skew={skew} c={c} impl={impl} dropped={int(stats['dropped'])}",
            "loss, y, dx, dgates, dw_gate, dw_up, dw_down rel err", " ".join(f"{v:.1e}" for v in errs))
      assert max(errs) < 1e-5, (sizes, errs)
      assert all(float(np.abs(g).max()) > 0 for g in grads_r)
      np.testing.assert_array_equal(stats["load"], np.bincount(ids.ravel(), minlength=e))
      assert int(stats["dropped"]) == int((~keep).sum())
      return int(stats["dropped"])

    check({"expert": 8}, 8, 2)
    check({"data": 2, "expert": 4}, 8, 2)
    check({"fsdp": 2, "expert": 2, "tensor": 2}, 8, 2)
    check({"expert": 4}, 16, 2, skew=True)
    check({"expert": 4}, 16, 8, skew=True)
    check({"data": 4, "tensor": 2}, 8, 2)  # expert axis of size 1: local moe_ffn on each data shard.
    check({"data": 2, "expert": 4}, 16, 2, skew=True, impl="ragged")
    check({"data": 2, "expert": 4}, 16, 2, skew="one")  # "padded" runs its last resort, the block layout
    check({"fsdp": 2, "expert": 2, "tensor": 2}, 8, 2, skew="one")
    # Capacity: moe_ffn's rule on each device's tokens; the skew makes the hot expert overflow.
    assert check({"data": 2, "expert": 4}, 8, 2, skew=True, c=1.0) > 0
    assert check({"fsdp": 2, "expert": 2, "tensor": 2}, 16, 8, skew=True, c=1.25) > 0
    assert check({"data": 8}, 8, 2, skew=True, c=1.0) > 0

    # The Pallas kernel under shard_map type-checks, gradients included (the interpreter cannot run it there).
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    w = [jnp.zeros((8, D, F)), jnp.zeros((8, D, F)), jnp.zeros((8, F, D))]
    ids = jnp.asarray(routing(8, 2, False))
    loss = lambda x, g, *w: jnp.sum(moe_ffn_expert_parallel(x, ids, g, *w, mesh=mesh, impl="pallas")[0])
    shapes = jax.eval_shape(jax.value_and_grad(loss, (0, 1, 2, 3, 4)), jnp.zeros((N, D)), jnp.zeros((N, 2)), *w)
    assert [s.shape for s in shapes[1]] == [(N, D), (N, 2), *[v.shape for v in w]], shapes

    mesh = make_mesh({"expert": 8})
    w = jnp.zeros((12, D, F))
    try:
      moe_ffn_expert_parallel(jnp.zeros((N, D)), jnp.zeros((N, 2), jnp.int32), jnp.zeros((N, 2)), w, w,
                              jnp.zeros((12, F, D)), mesh=mesh)
      raise AssertionError("12 experts on 8 expert ranks should fail")
    except ValueError as err:
      assert "not divisible" in str(err), err
    print("OK")
""")


def test_expert_parallel_equals_reference():
  run_on_fake_devices(SCRIPT, timeout=600)
