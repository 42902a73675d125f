"""Mixture of experts: the routed expert FFN (dispatch, grouped matmuls, combine) and its reference."""
from jpllm_jax.moe.ops import IMPLS, default_impl, moe_ffn, moe_ffn_reference

__all__ = ["IMPLS", "default_impl", "moe_ffn", "moe_ffn_reference"]
