"""JMMLU: 53 subjects of four-way multiple choice (the answer is a letter).

As in llm-jp-eval v1.3.0, each subject (in file-name order) is shuffled with seed 42 and halved: the first half
goes to the dev split (the few-shot pool) and the second half to the test split; the splits concatenate the
subjects, so few-shots come from the first subject's dev half.
"""
from __future__ import annotations

import csv
import pathlib

from jpllm_jax.eval.tasks.base import Example, Splits, Task, register, seeded_shuffle

LETTERS = "ABCD"


def _read(path: pathlib.Path) -> list[Example]:
  examples = []
  with path.open(encoding="utf-8-sig", newline="") as f:
    for i, row in enumerate(csv.reader(f)):
      if len(row) != 6 or row[5].strip() not in LETTERS:
        raise ValueError(f"{path}:{i + 1}: expected question,A,B,C,D,answer; got {row!r}")
      question, *choices, answer = row
      text = ",".join(f"{letter}.{c}" for letter, c in zip(LETTERS, choices))
      examples.append(Example(input=f"質問：{question}\n選択肢：{text}", output=answer.strip(),
                              id=f"{path.stem}/{i}", choices=tuple(choices), label=LETTERS.index(answer.strip())))
  return examples


def load(folder: pathlib.Path) -> Splits:
  dev, test = [], []
  for path in sorted(folder.glob("*.csv")):
    samples = seeded_shuffle(_read(path))
    half = len(samples) // 2
    dev.extend(samples[:half])
    test.extend(samples[half:])
  return Splits(test=test, fewshot_pool=dev)


TASK = register(Task(
    name="jmmlu", category="HE", load=load, max_new_tokens=1, metric="exact_match",
    instruction=("与えられた質問と選択肢から、最も適切な回答を選択してください。なお、回答には選択肢のアルファベット"
                 "（例：A）のみを含め、他には何も含めないことを厳守してください。"),
    mc_instruction="与えられた質問と選択肢から、最も適切な回答を選択してください。"))
