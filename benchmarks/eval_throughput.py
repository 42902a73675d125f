r"""Evaluation throughput on CPU: examples/s of generative and log-likelihood scoring, batched vs one by one.

  python benchmarks/eval_throughput.py [--examples=16] [--batch_size=8] [--repeats=3]

A random Llama of the main job's shape (d_model 256, 4 layers, GQA 8/4, d_ff 768) with the Mistral-7B tokenizer
(32,000 pieces) scores the first N examples of JEMHopQA (generative, 4-shot, up to 15 new tokens, greedy) and of
JCommonsenseQA (log-likelihood of the 5 choice texts, 4-shot). Each setting runs once to compile, then
--repeats timed runs, and reports the median (single runs swing with the load of a shared machine); both settings
must give the same scores. Prints a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import statistics
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jpllm_jax.cpu import use_huge_pages  # noqa: E402

use_huge_pages()

import jax  # noqa: E402

from jpllm_jax import models  # noqa: E402
from jpllm_jax.eval import LanguageModel, prompts  # noqa: E402
from jpllm_jax.eval.tasks import TASKS  # noqa: E402
from jpllm_jax.tokenizer import load_tokenizer  # noqa: E402

EVAL_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "eval")


def _timed(fn, repeats: int):
  """fn's output and its median wall time over `repeats` runs after a compiling run."""
  out = fn()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return out, statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--examples", type=int, default=16)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  sp = load_tokenizer()
  cfg = models.preset("llama2-7b", vocab_size=32000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=768,
                      max_seq_len=4096)
  params = models.init(cfg, jax.random.key(0))

  gen_task, mc_task = TASKS["jemhopqa"], TASKS["jcommonsenseqa"]
  gen_splits, mc_splits = gen_task.splits(EVAL_DATA), mc_task.splits(EVAL_DATA)
  gen_shots = prompts.fewshots(gen_task, gen_splits.fewshot_pool, 4)
  mc_shots = prompts.fewshots(mc_task, mc_splits.fewshot_pool, 4)
  gen_prompts = [prompts.generative_prompt(gen_task, ex, gen_shots) for ex in gen_splits.test[:args.examples]]
  requests = [(prompts.choice_prompt(mc_task, ex, mc_shots), ex.choices) for ex in mc_splits.test[:args.examples]]
  prompt_tokens = sum(len(sp.encode(p)) for p in gen_prompts) / len(gen_prompts)
  mc_tokens = sum(len(sp.encode(c)) for c, _ in requests) / len(requests)

  results = {}
  for name, batch in (("batched", args.batch_size), ("one_by_one", 1)):
    lm = LanguageModel(cfg, params, sp, batch_size=batch)
    texts, gen_s = _timed(lambda: lm.generate(gen_prompts, gen_task.max_new_tokens), args.repeats)
    scores, mc_s = _timed(lambda: lm.loglikelihood(requests), args.repeats)
    results[name] = {"generative_examples_per_s": round(args.examples / gen_s, 3),
                     "loglik_examples_per_s": round(args.examples / mc_s, 3), "texts": texts,
                     "logprobs": [[s.logprob for s in r] for r in scores]}
    print(f"{name} (batch {batch}): generative {gen_s:.2f} s, loglik {mc_s:.2f} s for {args.examples} examples "
          f"(median of {args.repeats})",
          flush=True)
  same_texts = results["batched"].pop("texts") == results["one_by_one"].pop("texts")
  a, b = results["batched"].pop("logprobs"), results["one_by_one"].pop("logprobs")
  max_lp_diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
  out = {"benchmark": "eval_throughput", "device": jax.devices()[0].platform, "examples": args.examples,
         "batch_size": args.batch_size, "repeats": args.repeats,
         "model_params_m": round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 2),
         "mean_prompt_tokens": {"jemhopqa_4shot": round(prompt_tokens, 1), "jcommonsenseqa_4shot": round(mc_tokens, 1)},
         **results,
         "speedup": {k: round(results["batched"][k] / results["one_by_one"][k], 2)
                     for k in ("generative_examples_per_s", "loglik_examples_per_s")},
         "same_predictions": same_texts, "max_logprob_diff": max_lp_diff}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
