"""Replica consistency on 8 fake devices: a desync injected on one tensor-parallel rank, on one data-parallel
replica and (through the training loop) into a running job is reported by tensor, mesh axis and device."""
from __future__ import annotations

import textwrap

from fake_devices import run_on_fake_devices

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jpllm_jax.parallel.consistency import Mismatch, ReplicaDesync, assert_replicas_equal, check_replicas

    def put(x, mesh, spec):
      return jax.device_put(x, NamedSharding(mesh, spec))

    def desync(x, device, delta):
      # One device's buffer changed; the others untouched (what an out-of-sync RNG on one rank produces).
      bufs = [jax.device_put(s.data + delta if s.device == device else s.data, s.device)
              for s in x.addressable_shards]
      return jax.make_array_from_single_device_arrays(x.shape, x.sharding, bufs)

    devs = np.array(jax.devices())
    # data 2 x tensor 4: a weight sharded over data, replicated over tensor; one tensor rank's copy changed.
    mesh = Mesh(devs.reshape(2, 4), ("data", "tensor"))
    w = put(jnp.arange(64.0).reshape(8, 8), mesh, P("data", None))
    v = put(jnp.ones((8, 8), jnp.bfloat16), mesh, P(None, "tensor"))
    tree = {"params": {"w": w, "v": v}, "step": put(jnp.int32(3), mesh, P())}
    assert check_replicas(tree) == [], check_replicas(tree)
    bad = mesh.devices[1, 2]
    tree["params"]["w"] = desync(w, bad, 0.25)
    assert check_replicas(tree) == [Mismatch("['params']['w']", "tensor", (bad.id,), 0.25)], check_replicas(tree)

    # A single flipped low bit of a bf16 weight on the second of two data replicas (of two differing copies the
    # first member's is the reference) is found.
    tree["params"]["w"] = w
    flip = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(v, jnp.uint16) ^ jnp.uint16(1), jnp.bfloat16)
    one = [jax.device_put(f.data if s.device == mesh.devices[1, 1] else s.data, s.device)
           for s, f in zip(v.addressable_shards, flip.addressable_shards)]
    tree["params"]["v"] = jax.make_array_from_single_device_arrays(v.shape, v.sharding, one)
    [m] = check_replicas(tree)
    assert (m.path, m.axis, m.device_ids) == ("['params']['v']", "data", (mesh.devices[1, 1].id,)), m
    assert 0 < m.max_abs_diff < 0.01, m

    # data 4 x tensor 2: a weight sharded over tensor, replicated over data; one data-parallel replica changed.
    mesh = Mesh(devs.reshape(4, 2), ("data", "tensor"))
    u = put(jnp.linspace(-1, 1, 32).reshape(4, 8), mesh, P(None, "tensor"))
    bad = mesh.devices[2, 1]
    found = check_replicas({"mu": {"u": desync(u, bad, -3.0)}})
    assert found == [Mismatch("['mu']['u']", "data", (bad.id,), 3.0)], found
    # A fully replicated scalar with one bad copy: named on both axes it is replicated over.
    s = put(jnp.float32(1.0), mesh, P())
    found = check_replicas(desync(s, bad, 1.0))
    assert [(m.axis, m.device_ids) for m in found] == [("data", (bad.id,)), ("tensor", (bad.id,))], found
    try:
      assert_replicas_equal({"u": desync(u, bad, 1.0)}, "after step 7")
      raise AssertionError("no error")
    except ReplicaDesync as e:
      assert "after step 7" in str(e) and "['u'] differs across mesh axis 'data'" in str(e), e
    print("OK")
""")


def test_check_replicas_names_the_desynced_tensor_axis_and_device():
  run_on_fake_devices(SCRIPT, timeout=300)


TRAIN_SCRIPT = textwrap.dedent("""
    import jax, pathlib, sys, tempfile
    from jpllm_jax.train import loop
    from jpllm_jax.parallel.consistency import ReplicaDesync
    from jpllm_jax.tokenizer import mistral_v1_path
    from experiments.configs import default

    make = loop.make_train_step
    def corrupting(*a, **k):
      # The step of a rank whose RNG went out of sync: from step 3 on, one device's copy of the final norm differs.
      step_fn = make(*a, **k)
      def run(state, batch):
        state, metrics = step_fn(state, batch)
        if int(state["step"]) >= 3:
          x = state["params"]["final_norm"]["scale"]
          bufs = [jax.device_put(s.data * 1.5 if s.device.id == 5 else s.data, s.device) for s in x.addressable_shards]
          state["params"]["final_norm"]["scale"] = jax.make_array_from_single_device_arrays(x.shape, x.sharding, bufs)
        return state, metrics
      return run
    loop.make_train_step = corrupting

    c = default.get_config()
    c.data.tokenizer = mistral_v1_path()
    c.data.seq_len = 16
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
    c.train.update(steps=6, batch_size=8, log_every=1, eval_every=0, checkpoint_every=100, consistency_every=1)
    c.mesh.update(data=4, tensor=2)
    try:
      loop.train(c, tempfile.mkdtemp())
      raise AssertionError("the run did not stop")
    except ReplicaDesync as e:
      msg = str(e)
    print(msg)
    assert "after step 3" in msg and "['params']['final_norm']['scale']" in msg, msg
    assert "'data'" in msg and "[5]" in msg, msg
    print("OK")
""")


def test_training_stops_on_a_replica_desync():
  run_on_fake_devices(TRAIN_SCRIPT, timeout=600)
