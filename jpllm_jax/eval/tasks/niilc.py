"""NIILC: encyclopaedic questions; several answers are joined with ",", and "-" answers are skipped.

Only the dev XML is shipped here. As llm-jp-eval v1.3.0 does with it, it is shuffled with seed 42 and split 90/10:
the first 90% is the few-shot pool and the last 10% (80 questions, llm-jp-eval's "dev" split) is evaluated. The
published NIILC scores use the official test file, so scores here are on a different (smaller) set.
"""
from __future__ import annotations

import pathlib
import xml.etree.ElementTree as ET

from jpllm_jax.eval.tasks.base import Example, Splits, Task, register, seeded_shuffle


def _read(path: pathlib.Path) -> tuple[list[Example], int]:
  """The questions with at least one answer other than "-", and the number of questions without one."""
  examples, unanswered = [], 0
  for q in ET.parse(path).getroot().iter("question"):
    answers = [a for a in ((x.text or "").strip() for x in q.iter("answer")) if a and a != "-"]
    if not answers:
      unanswered += 1
      continue
    examples.append(Example(input=f"質問：{(q.findtext('text') or '').strip()}", output=",".join(answers),
                            id=q.get("id", "")))
  return examples, unanswered


def load(folder: pathlib.Path) -> Splits:
  samples, unanswered = _read(folder / "NIILC-ECQA2015_dev.xml")
  samples = seeded_shuffle(samples)
  cut = int(len(samples) * 0.9)
  return Splits(test=samples[cut:], fewshot_pool=samples[:cut],
                note=f"the official test file is not shipped: the last 10% of dev ({len(samples) - cut} questions, "
                     f"shuffled with seed 42) is evaluated, the first 90% is the few-shot pool; {unanswered} "
                     "questions whose only answer is '-' are left out")


TASK = register(Task(
    name="niilc", category="QA", load=load, max_new_tokens=180, metric="char_f1",
    instruction=("質問に対する答えを出力してください。回答の他には何も含めないことを厳守してください。"
                 "答えが複数の場合、コンマ（,）で繋げてください。")))
