"""The harness's scoring: log-likelihoods equal those of transformers; batching does not change results."""
from __future__ import annotations

import jax
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


def test_prompts_longer_than_max_len_are_cut_from_the_left_and_counted():
  cfg = models.preset("llama2-7b", vocab_size=32000, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
                      max_seq_len=128)
  params = models.init(cfg, jax.random.key(0))
  lm = LanguageModel(cfg, params, load_tokenizer(), batch_size=2)
  long = "日本語の文章です。" * 60
  out = lm.generate([long, "短い"], max_new_tokens=4)
  assert len(out) == 2 and lm.counters.truncated_prompts == 1
  scores = lm.loglikelihood([(long, ["はい", "いいえ"])])
  assert len(scores[0]) == 2 and lm.counters.truncated_prompts == 2
  assert harness.choose(scores[0], ["はい", "いいえ"], "none") in (0, 1)
