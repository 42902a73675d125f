r"""Japanese evaluation of a checkpoint: llm-jp-eval v1.3.0 tasks (JCommonsenseQA, JEMHopQA, NIILC, JSQuAD, JMMLU)
and MGSM, generative and log-likelihood multiple choice, with bootstrap 95% intervals.

  python -m experiments.eval --workdir=/tmp/jpllm-default --output=/tmp/jpllm-default/eval.json --limit=100
  python -m experiments.eval --hf_dir=/models/Swallow-7b-hf --output=results.json --tasks=jcommonsenseqa,jsquad

Writes the results JSON (scores, settings, harness version, tokenizer, checkpoint step, per-example predictions)
and a Markdown table next to it (`.md`), and prints the table.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

from absl import app, flags, logging

from jpllm_jax import eval as jeval

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.normpath(os.path.join(_REPO, "..", "shared", "data", "eval"))

flags.DEFINE_string("workdir", None, "Training run (or save_params directory) to evaluate.")
flags.DEFINE_string("hf_dir", None, "Hugging Face model directory to evaluate (config.json + safetensors).")
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
flags.DEFINE_string("tokenizer", None, "SentencePiece model (default: the run's, or <hf_dir>/tokenizer.model).")
flags.DEFINE_string("output", None, "Results JSON path (required); the Markdown table goes next to it as .md.")
flags.DEFINE_string("tasks", "all", f"Comma-separated tasks, or all: {','.join(jeval.TASKS)}.")
flags.DEFINE_integer("limit", None, "Evaluate the first N examples of each task (LLM-jp's routine: 100).")
flags.DEFINE_integer("shots", 4, "Few-shot examples per prompt.")
flags.DEFINE_list("scoring", list(jeval.SCORINGS), "generative and/or loglik (multiple-choice tasks).")
flags.DEFINE_enum("loglik_norm", "char", ["char", "token", "none"], "Length normalisation of choice log-likelihoods.")
flags.DEFINE_integer("batch_size", 8, "Prompts per batch.")
flags.DEFINE_integer("max_len", None, "Longest prompt + generation in tokens (default: the model's max_seq_len).")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the 95% intervals.")
flags.DEFINE_string("data_dir", DEFAULT_DATA, "Evaluation data (the folders of ../shared/data/eval).")
flags.DEFINE_bool("predictions", True, "Keep per-example predictions in the JSON.")
FLAGS = flags.FLAGS


def run_eval(lm: jeval.LanguageModel, model_info: dict, output: str | pathlib.Path) -> dict:
  """Evaluates with the flags' settings and writes the JSON and the Markdown table."""
  start = time.perf_counter()
  results = jeval.evaluate(lm, _tasks(), data_dir=FLAGS.data_dir, shots=FLAGS.shots,
                           limit=FLAGS.limit, scoring=FLAGS.scoring, loglik_norm=FLAGS.loglik_norm,
                           n_bootstrap=FLAGS.bootstrap, keep_predictions=FLAGS.predictions)
  results = {"model": model_info, **results, "seconds": round(time.perf_counter() - start, 2)}
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.with_suffix(output.suffix + ".tmp")
  tmp.write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
  tmp.replace(output)
  table = jeval.markdown_table(results)
  output.with_suffix(".md").write_text(table, encoding="utf-8")
  return results


def _tasks() -> list:
  try:
    return jeval.get_tasks(FLAGS.tasks)
  except ValueError as e:
    raise app.UsageError(f"--tasks: {e}") from None


def main(argv):
  del argv
  if bool(FLAGS.workdir) == bool(FLAGS.hf_dir):
    raise app.UsageError("give exactly one of --workdir and --hf_dir")
  if not FLAGS.output:
    raise app.UsageError("--output is required")
  _tasks()  # names and scoring modes are checked before a model is loaded
  unknown = sorted(set(FLAGS.scoring) - set(jeval.SCORINGS))
  if unknown:
    raise app.UsageError(f"--scoring: unknown {unknown}; use one or more of {list(jeval.SCORINGS)}")
  try:
    cfg, params, sp, info = jeval.load_model(workdir=FLAGS.workdir, hf_dir=FLAGS.hf_dir, step=FLAGS.step,
                                             tokenizer=FLAGS.tokenizer)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  logging.info("evaluating %s step %s (%s, %.2fM params)", info["path"], info["step"], cfg.family,
               info["n_params"] / 1e6)
  lm = jeval.LanguageModel(cfg, params, sp, batch_size=FLAGS.batch_size, max_len=FLAGS.max_len)
  results = run_eval(lm, info, FLAGS.output)
  print(jeval.markdown_table(results))
  print(f"wrote {FLAGS.output} and {pathlib.Path(FLAGS.output).with_suffix('.md')} in {results['seconds']} s")


if __name__ == "__main__":
  app.run(main)
