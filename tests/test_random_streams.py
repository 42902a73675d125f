"""Random streams depend on (seed, a stable name) only: not on the other parameters, the mesh or the process; a
checkpoint restores onto another mesh (8 fake devices).

The model has no dropout and no router noise: its random draws are the initialisation (each parameter from the
seed folded with the CRC-32 of its name, `transformer.init_key`) and the data order (host-side, from the seed and
the shard, never from a device: `test_train_multiprocess` checks 2 processes read the batches of 1). With
`jax_threefry_partitionable` (on) the initialisation is the same bit for bit on 1 device, data 2 x tensor 4 and
fsdp 8; `test_train_sharded` checks the train step itself on these layouts."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from jpllm_jax import models
from jpllm_jax.models import llama, transformer
from jpllm_jax.models.config import MTPConfig

from fake_devices import REPO, run_on_fake_devices

TINY = llama.llama2(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=8,
                     tie_embeddings=True)


def _leaves(params) -> dict[str, np.ndarray]:
  return {transformer.param_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_a_parameter_s_init_does_not_depend_on_the_others():
  # An untied head and an extra stack (MTP) add parameters between and after the shared ones in the table.
  base = _leaves(models.init(TINY, jax.random.key(5)))
  more = _leaves(models.init(TINY.replace(mtp=MTPConfig(depth=1), tie_embeddings=False), jax.random.key(5)))
  assert set(base) < set(more) and {"mtp/proj/kernel", "lm_head/kernel"} <= set(more) - set(base)
  for name, a in base.items():
    assert np.array_equal(a, more[name]), name
  # Each draw is its own: no two weights of the same shape are equal, another seed changes every one.
  other = _leaves(models.init(TINY, jax.random.key(6)))
  drawn = [n for n, a in base.items() if a.std() > 0]
  assert len(drawn) == 8 and not any(np.array_equal(base[n], other[n]) for n in drawn), drawn
  assert not np.array_equal(base["layers/attn/q/kernel"], base["layers/attn/k/kernel"])


def test_the_init_key_is_the_same_in_every_python_process():
  # crc32, not hash(): hash() of a str is salted per process (PYTHONHASHSEED).
  code = ("import jax; from jpllm_jax.models import transformer; "
          "print(jax.random.key_data(transformer.init_key(jax.random.key(0), 'layers/mlp/up/kernel')).tolist())")
  runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env=dict(os.environ, PYTHONHASHSEED=seed, JAX_PLATFORMS="cpu")).stdout
          for seed in ("1", "2")}
  assert len(runs) == 1, runs

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
