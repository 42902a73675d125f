"""Prompt construction: llm-jp-eval v1.3.0's instruction template and the Stability JP harness's MGSM format.

llm-jp-eval:
    以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\\n\\n### 指示:\\n{instruction}
    + for each shot: \\n\\n### 入力:\\n{input}\\n\\n### 応答:\\n{output}
    + \\n\\n### 入力:\\n{input}\\n\\n### 応答:\\n
The shots are the first N of the task's few-shot pool (shuffled with seed 42 by the task loader).

Log-likelihood multiple choice uses the same template with the task's `mc_instruction`, shots answered with the
gold choice text, and each choice text scored as the continuation of the prompt.
"""
from __future__ import annotations

from jpllm_jax.eval.tasks.base import Example, Task

HEADER = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n### 指示:\n"


def _llm_jp_eval(instruction: str, shots: list[tuple[str, str]], query: str) -> str:
  parts = [HEADER + instruction]
  parts += [f"\n\n### 入力:\n{inp}\n\n### 応答:\n{out}" for inp, out in shots]
  parts.append(f"\n\n### 入力:\n{query}\n\n### 応答:\n")
  return "".join(parts)


def fewshots(task: Task, pool: list[Example], shots: int) -> list[Example]:
  if shots > len(pool):
    raise ValueError(f"task {task.name}: {shots} shots requested but the few-shot pool has {len(pool)} examples")
  return pool[:shots]


def generative_prompt(task: Task, example: Example, shots: list[Example]) -> str:
  """The prompt whose greedy continuation is the prediction."""
  if task.style == "mgsm":
    parts = [f"{s.input}\n{s.output}" for s in shots]
    parts.append(f"問題：{example.input}\nステップごとの答え：")
    return "\n\n".join(parts)
  return _llm_jp_eval(task.instruction, [(s.input, s.output) for s in shots], example.input)


def choice_prompt(task: Task, example: Example, shots: list[Example]) -> str:
  """The context of log-likelihood multiple choice; the continuations are `example.choices`."""
  if not task.supports_loglik:
    raise ValueError(f"task {task.name} has no log-likelihood multiple-choice form")
  return _llm_jp_eval(task.mc_instruction, [(s.input, s.choices[s.label]) for s in shots], example.input)
