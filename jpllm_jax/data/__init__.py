"""Training data: JSONL documents (jsonl.py) into packed, shuffled, mixed, resumable batches (pipeline.py)."""
from jpllm_jax.data.jsonl import JsonlSource, iter_texts
from jpllm_jax.data.pipeline import (BATCH_KEYS, ShardsIterator, documents, local_shards, make_dataset,
                                     make_iterator, normalize_sources, open_source, restore_state, split_indices,
                                     state_to_bytes)

__all__ = ["BATCH_KEYS", "JsonlSource", "ShardsIterator", "documents", "iter_texts", "local_shards",
           "make_dataset", "make_iterator", "normalize_sources", "open_source", "restore_state", "split_indices",
           "state_to_bytes"]
