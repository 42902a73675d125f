"""Runs tasks on a `LanguageModel` and aggregates: per-task scores, category means, the average, bootstrap CIs.

    results = evaluate(lm, get_tasks("jcommonsenseqa,jsquad"), data_dir="../shared/data/eval", limit=100)
    print(markdown_table(results))

Scoring modes:
  * "generative": llm-jp-eval v1.3.0 — greedy decoding, prediction `NFKC(text.split("\\n\\n")[0].strip())`,
    the task's metric against `NFKC(gold)`. These rows form the categories and the average (llm-jp-eval's AVG:
    the mean of the category means), comparable with published scores.
  * "loglik": multiple choice by the highest log-likelihood of each choice text (Stability JP harness style),
    length-normalised per `loglik_norm` ("char", "token" or "none"); reported as `<task>/loglik` rows with
    accuracy, outside the average. It gives signal long before a model learns to emit a label.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jpllm_jax.eval import metrics, prompts
from jpllm_jax.eval.lm import LanguageModel
from jpllm_jax.eval.tasks.base import CATEGORIES, Task

HARNESS_VERSION = "jpllm-eval 0.1 (llm-jp-eval v1.3.0 prompts and metrics; Stability JP harness MGSM)"
SCORINGS = ("generative", "loglik")
LOGLIK_NORMS = ("char", "token", "none")


def postprocess(generated: str) -> str:
  """llm-jp-eval's prediction: the text before the first blank line, stripped, NFKC-normalised."""
  return metrics.normalize(generated.split("\n\n")[0].strip())


def _generative(lm: LanguageModel, task: Task, examples, shots) -> tuple[list[float], list[dict[str, Any]]]:
  texts = lm.generate(prompt_list := [prompts.generative_prompt(task, ex, shots) for ex in examples],
                      task.max_new_tokens)
  metric = metrics.METRICS[task.metric]
  scores, records = [], []
  for ex, text in zip(examples, texts):
    # MGSM reads its number from the whole first paragraph; the others compare the normalised prediction.
    pred = postprocess(text)
    score = metric(pred, metrics.normalize(ex.output))
    scores.append(score)
    records.append({"id": ex.id, "generated": text, "pred": pred, "gold": ex.output, "score": score})
  if records:
    records[0]["prompt"] = prompt_list[0]  # one full prompt per task, to check the template and the shots.
  return scores, records


def choose(choice_scores, choices: Sequence[str], norm: str) -> int:
  """The index of the best choice under a length normalisation."""
  if norm == "char":
    values = [s.logprob / max(len(c), 1) for s, c in zip(choice_scores, choices)]
  elif norm == "token":
    values = [s.logprob / max(s.tokens, 1) for s in choice_scores]
  elif norm == "none":
    values = [s.logprob for s in choice_scores]
  else:
    raise ValueError(f"loglik_norm {norm!r} not in {LOGLIK_NORMS}")
  return int(np.argmax(values))


def _loglik(lm: LanguageModel, task: Task, examples, shots, norm: str) -> tuple[list[float], list[dict[str, Any]]]:
  requests = [(prompts.choice_prompt(task, ex, shots), ex.choices) for ex in examples]
  all_scores = lm.loglikelihood(requests)
  scores, records = [], []
  for ex, choice_scores in zip(examples, all_scores):
    pick = choose(choice_scores, ex.choices, norm)
    scores.append(float(pick == ex.label))
    records.append({"id": ex.id, "logprobs": [round(s.logprob, 5) for s in choice_scores], "pred": pick,
                    "gold": ex.label, "score": scores[-1]})
  if records:
    records[0]["prompt"] = requests[0][0]
  return scores, records


def evaluate(lm: LanguageModel, tasks: Sequence[Task], *, data_dir: str, shots: int | None = None,
             limit: int | None = None, scoring: Sequence[str] = SCORINGS, loglik_norm: str = "char",
             n_bootstrap: int = 1000, seed: int = 0, keep_predictions: bool = True) -> dict[str, Any]:
  """Scores, category means, the average and their 95% bootstrap intervals, with settings and predictions.

  `shots` None: 4 (llm-jp-eval's and the Stability harness's setting). `limit`: the first N test examples
  (LLM-jp's routine evaluation uses 100).
  """
  unknown = set(scoring) - set(SCORINGS)
  if unknown:
    raise ValueError(f"unknown scoring {sorted(unknown)}; known: {SCORINGS}")
  if loglik_norm not in LOGLIK_NORMS:
    raise ValueError(f"loglik_norm {loglik_norm!r} not in {LOGLIK_NORMS}")
  shots = 4 if shots is None else shots
  per_example: dict[str, list[float]] = {}
  rows: dict[str, dict[str, Any]] = {}
  predictions: dict[str, list[dict[str, Any]]] = {}
  for task in tasks:
    splits = task.splits(data_dir)
    examples = splits.test[:limit] if limit else splits.test
    few = prompts.fewshots(task, splits.fewshot_pool, shots)
    modes = [m for m in scoring if m == "generative" or task.supports_loglik]
    for mode in modes:
      start = time.perf_counter()
      if mode == "generative":
        name, metric = task.name, task.metric
        scores, records = _generative(lm, task, examples, few)
      else:
        name, metric = f"{task.name}/loglik", f"acc_{loglik_norm}"
        scores, records = _loglik(lm, task, examples, few, loglik_norm)
      per_example[name] = scores
      rows[name] = {"task": task.name, "category": task.category, "scoring": mode, "metric": metric,
                    "n": len(scores), "score": float(np.mean(scores)) if scores else float("nan"),
                    "seconds": round(time.perf_counter() - start, 3), "note": splits.note}
      if keep_predictions:
        predictions[name] = records

  replicates = metrics.bootstrap_means(per_example, n_resamples=n_bootstrap, seed=seed) if n_bootstrap else None
  for name, row in rows.items():
    row["ci95"] = _interval(None if replicates is None else replicates[name])
  categories, average = _aggregate(rows, replicates)
  return {
      "harness": HARNESS_VERSION,
      "settings": {"shots": shots, "limit": limit, "tasks": [t.name for t in tasks], "scoring": list(scoring),
                   "loglik_norm": loglik_norm, "batch_size": lm.batch_size, "max_len": lm.max_len,
                   "bootstrap": n_bootstrap, "seed": seed, "decoding": "greedy", "data_dir": str(data_dir),
                   "truncated_prompts": lm.counters.truncated_prompts},
      "scores": rows, "categories": categories, "average": average,
      **({"predictions": predictions} if keep_predictions else {}),
  }


def _interval(replicates: np.ndarray | None) -> list[float] | None:
  return None if replicates is None else list(metrics.percentile_interval(replicates))


def _aggregate(rows, replicates) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Category means of the generative rows and their mean (AVG), each with a bootstrap interval (if any)."""
  members: dict[str, list[str]] = {}
  for name, row in rows.items():
    if row["scoring"] == "generative":
      members.setdefault(row["category"], []).append(name)
  categories, cat_reps = {}, []
  for cat in CATEGORIES:
    if cat not in members:
      continue
    reps = None if replicates is None else np.mean([replicates[n] for n in members[cat]], axis=0)
    cat_reps.append(reps)
    categories[cat] = {"score": float(np.mean([rows[n]["score"] for n in members[cat]])), "tasks": members[cat],
                       "ci95": _interval(reps)}
  if not categories:
    return categories, None
  average = {"score": float(np.mean([c["score"] for c in categories.values()])),
             "ci95": _interval(None if replicates is None else np.mean(cat_reps, axis=0)),
             "definition": "mean of the category means (llm-jp-eval AVG)"}
  return categories, average


def _ci_text(ci: list[float] | None) -> str:
  return "" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def markdown_table(results: dict[str, Any]) -> str:
  """The scores as a Markdown table: one row per task and scoring, then the categories and the average."""
  lines = ["| task | category | metric | n | score | 95% CI |", "|---|---|---|---:|---:|---|"]
  for name, row in results["scores"].items():
    lines.append(f"| {name} | {row['category']} | {row['metric']} | {row['n']} | {row['score']:.4f} | "
                 f"{_ci_text(row['ci95'])} |")
  for cat, c in results["categories"].items():
    lines.append(f"| **{cat}** ({CATEGORIES[cat]}) | | mean | | {c['score']:.4f} | {_ci_text(c['ci95'])} |")
  if results["average"]:
    avg = results["average"]
    lines.append(f"| **AVG** | | mean of categories | | {avg['score']:.4f} | {_ci_text(avg['ci95'])} |")
  s = results["settings"]
  notes = [f"- {n}: {r['note']}" for n, r in results["scores"].items() if r.get("note")]
  return "\n".join(lines + ["", f"{results['harness']}; shots={s['shots']}, limit={s['limit']}, "
                                f"loglik_norm={s['loglik_norm']}", *notes]) + "\n"
