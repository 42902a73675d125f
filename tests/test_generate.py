"""KV-cache generation: equal to a full-forward reference loop and to Hugging Face `generate`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpllm_jax import models
from jpllm_jax.generate import generate

from conftest import tiny_configs

PROMPTS = [[5, 17, 3, 44, 9, 12, 70], [8, 2], [33, 61, 7, 7]]


def _reference_greedy(cfg, params, prompt, n):
  """Greedy decoding by re-running the full forward pass on the whole sequence at every step."""
  fwd = jax.jit(models.forward, static_argnums=0)
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(jnp.argmax(fwd(cfg, params, jnp.asarray([seq]))[0, -1])))
  return seq[len(prompt):]


def test_batched_greedy_equals_full_forward_loop(tiny_config):
  params = models.init(tiny_config, jax.random.key(0))
  outs = generate(tiny_config, params, PROMPTS, max_new_tokens=8, pad_multiple=4)
  assert outs == [_reference_greedy(tiny_config, params, p, 8) for p in PROMPTS]


def test_eos_stops_each_row_and_is_kept():
  cfg = tiny_configs()["llama3"]
  params = models.init(cfg, jax.random.key(0))
  free = generate(cfg, params, PROMPTS, max_new_tokens=8)
  eos = free[0][3]  # the 4th greedy token of row 0 becomes the end-of-sequence id.
  outs = generate(cfg, params, PROMPTS, max_new_tokens=8, eos_id=eos)
  for row, full in zip(outs, free):
    expect = full[:full.index(eos) + 1] if eos in full else full
    assert row == expect
  assert len(outs[0]) <= 4


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
  cfg = tiny_configs()["gpt"]
  params = models.init(cfg, jax.random.key(1))
  greedy = generate(cfg, params, PROMPTS, max_new_tokens=6)
  assert generate(cfg, params, PROMPTS, max_new_tokens=6, temperature=1.0, top_k=1) == greedy
  assert generate(cfg, params, PROMPTS, max_new_tokens=6, temperature=0.7, top_p=1e-6) == greedy
  a = generate(cfg, params, PROMPTS, max_new_tokens=6, temperature=1.0, rng=jax.random.key(7))
  b = generate(cfg, params, PROMPTS, max_new_tokens=6, temperature=1.0, rng=jax.random.key(7))
  c = generate(cfg, params, PROMPTS, max_new_tokens=6, temperature=1.0, rng=jax.random.key(8))
  assert a == b and a != c


def test_top_k_sampling_only_draws_from_the_top_k():
  from jpllm_jax.generate import sample_logits
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4096, 50)), jnp.float32)
  draws = sample_logits(logits, jax.random.key(0), temperature=1.0, top_k=3, top_p=None)
  top3 = jax.lax.top_k(logits, 3)[1]
  assert bool(jnp.all(jnp.any(top3 == draws[:, None], axis=1)))


def test_bad_requests_get_clear_errors():
  cfg = tiny_configs()["gpt"]
  params = models.init(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="at least one token"):
    generate(cfg, params, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="learned positions"):
    generate(cfg, params, [[1] * 60], max_new_tokens=10)


# ------------------------------------------------------------------------------ Hugging Face parity
HF_FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]


def _tiny_hf_model(family: str):
  import torch
  import transformers as tf
  torch.manual_seed(0)
  common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if family == "llama":
    config = tf.LlamaConfig(**common, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                       "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 32})
    model = tf.LlamaForCausalLM(config)
  elif family == "mistral":
    model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=6))
  elif family == "qwen2":
    model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True))
  else:
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                             initializer_range=0.2, bos_token_id=1, eos_token_id=2))
  return model.eval()


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_greedy_generation_equals_hugging_face(family, tmp_path):
  import torch
  from jpllm_jax import hf
  model = _tiny_hf_model(family)
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_pretrained(str(tmp_path))
  prompts = [[1, 17, 3, 44, 9, 12, 70, 21, 5, 99], [1, 8], [1, 33, 61, 7, 7]]
  n_new = 12
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
  expected = ref[:, width:].tolist()
  ours = generate(cfg, params, prompts, max_new_tokens=n_new)
  assert ours == expected


def test_stop_table_ends_rows_at_a_two_token_stop_string():
  cfg = tiny_configs()["llama3"]
  params = models.init(cfg, jax.random.key(0))
  free = generate(cfg, params, PROMPTS, max_new_tokens=8, pad_to=16)
  assert free == generate(cfg, params, PROMPTS, max_new_tokens=8)
  table = np.zeros((cfg.vocab_size, 3), bool)
  table[free[0][1], 1] = True  # row 0: its 2nd token ends with the first half of the stop string,
  table[free[0][2], 2] = True  # its 3rd starts with the second half: it stops after 3 tokens.
  stopped = generate(cfg, params, PROMPTS, max_new_tokens=8, stop_table=table)
  assert stopped[0] == free[0][:3]
  whole = np.zeros((cfg.vocab_size, 3), bool)
  whole[free[1][0], 0] = True  # a token that contains the whole stop string stops its row at once.
  stopped = generate(cfg, params, PROMPTS, max_new_tokens=8, stop_table=whole)
  assert stopped[1] == free[1][:1]
  for got, ref in zip(stopped, free):
    assert got == ref[:len(got)]
  with pytest.raises(ValueError, match="shorter than the longest prompt"):
    generate(cfg, params, PROMPTS, max_new_tokens=2, pad_to=4)
