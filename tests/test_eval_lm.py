"""The harness's scoring: log-likelihoods equal those of transformers; batching does not change results."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jpllm_jax import hf, models
from jpllm_jax.eval import LanguageModel, harness, prompts
from jpllm_jax.eval.tasks import TASKS
from jpllm_jax.tokenizer import load_tokenizer

import hf_helpers
from conftest import SHARED_DATA


def _hf_choice_logprob(model, prefix: list[int], cont: list[int]) -> float:
  ids = torch.tensor([prefix + cont])
  with torch.no_grad():
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
  return float(sum(logp[len(prefix) - 1 + i, t] for i, t in enumerate(cont)))


def test_loglikelihoods_equal_transformers_on_jcommonsenseqa_prompts(tmp_path):
  sp = load_tokenizer()  # Mistral-7B's 32,000 pieces
  config = hf_helpers.hf_config("llama3")
  config.vocab_size = sp.get_piece_size()
  config.max_position_embeddings = 2048
  torch.manual_seed(0)
  model = hf_helpers.transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_pretrained(tmp_path)
  lm = LanguageModel(cfg, params, sp, batch_size=2)  # 3 requests: a padded batch and a dummy row

  task = TASKS["jcommonsenseqa"]
  splits = task.splits(SHARED_DATA / "eval")
  shots = prompts.fewshots(task, splits.fewshot_pool, 1)
  requests = [(prompts.choice_prompt(task, ex, shots), ex.choices) for ex in splits.test[:3]]
  ours = lm.loglikelihood(requests)
  checked = 0
  for (context, choices), scores in zip(requests, ours):
    prefix, conts = lm._split(context, choices)
    assert prefix == lm.encode(context)  # the context ends at a piece boundary ("\n")
    for choice, cont, score in zip(choices, conts, scores):
      assert cont == lm.encode(context + choice)[len(prefix):] and score.tokens == len(cont)
      reference = _hf_choice_logprob(model, prefix, cont)
      assert abs(score.logprob - reference) <= 1e-4, (choice, score.logprob, reference)
      checked += 1
  assert checked == 15


def test_batched_scoring_equals_one_by_one():
  cfg = models.preset("llama2-7b", vocab_size=32000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128,
                      max_seq_len=1024, init_std=0.3)
  params = models.init(cfg, jax.random.key(1))
  sp = load_tokenizer()
  task = TASKS["jemhopqa"]
  splits = task.splits(SHARED_DATA / "eval")
  shots = prompts.fewshots(task, splits.fewshot_pool, 2)
  texts = [prompts.generative_prompt(task, ex, shots) for ex in splits.test[:5]]
  batched = LanguageModel(cfg, params, sp, batch_size=4).generate(texts, max_new_tokens=6)
  single = LanguageModel(cfg, params, sp, batch_size=1).generate(texts, max_new_tokens=6)
  assert batched == single and any(batched)

  mc = TASKS["jcommonsenseqa"]
  mc_splits = mc.splits(SHARED_DATA / "eval")
  requests = [(prompts.choice_prompt(mc, ex, mc_splits.fewshot_pool[:1]), ex.choices) for ex in mc_splits.test[:5]]
  a = LanguageModel(cfg, params, sp, batch_size=4).loglikelihood(requests)
  b = LanguageModel(cfg, params, sp, batch_size=1).loglikelihood(requests)
  np.testing.assert_allclose([[s.logprob for s in r] for r in a], [[s.logprob for s in r] for r in b], atol=1e-4)


_forward = jax.jit(models.forward, static_argnums=0)


def _reference_logprobs(cfg, params, ids: list[int], n_cont: int) -> tuple[np.ndarray, float]:
  """Plain forward over the whole row: the last position's log-probs and the summed log-prob of the last
  `n_cont` tokens as the continuation of the rest. (Rows are right-padded to one shape: a causal model's
  earlier positions do not see the padding.)"""
  padded = jnp.asarray([ids + [0] * (cfg.max_seq_len - len(ids))])
  logp = np.asarray(jax.nn.log_softmax(_forward(cfg, params, padded)[0]), np.float64)[:len(ids)]
  start = len(ids) - n_cont
  return logp[-1], float(sum(logp[start - 1 + i, t] for i, t in enumerate(ids[start:])))


def test_prompts_longer_than_max_len_are_cut_from_the_left_and_counted():
  cfg = models.preset("llama2-7b", vocab_size=32000, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
                      max_seq_len=128, init_std=0.3)
  params = models.init(cfg, jax.random.key(0))
  lm = LanguageModel(cfg, params, load_tokenizer(), batch_size=2)
  long = "".join(f"{i}番目の文です。" for i in range(40)) + "\n"  # its left and right ends differ
  ids = lm.encode(long)
  choices = ["はい", "いいえ", "たぶん", "わかりません"]
  assert len(ids) > cfg.max_seq_len and lm._split(long, choices)[0] == ids  # "\n" ends a piece
  # Generation: BOS and the rightmost max_len - max_new_tokens - 1 tokens, continued greedily.
  out = lm.generate([long, "短い"], max_new_tokens=4)
  assert len(out) == 2 and lm.counters.truncated_prompts == 1
  row = lm.bos + ids[-(cfg.max_seq_len - 4 - 1):]
  for _ in range(4):
    row.append(int(np.argmax(_reference_logprobs(cfg, params, row, 1)[0])))
  assert out[0] == lm.sp.decode(row[-4:])
  # Log-likelihood: BOS and the rightmost max_len - 8 - 1 tokens (continuations take 8 slots).
  scores = lm.loglikelihood([(long, choices)])[0]
  assert lm.counters.truncated_prompts == 2
  kept = lm.bos + ids[-(cfg.max_seq_len - 8 - 1):]
  conts = [lm.encode(long + c)[len(ids):] for c in choices]
  ref = [_reference_logprobs(cfg, params, kept + c, len(c))[1] for c in conts]
  np.testing.assert_allclose([s.logprob for s in scores], ref, atol=1e-4)
  left = [_reference_logprobs(cfg, params, ids[:len(kept)] + c, len(c))[1] for c in conts]
  assert np.abs(np.array(left) - ref).max() > 1e-2  # keeping the leftmost tokens would have scored otherwise
  # The harness picks the argmax of the normalised scores.
  for norm, values in (("none", ref), ("token", [r / len(c) for r, c in zip(ref, conts)]),
                       ("char", [r / len(c) for r, c in zip(ref, choices)])):
    assert harness.choose(scores, choices, norm) == int(np.argmax(values)), norm
