"""What a task is: a declarative `Task` (loader, prompt, few-shot pool, decoding length, metric) and the registry.

Adding a task (XL-Sum, WMT20, ...) is a new module in this package that calls `register(Task(...))`.
"""
from __future__ import annotations

import dataclasses
import pathlib
import random
from collections.abc import Callable, Sequence

CATEGORIES = {"MC": "multiple choice", "QA": "question answering", "RC": "reading comprehension",
              "HE": "human examination", "MR": "mathematical reasoning"}
STYLES = ("llm-jp-eval", "mgsm")


@dataclasses.dataclass(frozen=True)
class Example:
  """One evaluation item: llm-jp-eval's (input, output) pair, plus the choices of a multiple-choice item."""

  input: str
  output: str  # the gold answer text (generative scoring)
  id: str = ""
  choices: tuple[str, ...] = ()  # choice texts, scored by log-likelihood
  label: int = -1  # index of the gold choice


@dataclasses.dataclass(frozen=True)
class Splits:
  """The evaluated examples, in order, and the few-shot pool, already shuffled as the reference harness does."""

  test: list[Example]
  fewshot_pool: list[Example]
  note: str = ""  # where the split differs from the published setting


@dataclasses.dataclass(frozen=True)
class Task:
  """A declarative task definition."""

  name: str
  category: str  # a key of CATEGORIES
  load: Callable[[pathlib.Path], Splits]  # the task's data folder -> splits
  instruction: str
  max_new_tokens: int
  metric: str  # a key of metrics.METRICS
  style: str = "llm-jp-eval"  # prompt template (prompts.py)
  # Log-likelihood multiple choice: the instruction of the choice-text prompt (None: generative only).
  mc_instruction: str | None = None
  data_subdir: str = ""  # folder under the evaluation data directory (default: the task name)

  def __post_init__(self):
    if self.category not in CATEGORIES:
      raise ValueError(f"task {self.name}: category {self.category!r} not in {sorted(CATEGORIES)}")
    if self.style not in STYLES:
      raise ValueError(f"task {self.name}: style {self.style!r} not in {STYLES}")

  @property
  def supports_loglik(self) -> bool:
    return self.mc_instruction is not None

  def splits(self, data_dir: str | pathlib.Path) -> Splits:
    folder = pathlib.Path(data_dir) / (self.data_subdir or self.name)
    if not folder.is_dir():
      raise FileNotFoundError(f"task {self.name}: no data folder {folder}")
    return self.load(folder)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
  if task.name in TASKS:
    raise ValueError(f"task {task.name} is registered twice")
  TASKS[task.name] = task
  return task


def get_tasks(names: str | Sequence[str] | None = None) -> list[Task]:
  """Tasks by name (comma-separated string or list); None or "all": every registered task."""
  if names is None or names == "all":
    order = list(CATEGORIES)
    return sorted(TASKS.values(), key=lambda t: order.index(t.category))  # stable: registration within a category
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
  return [TASKS[n] for n in names]


def seeded_shuffle(items: list, seed: int = 42) -> list:
  """llm-jp-eval's `random.seed(seed); random.shuffle(items)` (the global generator, as the reference does)."""
  items = list(items)
  rng = random.Random(seed)  # the same Mersenne Twister stream as random.seed(seed) + random.shuffle.
  rng.shuffle(items)
  return items
