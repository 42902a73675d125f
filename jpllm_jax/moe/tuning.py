"""The numbers that choose how the routed experts run: implementation per backend, padded-layout slack, row and
block sizes. They steer code paths in ops.py and parallel/expert.py, so they live here, each with its reason;
benchmarks/moe_throughput.py measures the choices.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

# moe_ffn's "auto" implementation per jax backend; any other backend gets "ragged". CPU: XLA:CPU lowers
# ragged_dot to a masked product over all experts (E times the work), so batched einsums over padded groups win.
# GPU: our Pallas grouped-matmul kernel (Triton). TPU: XLA's own ragged_dot until the Mosaic lowering of our
# kernel (kernels_pallas/moe_gmm_tpu.py) is timed on a chip; "pallas" selects it (`use_impl`, the pre-flight's
# --moe_impl).
IMPL_BY_BACKEND = {"cpu": "padded", "gpu": "pallas"}
DEFAULT_IMPL = "ragged"


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
  """Within this context (while tracing) "auto" on the host's backend means `impl`, for expert-parallel local
  experts too: a program compiled for a TPU topology from a CPU host (the pre-flight) wants the TPU's choice, not
  the host's. Mosaic kernels are not partitioned automatically: "pallas" needs a mesh with an expert axis (the
  expert layer's shard_map)."""
  global EP_INSTEAD_OF_PALLAS  # pylint: disable=global-statement
  import jax  # pylint: disable=import-outside-toplevel
  backend = jax.default_backend()
  before, ep_before = IMPL_BY_BACKEND.get(backend), EP_INSTEAD_OF_PALLAS
  IMPL_BY_BACKEND[backend] = impl
  EP_INSTEAD_OF_PALLAS = impl  # compiled (Mosaic) kernels run under shard_map; only the interpreter cannot.
  try:
    yield
  finally:
    EP_INSTEAD_OF_PALLAS = ep_before
    if before is None:
      del IMPL_BY_BACKEND[backend]
    else:
      IMPL_BY_BACKEND[backend] = before

# Expert-parallel local experts where "auto" would pick "pallas": XLA's ragged_dot. The kernel type-checks under
# shard_map, but jax 0.10.2's interpreter cannot run it there (it slices varying refs with invariant indices), so
# that path could only be tested on a GPU.
EP_INSTEAD_OF_PALLAS = "ragged"

# "padded" dropless: each expert gets C = N*k/E * slack rows for the first slack whose C holds the largest group,
# else the exact block layout. Uniform routing puts the largest group near 1.1x the mean; past 1.25x the padded
# rows cost more than the block layout's slower rows, so the block layout takes over there.
PADDED_SLACKS = (1.1, 1.125, 1.25)
# Padded rows per expert are a multiple of this: aligned batched matmuls, little padding (at most 7 rows).
ROW_MULTIPLE = 8

# Block layout: rows per block are a power of two near a quarter of the mean group, clipped to this range.
# Smaller blocks pad less (at most E * (block_rows - 1) rows) but make smaller matmuls.
BLOCK_ROWS_MIN, BLOCK_ROWS_MAX = 8, 64
BLOCKS_PER_MEAN_GROUP = 4
