"""The training recipe and start-up: LLM-jp optimizer defaults, config errors that say what to change, the
logs of a run, and continual pre-training from an imported Hugging Face checkpoint."""
from __future__ import annotations

import json
import math
import types

import jax
import numpy as np
import pytest
import transformers
from jax.extend import core as jcore

from experiments.configs import default
from jpllm_jax import checkpoint, hf, models
from jpllm_jax.models import llama
from jpllm_jax.models.transformer import param_kinds
from jpllm_jax.parallel import check_model_fits_mesh, mesh_shape
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.train import flops
from jpllm_jax.train.loop import train
from jpllm_jax.train.optimizer import decay_mask, lr_schedule, make_optimizer
from jpllm_jax.train.step import loss_and_grads


def test_schedule_warms_up_linearly_then_decays_to_ten_percent():
  s = lr_schedule(1e-3, warmup_steps=100, total_steps=1000)
  np.testing.assert_allclose([s(0), s(50), s(100), s(1000)], [0.0, 5e-4, 1e-3, 1e-4], rtol=1e-6)
  mid = float(s(550))  # half-way through the cosine: the mean of peak and floor.
  np.testing.assert_allclose(mid, (1e-3 + 1e-4) / 2, rtol=1e-4)


def _expected_label(path) -> str:
  """The recipe read off a parameter's name, independently of its initialiser: norm scales and biases are not
  decayed, router biases are frozen (moved by the balancing rule), every other leaf is a matrix or embedding."""
  keys = [k.key for k in path]
  if keys[-2:] == ["router", "bias"]:
    return "frozen"
  return "no_decay" if keys[-1] in ("scale", "bias") else "decay"


@pytest.mark.parametrize("cfg", [
    models.preset("llm-jp-13b-v1", n_layers=1, d_model=64, n_heads=4, n_kv_heads=4, d_ff=128, vocab_size=128),
    models.preset("deepseek-v3", vocab_size=64, d_model=32, n_heads=4, d_ff=48, n_layers=2, q_lora_rank=16,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_d_ff=8,
                  first_k_dense=1, n_experts=8, n_group=2, topk_group=1, n_experts_per_tok=2, mtp_depth=1,
                  rope_type="default", rope_scaling=()),
], ids=["gpt", "deepseek"])
def test_weight_decay_skips_norms_and_biases(cfg):
  kinds = param_kinds(cfg)
  shapes = models.param_shapes(cfg)
  want = {jax.tree_util.keystr(p): _expected_label(p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes)}
  mask = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(kinds))}
  assert mask == {k: v == "decay" for k, v in want.items()}
  assert {"decay", "no_decay"} <= set(want.values())  # both kinds are present in every config
  if cfg.moe.n_experts:
    assert list(want.values()).count("frozen") == 2  # the MoE stack's and the MTP block's router biases
  stacked = lambda k: "['layers" in k or "['mtp']" in k  # a leading layer axis
  for k, shape in ((jax.tree_util.keystr(p), s.shape) for p, s in jax.tree_util.tree_leaves_with_path(shapes)):
    assert want[k] != "decay" or len(shape) - stacked(k) >= 2, (k, shape)  # decayed leaves are matrices
  # The optimizer applies it: all-ones parameters and gradients, no clipping, lr 0.01 from step 0 and wd 0.1.
  # Adam's first step is -lr * g / (|g| + eps) = -lr, plus -lr * wd * p where decayed; frozen leaves stay.
  tx, _ = make_optimizer(0.01, 0, 10, kinds=kinds, clip_norm=0.0, weight_decay=0.1)
  params = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes)
  updates, _ = tx.update(params, tx.init(params), params)
  expect = {"decay": -0.011, "no_decay": -0.01, "frozen": 0.0}
  for p, u in jax.tree_util.tree_leaves_with_path(updates):
    np.testing.assert_allclose(np.asarray(u), expect[want[jax.tree_util.keystr(p)]], rtol=1e-6,
                               err_msg=jax.tree_util.keystr(p))


def test_adamw_defaults_are_the_llm_jp_recipe():
  tx, _ = make_optimizer()
  params = {"w": np.ones((2, 2), np.float32)}
  state = tx.init(params)
  # Gradient 2 everywhere has global norm 4: clipping at 1.0 makes it 0.5. Then b1 = 0.9 and b2 = 0.95:
  # mu = 0.1 * 0.5 and nu = 0.05 * 0.5 ** 2.
  _, state = tx.update({"w": np.full((2, 2), 2.0, np.float32)}, state, params)
  mu, nu = [s for s in jax.tree.leaves(state) if getattr(s, "shape", None) == (2, 2)]
  np.testing.assert_allclose(mu, np.full((2, 2), 0.05), rtol=1e-6)
  np.testing.assert_allclose(nu, np.full((2, 2), 0.0125), rtol=1e-6)


def test_config_errors_say_what_to_change():
  with pytest.raises(ValueError, match="set the sizes so that their product is 8"):
    mesh_shape({"data": 3}, 8)
  with pytest.raises(ValueError, match="not divisible by the fixed axes"):
    mesh_shape({"data": -1, "tensor": 3}, 8)
  cfg = llama.llama2(vocab_size=1000, d_model=96, n_layers=2, n_heads=6, n_kv_heads=6, d_ff=128)
  fake_mesh = types.SimpleNamespace(shape={"data": 1, "stage": 1, "fsdp": 1, "expert": 1, "tensor": 4})
  with pytest.raises(ValueError, match=r"heads=6 is not divisible by mesh axes \('tensor',\).*change the model"):
    check_model_fits_mesh(cfg, fake_mesh)
  with pytest.raises(ValueError, match=r"vocab=1001 .*pad the vocabulary"):
    check_model_fits_mesh(cfg.replace(n_heads=8, n_kv_heads=8, d_model=64, vocab_size=1001), fake_mesh)


def _subjaxprs(params):
  for v in params.values():
    for x in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(x, jcore.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jcore.Jaxpr):
        yield x


def _matmul_flops(jaxpr) -> int:
  """2 x output size x contracted size of every dot_general in a jaxpr, scan bodies counted `length` times:
  a count of what the traced program multiplies, independent of `flops.train_flops_per_token`."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
      continue
    assert eqn.primitive.name not in ("while", "cond"), eqn.primitive.name  # no trip count / branch to count
    inner = sum(_matmul_flops(j) for j in _subjaxprs(eqn.params))
    total += inner * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
  return total


def _counted_train_flops(cfg, batch: int, seq_len: int) -> int:
  """Matmul FLOPs of the training gradient (`loss_and_grads`: forward, fused head + loss, backward)."""
  ids = jax.ShapeDtypeStruct((batch, seq_len), np.int32)
  data = dict(inputs=ids, targets=ids, segment_ids=ids, positions=ids,
              weights=jax.ShapeDtypeStruct((batch, seq_len), np.float32))
  fn = lambda p, b: loss_and_grads(cfg, p, b, z_loss=1e-4, micro_batches=1)
  return _matmul_flops(jax.make_jaxpr(fn)(models.param_shapes(cfg), data).jaxpr)


def test_train_flops_per_token_counts_the_matmuls_of_the_gradient():
  cfg = llama.llama2(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=512)
  b = 2
  # Up to one attention block (128) the traced gradient multiplies exactly what the formula counts: 6 x matmul
  # parameters per token (forward, dx and dw) and the full T x T scores. Non-matmul FLOPs are in neither.
  assert _counted_train_flops(cfg, b, 32) == flops.train_flops_per_token(cfg, 32) * b * 32
  # Longer, causal_attention skips key blocks the mask hides: 2 query blocks of 128 read 1 and 2 key blocks,
  # 3/4 of the scores the formula (PaLM's, full T x T: model FLOPs) counts.
  t = 256
  attention = 6 * cfg.n_layers * cfg.attention.n_heads * 2 * cfg.dim_per_head * t * b * t
  assert _counted_train_flops(cfg, b, t) == flops.train_flops_per_token(cfg, t) * b * t - attention / 4


def _tiny_config(steps: int):
  c = default.get_config()
  c.data.tokenizer = mistral_v1_path()
  c.data.seq_len = 32
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
  c.train.update(steps=steps, batch_size=2, log_every=2, eval_every=2, eval_batches=1, checkpoint_every=2,
                 peak_tflops=0.5)
  c.optim.warmup_steps = 1
  return c


def test_a_run_logs_every_metric_to_jsonl_and_tensorboard(tmp_path):
  train(_tiny_config(4), str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4]
  for r in records:
    for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "model_tflops", "mfu", "tokens_seen"):
      assert np.isfinite(r[key]), key
    np.testing.assert_allclose(r["mfu"], r["model_tflops"] / 0.5, rtol=1e-4)
  # model_tflops is tokens/s times the FLOPs per token of the traced gradient of this run's model (batch 2,
  # length 32: no attention block skipped); 1e-4: the rounding of the logged numbers.
  per_token = _counted_train_flops(checkpoint.load_config(tmp_path / "checkpoints"), 2, 32) / (2 * 32)
  np.testing.assert_allclose(records[-1]["model_tflops"], records[-1]["tokens_per_s"] * per_token / 1e12, rtol=1e-4)
  assert records[-1]["tokens_seen"] == 4 * 2 * 32
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_continual_pretraining_starts_from_the_hf_checkpoint(tmp_path):
  hf_dir = tmp_path / "hf"
  config = transformers.LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
  transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
  c = _tiny_config(10)
  c.init_from_hf = str(hf_dir)
  c.train.update(eval_every=0, stop_after=1)
  train(c, str(tmp_path / "run"))
  # The first step runs at learning rate 0 (warm-up from 0), so the saved weights are the imported ones.
  want_cfg, want = hf.load_pretrained(hf_dir)
  _, got = checkpoint.load_params(tmp_path / "run" / "checkpoints", step=1)
  assert checkpoint.load_config(tmp_path / "run" / "checkpoints").d_model == want_cfg.d_model == 32
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
