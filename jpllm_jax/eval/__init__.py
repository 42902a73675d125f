"""Japanese evaluation (llm-jp-eval / Swallow tasks): task definitions, prompts, metrics, batched scoring.

    from jpllm_jax import eval as jeval
    cfg, params, sp, info = jeval.load_model(workdir="/tmp/run")
    lm = jeval.LanguageModel(cfg, params, sp)
    results = jeval.evaluate(lm, jeval.get_tasks("all"), data_dir="../shared/data/eval", limit=100)
"""
from jpllm_jax.eval.harness import HARNESS_VERSION, SCORINGS, evaluate, markdown_table
from jpllm_jax.eval.lm import LanguageModel
from jpllm_jax.eval.loading import checkpoint_steps, load_model
from jpllm_jax.eval.tasks import CATEGORIES, TASKS, get_tasks

__all__ = ["CATEGORIES", "HARNESS_VERSION", "LanguageModel", "SCORINGS", "TASKS", "checkpoint_steps", "evaluate",
           "get_tasks", "load_model", "markdown_table"]
