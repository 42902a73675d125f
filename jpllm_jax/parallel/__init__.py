"""Parallel layout: logical axis names of weights and activations, the rules that map them to a mesh, meshes."""
from jpllm_jax.parallel.logical import axis_rules, current_rules, logical_constraint, logical_to_spec
from jpllm_jax.parallel.mesh import (DEFAULT_RULES, MESH_AXES, check_model_fits_mesh, data_parallel_size,
                                     initialize_distributed, make_mesh, mesh_shape, shardings, with_rule_overrides)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "axis_rules", "check_model_fits_mesh", "current_rules",
           "data_parallel_size", "initialize_distributed", "logical_constraint", "logical_to_spec", "make_mesh",
           "mesh_shape", "shardings", "with_rule_overrides"]
