"""The registered evaluation tasks: one module per task, each registering a `Task` on import."""
# Registration order is the order of the results within a category.
from jpllm_jax.eval.tasks import jcommonsenseqa, jemhopqa, niilc, jsquad, jmmlu, mgsm  # noqa: F401,I001
from jpllm_jax.eval.tasks.base import CATEGORIES, TASKS, Example, Splits, Task, get_tasks, register

__all__ = ["CATEGORIES", "TASKS", "Example", "Splits", "Task", "get_tasks", "register"]
