"""JEMHopQA: Japanese multi-hop QA with short answers (YES/NO for comparisons). llm-jp-eval v1.3.0 evaluates dev
(120) with few-shots from train shuffled with seed 42."""
from __future__ import annotations

import json
import pathlib

from jpllm_jax.eval.tasks.base import Example, Splits, Task, register, seeded_shuffle


def _read(path: pathlib.Path) -> list[Example]:
  return [Example(input=f"質問：{d['question']}", output=d["answer"], id=d["qid"])
          for d in json.loads(path.read_text(encoding="utf-8"))]


def load(folder: pathlib.Path) -> Splits:
  return Splits(test=_read(folder / "dev.json"), fewshot_pool=seeded_shuffle(_read(folder / "train.json")))


TASK = register(Task(
    name="jemhopqa", category="QA", load=load, max_new_tokens=15, metric="char_f1",
    instruction=("質問を入力とし、回答を出力してください。回答の他には何も含めないことを厳守してください。"
                 "回答が'はい'と'いいえ'で答えることができる場合、'YES'と'NO'で答えてください。")))
