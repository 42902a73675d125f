"""MGSM (Japanese): grade-school maths word problems with chain-of-thought (Stability JP harness prompt).

The prompt is `問題：{question}\\nステップごとの答え：` after the first N of the 8 worked exemplars, separated by blank
lines; the score is the last number of the generation compared with the integer answer.
"""
from __future__ import annotations

import json
import pathlib

from jpllm_jax.eval.tasks.base import Example, Splits, Task, register


def load(folder: pathlib.Path) -> Splits:
  test = []
  for i, line in enumerate((folder / "mgsm_ja.tsv").read_text(encoding="utf-8").splitlines()):
    if line.strip():
      question, answer = line.rsplit("\t", 1)
      test.append(Example(input=question.strip(), output=answer.strip(), id=str(i)))
  pool = []
  for line in (folder / "mgsm_ja_exemplars.jsonl").read_text(encoding="utf-8").splitlines():
    if line.strip():
      d = json.loads(line)
      pool.append(Example(input=d["question"], output=d["answer"], id=str(d["id"])))
  return Splits(test=test, fewshot_pool=pool)


TASK = register(Task(name="mgsm", category="MR", load=load, instruction="", max_new_tokens=256,
                     metric="mgsm_match", style="mgsm"))
