"""JSQuAD (JGLUE): extractive reading comprehension; gold = the first answer text. llm-jp-eval v1.3.0 evaluates
valid-v1.1 (4,442 questions); the few-shot pool here is test-v1.3 shuffled with seed 42 (the train set is not
shipped)."""
from __future__ import annotations

import json
import pathlib

from jpllm_jax.eval.tasks.base import Example, Splits, Task, register, seeded_shuffle


def _read(path: pathlib.Path) -> list[Example]:
  examples = []
  for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
    for paragraph in article["paragraphs"]:
      for qa in paragraph["qas"]:
        examples.append(Example(input=f"文章：{paragraph['context']}\n質問：{qa['question']}",
                                output=qa["answers"][0]["text"], id=qa["id"]))
  return examples


def load(folder: pathlib.Path) -> Splits:
  return Splits(test=_read(folder / "valid-v1.1.json"), fewshot_pool=seeded_shuffle(_read(folder / "test-v1.3.json")),
                note="few-shot pool: test-v1.3 (the train set is not shipped)")


TASK = register(Task(
    name="jsquad", category="RC", load=load, max_new_tokens=25, metric="char_f1",
    instruction="質問に対する回答を文章から一言で抽出してください。回答は名詞で答えてください。 それ以外には何も含めないことを厳守してください。"))
