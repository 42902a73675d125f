"""JCommonsenseQA (JGLUE): five-way commonsense multiple choice. llm-jp-eval v1.3.0 evaluates valid-v1.1 (1,119)
with few-shots from the train set shuffled with seed 42; the answer is the choice number."""
from __future__ import annotations

import json
import pathlib

from jpllm_jax.eval.tasks.base import Example, Splits, Task, register, seeded_shuffle


def _read(path: pathlib.Path) -> list[Example]:
  examples = []
  for line in path.read_text(encoding="utf-8").splitlines():
    if not line.strip():
      continue
    d = json.loads(line)
    choices = tuple(d[f"choice{i}"] for i in range(5))
    text = ",".join(f"{i}.{c}" for i, c in enumerate(choices))
    examples.append(Example(input=f"質問：{d['question']}\n選択肢：{text}", output=str(d["label"]),
                            id=str(d["q_id"]), choices=choices, label=int(d["label"])))
  return examples


def load(folder: pathlib.Path) -> Splits:
  return Splits(test=_read(folder / "valid-v1.1.json"), fewshot_pool=seeded_shuffle(_read(folder / "train-v1.3.json")))


TASK = register(Task(
    name="jcommonsenseqa", category="MC", load=load, max_new_tokens=1, metric="exact_match",
    instruction=("質問と回答の選択肢を入力として受け取り、選択肢から回答を選択してください。なお、回答は選択肢の番号（例：0）"
                 "でするものとします。 回答となる数値をint型で返し、他には何も含めないことを厳守してください。"),
    mc_instruction="質問と回答の選択肢を入力として受け取り、選択肢から最も適切な回答を選択してください。"))
