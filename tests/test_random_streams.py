"""Random streams do not depend on the mesh, and a checkpoint restores onto another mesh (8 fake devices).

The model has no dropout and no router noise: its random draws are the initialisation (one key per parameter,
split from the seed in the order of the parameter table) and the data order (host-side, from the seed and the
shard, never from a device: `test_train_multiprocess` checks 2 processes read the batches of 1). With
`jax_threefry_partitionable` (on) the initialisation is the same bit for bit on 1 device, data 2 x tensor 4 and
fsdp 8; `test_train_sharded` checks the train step itself on these layouts."""
from __future__ import annotations

import textwrap

from fake_devices import run_on_fake_devices

SCRIPT = textwrap.dedent("""
    import functools, json, tempfile
    import jax, numpy as np
    from jpllm_jax.models import llama
    from jpllm_jax.parallel import make_mesh
    from jpllm_jax.train.checkpointing import TrainCheckpointer
    from jpllm_jax.train.optimizer import make_optimizer
    from jpllm_jax.train.step import init_state, state_shardings

    assert jax.config.jax_threefry_partitionable
    cfg = llama.llama2(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_seq_len=16)
    tx, _ = make_optimizer(1e-3, 0, 10)
    meshes = {"1 device": make_mesh({"data": 1}, jax.devices()[:1]), "data 2 x tensor 4": make_mesh({"data": 2, "tensor": 4}),
              "fsdp 8": make_mesh({"fsdp": 8})}
    states = {}
    for name, mesh in meshes.items():
      shardings = state_shardings(cfg, tx, mesh)
      states[name] = jax.jit(functools.partial(init_state, cfg, tx), out_shardings=shardings)(jax.random.key(3))
    ref = jax.tree.map(np.asarray, states["1 device"])
    for name, state in states.items():
      for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(state)):
        assert np.array_equal(a, np.asarray(b)), (name, jax.tree_util.keystr(path))
    sharded = states["data 2 x tensor 4"]["params"]["layers"]["mlp"]["up"]["kernel"]
    assert len({str(s.index) for s in sharded.addressable_shards}) == 4  # the init really ran sharded

    class Iter:  # the part of a data iterator a checkpoint uses
      pos = 7
      def get_state(self): return {"pos": self.pos}
      def set_state(self, s): self.pos = json.loads(s)["pos"]
      def start_prefetch(self): pass

    # Saved on data 2 x tensor 4, restored on fsdp 8: the same values, laid out as the restoring run asks.
    directory = tempfile.mkdtemp()
    ckpt = TrainCheckpointer(directory, cfg, save_every=1, keep=2, async_save=False)
    ckpt.save(1, states["data 2 x tensor 4"], Iter(), force=True)
    ckpt.close()
    ckpt = TrainCheckpointer(directory, cfg, save_every=1, keep=2, async_save=False)
    target, it = states["fsdp 8"], Iter()
    it.pos = 0
    restored = ckpt.restore(1, target, it)
    ckpt.close()
    assert it.pos == 7
    for a, b, t in zip(jax.tree.leaves(ref), jax.tree.leaves(restored), jax.tree.leaves(target)):
      assert np.array_equal(a, np.asarray(b)) and b.sharding == t.sharding, (b.sharding, t.sharding)
    print("OK")
""")


def test_init_is_the_same_on_every_mesh_and_a_checkpoint_restores_onto_another():
  run_on_fake_devices(SCRIPT, timeout=300)
