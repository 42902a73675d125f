"""The training recipe and start-up: LLM-jp optimizer defaults, config errors that say what to change, the
logs of a run, and continual pre-training from an imported Hugging Face checkpoint."""
from __future__ import annotations

import json
import types

import jax
import numpy as np
import pytest
import transformers

from experiments.configs import default
from jpllm_jax import checkpoint, hf, models
from jpllm_jax.models import llama
from jpllm_jax.parallel import check_model_fits_mesh, mesh_shape
from jpllm_jax.tokenizer import mistral_v1_path
from jpllm_jax.train import flops
from jpllm_jax.train.loop import train
from jpllm_jax.train.optimizer import decay_mask, lr_schedule, make_optimizer


def test_schedule_warms_up_linearly_then_decays_to_ten_percent():
  s = lr_schedule(1e-3, warmup_steps=100, total_steps=1000)
  np.testing.assert_allclose([s(0), s(50), s(100), s(1000)], [0.0, 5e-4, 1e-3, 1e-4], rtol=1e-6)
  mid = float(s(550))  # half-way through the cosine: the mean of peak and floor.
  np.testing.assert_allclose(mid, (1e-3 + 1e-4) / 2, rtol=1e-4)


def test_weight_decay_skips_norms_and_biases():
  cfg = models.preset("llm-jp-13b-v1", n_layers=1, d_model=64, n_heads=4, n_kv_heads=4, d_ff=128,
                      vocab_size=128)
  mask = decay_mask(models.param_shapes(cfg))
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["['embed']['embedding']"] and flat["['layers']['mlp']['up']['kernel']"]
  assert not any(v for k, v in flat.items() if "norm" in k or "bias" in k)
  assert any("bias" in k for k in flat)


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
  cfg = checkpoint.load_config(tmp_path / "checkpoints")
  np.testing.assert_allclose(records[-1]["model_tflops"],
                             records[-1]["tokens_per_s"] * flops.train_flops_per_token(cfg, 32) / 1e12, rtol=1e-4)
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
