"""Parallel layout: logical axis names of weights and activations, and the rules that map them to a mesh."""
from jpllm_jax.parallel.logical import axis_rules, current_rules, logical_constraint, logical_to_spec

__all__ = ["axis_rules", "current_rules", "logical_constraint", "logical_to_spec"]
