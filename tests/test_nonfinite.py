"""Locating the first non-finite value of a step (train/nonfinite.py): the seed's failure, a hand-written tanh
that overflows for large inputs, in one layer is named by layer, sub-layer and pass; an infinite embedding row by
the batch row that reads it; on data 2 x tensor 4 by the devices that hold it; in one expert of an
expert-parallel MoE layer (inside its shard_map) by the expert rank's devices; the checking run computes the
step's loss with its MoE and MTP terms; and a training run stops with the report in the log and in
<workdir>/nonfinite_step<N>.json."""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpllm_jax import models
from jpllm_jax.models import layers, llama
from jpllm_jax.parallel import DEFAULT_RULES, make_mesh
from jpllm_jax.train import loop, nonfinite
from jpllm_jax.train import step as step_lib

from fake_devices import run_on_fake_devices
from test_train_guard import _config as _guard_config, _poison_data

CFG = llama.llama2(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16)


def naive_tanh(x):
  """tanh as (e^{2x} - 1) / (e^{2x} + 1): inf / inf = NaN once e^{2x} overflows (x > 44 in float32)."""
  e = jnp.exp(2 * x)
  return (e - 1) / (e + 1)


def unstable_activation(name, x):
  """silu(x) = x (1 + tanh(x / 2)) / 2 with the hand-written tanh: exact, until x > 88."""
  del name
  return x * (1 + naive_tanh(x / 2)) / 2


def batch(rows=4, seq=16, seed=0):
  tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (rows, seq)).astype(np.int32)
  return {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": np.ones((rows, seq), np.int32),
          "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
          "weights": np.ones((rows, seq), np.float32)}


def overflowing(params, layer: int, scale: float = 1e4):
  """`layer`'s gate projection scaled so that its pre-activations reach the overflow."""
  gate = params["layers"]["mlp"]["gate"]["kernel"]
  params["layers"]["mlp"]["gate"]["kernel"] = gate.at[layer].multiply(scale)
  return params


def _locate(params, b, mesh=None, cfg=CFG):
  mesh = mesh or make_mesh({"data": 1})
  return nonfinite.locate(cfg, params, jax.tree.map(jnp.asarray, b), mesh=mesh, rules=DEFAULT_RULES, z_loss=1e-4)


def naive_sigmoid(x):
  """1 / (1 + e^{-x}): its value is 0 once e^{-x} overflows, its derivative e^{-x} / (1 + e^{-x})^2 inf / inf."""
  return 1 / (1 + jnp.exp(-x))


def naive_silu(name, x):
  """silu written with the naive sigmoid: every value finite, the gradient NaN where x is below -88."""
  del name
  return x * naive_sigmoid(x)


@pytest.mark.slow
def test_a_backward_only_overflow_is_named_by_layer_and_sublayer(monkeypatch):
  monkeypatch.setattr(layers, "activation", naive_silu)
  site = _locate(overflowing(models.init(CFG, jax.random.key(0)), 1), batch())
  assert (site["pass"], site["layer"], site["stack"]) == ("backward", 1, "layers"), site
  assert (site["sublayer"], site["gradient_at"], site["value"]) == ("mlp.activation", "mlp_norm", "nan"), site
  assert "backward pass at layer 1 (layers), mlp.activation (the gradient at its input mlp_norm)" in \
      nonfinite.describe(site)


def test_an_infinite_embedding_row_is_named_with_the_batch_row_that_reads_it():
  params = models.init(CFG, jax.random.key(0))
  b = batch()
  b["inputs"][:] = np.where(b["inputs"] == 7, 8, b["inputs"])
  b["inputs"][2, 5] = 7
  params["embed"]["embedding"] = params["embed"]["embedding"].at[7, 3].set(jnp.inf)
  site = _locate(params, b)
  assert (site["pass"], site["piece"], site["sublayer"], site["value"]) == ("forward", "embed", "embed", "inf"), site
  assert site["batch_index"] == 2, site


# A MoE layer (Switch balance loss, router z-loss) and one MTP block (MoE too), as small as compiles fast.
MOE_MTP = models.preset("mixtral-8x7b", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48,
                        moe_d_ff=16, max_seq_len=16, mtp_depth=1, router_z_loss_coef=1e-3)


def test_the_rerun_computes_the_step_s_loss_with_its_moe_and_mtp_terms():
  params = jax.jit(models.init, static_argnums=0)(MOE_MTP, jax.random.key(1))
  b = batch()
  b["segment_ids"][3, 10:] = 0  # padding: the micro-batches' token counts differ (means are weighted).
  b["weights"][3, 9:] = 0
  b = jax.tree.map(jnp.asarray, b)
  kwargs = dict(z_loss=1e-4, micro_batches=2, mtp_loss_coef=0.3)
  want = jax.jit(lambda p, b: step_lib.loss_and_grads(MOE_MTP, p, b, **kwargs)[0])(params, b)
  run = nonfinite.rerun(MOE_MTP, params, b, mesh=make_mesh({"data": 1}), rules=DEFAULT_RULES, **kwargs)
  assert run.site is None and set(run.loss) == {"loss", "ce", "z_loss", "moe_loss", "mtp_loss"}, run
  for k, v in run.loss.items():  # (the MoE terms are 0.5% of the loss, the MTP term a quarter)
    np.testing.assert_allclose(v, float(want[k]), rtol=2e-6, err_msg=k)
  assert run.loss["moe_loss"] > 1e-3 and run.loss["mtp_loss"] > 1


# ------------------------------------------------------------------------------ in the training loop
def _loop_config(**train):
  c = _guard_config(6, max_bad=3)
  c.model.n_layers = 2
  c.train.update(checkpoint_every=2, async_checkpoint=False, **train)
  return c


@pytest.mark.slow
def test_the_loop_stops_on_the_overflowing_layer_with_the_report(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(layers, "activation", unstable_activation)
  real_init = loop.init_state
  monkeypatch.setattr(loop, "init_state", lambda *a, **k: {**(s := real_init(*a, **k)),
                                                           "params": overflowing(s["params"], 1)})
  with caplog.at_level(logging.WARNING), pytest.raises(
      nonfinite.NonFiniteStep, match=r"step 1 is not finite: first nan in the forward pass at layer 1 \(layers\), "
                                     r"mlp.activation, devices \[0\], batch row 0"):
    loop.train(_loop_config(on_nonfinite="stop"), str(tmp_path))
  report = json.loads((tmp_path / "nonfinite_step1.json").read_text())
  assert report["site"]["layer"] == 1 and report["site"]["sublayer"] == "mlp.activation", report
  assert any("step 1: first nan in the forward pass at layer 1" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_rollback_reloads_the_last_good_checkpoint_and_skips_the_window(tmp_path, monkeypatch, caplog):
  poison = _poison_data(monkeypatch, {3})  # batch 3 -> step 4: a NaN loss weight.
  with caplog.at_level(logging.WARNING):
    loop.train(_loop_config(on_nonfinite="rollback"), str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert [r["rollbacks"] for r in records] == [0, 0, 1, 1, 1, 1] and not any(r["skipped"] for r in records)
  # Step 4 was found bad while step 5 ran (batch 4): steps 3-5's batches 2-4 are skipped, 3-6 train on 5-8.
  assert poison[0].n == 9
  assert any("rolled back to step 2, skipping the 3 batches of steps 3-5" in r.getMessage() for r in caplog.records)
  site = json.loads((tmp_path / "nonfinite_step4.json").read_text())["site"]
  assert (site["pass"], site["sublayer"]) == ("forward", "head+loss"), site


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
import test_nonfinite as t
from jpllm_jax import models
from jpllm_jax.models import layers
from jpllm_jax.parallel import make_mesh
layers.activation = t.unstable_activation
mesh = make_mesh({"data": 2, "tensor": 4})
params = models.init(t.CFG, jax.random.key(0))
gate = params["layers"]["mlp"]["gate"]["kernel"]  # [L, D, F]: F over the tensor axis, 12 columns a rank.
params["layers"]["mlp"]["gate"]["kernel"] = gate.at[1, :, :12].multiply(1e4)  # only tensor rank 0's columns.
site = t._locate(params, t.batch(), mesh)
assert (site["layer"], site["sublayer"], site["pass"]) == (1, "mlp.activation", "forward"), site
want = sorted(int(d.id) for d in np.ravel(mesh.devices[(slice(None),) * mesh.axis_names.index("tensor") + (0,)]))
assert site["devices"] == want and len(want) == 2, (site, want)
print("OK")
"""


def test_on_data_2_x_tensor_4_the_site_names_the_tensor_rank_that_holds_it():
  run_on_fake_devices(SHARDED, timeout=300)


def expert_parallel_script(activation: str, columns: int, want: dict) -> str:
  """A script for 8 fake devices: on data 2 x expert 2 x tensor 2, expert 3 of MoE layer 1 overflows with
  `activation` (its gate's first `columns` of 16 scaled up; 8 are tensor rank 0's); the site must match `want`,
  and name the devices at the mesh coordinates `want["where"]`."""
  return f"""
import jax, jax.numpy as jnp, numpy as np
import test_nonfinite as t
from jpllm_jax import models
from jpllm_jax.models import layers
from jpllm_jax.parallel import make_mesh
layers.activation = t.{activation}  # the routed experts' too (moe/ops.py calls layers.activation)
cfg = t.MOE_MTP.replace(n_layers=2, mtp_depth=0, n_experts=4)
mesh = make_mesh({{"data": 2, "expert": 2, "tensor": 2}})  # 2 experts an expert rank, half their width a tensor rank
params = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(0))
gate = params["layers_moe"]["experts"]["gate"]  # [L, E, D, F]
params["layers_moe"]["experts"]["gate"] = gate.at[1, 3, :, :{columns}].multiply(1e4)
site = t._locate(params, t.batch(), mesh, cfg)
want = {want!r}
coords = want.pop("where")
where = tuple(coords.get(a, slice(None)) for a in mesh.axis_names)
assert {{k: site.get(k) for k in want}} == want, site
assert site["devices"] == sorted(int(d.id) for d in np.ravel(mesh.devices[where])), site
print(t.nonfinite.describe(site))
print("OK")
"""


def test_an_overflow_inside_the_expert_parallel_shard_map_is_named_by_layer_and_expert_rank():
  # Computed inside the expert-parallel shard_map, by expert rank 1 (experts 2, 3) on its tensor rank 0 only.
  want = {"pass": "forward", "layer": 1, "stack": "layers_moe", "sublayer": "moe.experts",
          "where": {"expert": 1, "tensor": 0}}
  out = run_on_fake_devices(expert_parallel_script("unstable_activation", 8, want), timeout=300)
  assert "first nan in the forward pass at layer 1 (layers_moe), moe.experts, devices [" in out


@pytest.mark.slow
def test_a_backward_only_overflow_inside_the_expert_shard_map_names_the_expert_rank():
  # The naive sigmoid's derivative: NaN in the experts' backward, at the inputs expert rank 1 received (on both
  # tensor ranks: their partial gradients are summed).
  want = {"pass": "backward", "layer": 1, "stack": "layers_moe", "sublayer": "moe.experts",
          "gradient_at": "moe.expert_inputs", "where": {"expert": 1}}
  run_on_fake_devices(expert_parallel_script("naive_silu", 16, want), timeout=300)
