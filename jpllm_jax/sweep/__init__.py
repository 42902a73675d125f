"""Hyperparameter sweeps: search spaces and run names (`space`), launching runs here or writing job scripts
(`executors`), and collecting their results and plots (`results`). The launcher is `experiments.sweep`."""
from jpllm_jax.sweep.executors import EXECUTORS, Launch, is_finished, make_launches, run_local
from jpllm_jax.sweep.space import Run, SweepError, parse_set, parse_space, plan

__all__ = ["EXECUTORS", "Launch", "Run", "SweepError", "is_finished", "make_launches", "parse_set", "parse_space",
           "plan", "run_local"]
