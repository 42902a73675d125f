"""Logical axis names shard the models on a mesh without touching model code (8 fake CPU devices)."""
from __future__ import annotations

import textwrap

from fake_devices import run_on_fake_devices

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jpllm_jax import models
    from jpllm_jax.models import gpt, llama, mistral, qwen2
    from jpllm_jax.parallel import axis_rules, logical_to_spec

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
             ("mlp", "tensor"), ("vocab", "tensor"), ("length", None), ("layers", None))
    tiny = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
                init_std=0.3)
    for cfg in (llama.llama3(**tiny), mistral.mistral(**tiny, sliding_window=4), qwen2.qwen2(**tiny),
                gpt.gpt(**{**tiny, "n_kv_heads": 4})):
      params = models.init(cfg, jax.random.key(0))
      tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
      ref = jax.jit(models.forward, static_argnums=0)(cfg, params, tokens)
      shardings = jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)),
                               models.param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))
      sharded = jax.device_put(params, shardings)
      assert tuple(sharded["layers"]["mlp"]["up"]["kernel"].sharding.spec) == (None, "fsdp", "tensor")
      tok_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))

      def run(p, t):
        with axis_rules(mesh, rules):
          return models.forward(cfg, p, t)

      out = jax.jit(run)(sharded, jax.device_put(tokens, tok_sharding))
      assert out.sharding.spec[0] == ("data", "fsdp"), out.sharding
      err = float(jnp.abs(out - ref).max())
      assert err < 1e-4, (cfg.family, err)
      print(cfg.family, "max abs diff", err)
    print("OK")
""")


def test_forward_sharded_by_logical_rules_equals_single_device():
  run_on_fake_devices(SCRIPT, timeout=600)
