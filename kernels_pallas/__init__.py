"""Pallas kernels used by the library (jpllm_jax); each module holds one kernel family and its VJP."""
