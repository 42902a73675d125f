"""The grouped matmuls of moe_dispatch.py lowered for TPU (Mosaic): the block tables as scalar prefetch.

Same layout and contract as `moe_dispatch.gmm` / `tgmm` (row blocks of `block_rows` rows, block b of expert
`block_expert[b]`, id E past the groups). On TPU the operands stream HBM -> VMEM tile by tile, so instead of
indexing whole weight arrays in the kernel (the Triton design), the expert of a block chooses *which* weight tile
is copied in: `block_expert` is a scalar-prefetch operand (SMEM) that the index maps read (the megablox gmm
design, Gale et al. 2022 and jax.experimental.pallas.ops.tpu.megablox).

  gmm   grid (row block i, N tile j, K tile t); rhs tile (expert of i, t, j); the K axis is innermost and
        "arbitrary", accumulating in a VMEM f32 scratch; blocks of expert E contribute nothing (zeros out).
  tgmm  grid (K tile, N tile, row block b); the output tile (expert of b, ., .) stays resident while consecutive
        blocks share an expert (blocks are in expert order), is zeroed at the expert's first block and written
        back after its last. An expert without blocks is never visited: its dW is zeroed outside the kernel.

Tiles satisfy TPU tiling: the last dim of a tile is a multiple of 128 or the whole dim, the row tile (block_rows)
a multiple of 8 rows of 32-bit (16 of bf16: two rows per sublane; bf16 blocks of 8 rows stream as f32). Tiles are the largest of 512/256/128 that
divide a dim (else the whole dim): at bf16, 2 operands x 2 buffers x (512 x 512) plus the f32 accumulator stay
~3 MiB of VMEM (v5p: 95 MiB HBM, 16 MiB of scoped VMEM by default).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import vma

TILES = (512, 256, 128)


def lane_tile(dim: int) -> int:
  """The largest of TILES that divides `dim`, else `dim` itself (a whole-dimension block is always legal)."""
  return next((t for t in TILES if dim % t == 0), dim)


def row_multiple(dtype) -> int:
  """Rows of a TPU tile: 8 sublanes of 32 bits, so 16 rows of a 16-bit and 32 of an 8-bit dtype."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def tiled_dtype(block_rows: int, dtype):
  """The dtype the row blocks stream in: `dtype`, or float32 where block_rows is too few rows for its packed
  tile (8 rows of bf16), so that the tiling holds at twice the operand bytes."""
  if block_rows % 8:
    raise ValueError(f"block_rows={block_rows} must be a multiple of 8 for TPU tiling")
  return jnp.dtype(dtype) if block_rows % row_multiple(dtype) == 0 else jnp.dtype(jnp.float32)


def _cost(m: int, k: int, n: int, nb: int, lhs, rhs_or_dout, out_bytes: int) -> pl.CostEstimate:
  """What XLA's cost analysis should count for the kernel (it sees a custom call): the products of all m rows
  (blocks past the groups included, an upper bound), the row operand read once per N tile and the weight tile
  once per row block."""
  isz = lambda x: jnp.dtype(x.dtype).itemsize
  return pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                         bytes_accessed=m * k * isz(lhs) * max(1, n // lane_tile(n))
                         + nb * k * n * isz(rhs_or_dout) + out_bytes)


def _params(interpret, semantics):
  if interpret:
    return None
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _gmm_kernel(be_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, num_experts: int, transpose_rhs: bool):
  i, t = pl.program_id(0), pl.program_id(2)

  @pl.when(t == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(be_ref[i] < num_experts)
  def _():
    contract = 1 if transpose_rhs else 0
    acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], (((1,), (contract,)), ((), ())),
                                    preferred_element_type=jnp.float32)

  @pl.when(t == pl.num_programs(2) - 1)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def gmm(lhs: jax.Array, rhs: jax.Array, block_expert: jax.Array, *, block_rows: int, transpose_rhs: bool = False,
        interpret: bool = False) -> jax.Array:
  """`moe_dispatch.gmm` for TPU: lhs [M, K], rhs [E, K, N] (or [E, N, K]), block_expert int32 [M / block_rows]."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  m, k = lhs.shape
  num_experts = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  nb = m // block_rows
  assert nb * block_rows == m and block_expert.shape == (nb,), (lhs.shape, block_rows, block_expert.shape)
  out_dtype = lhs.dtype
  lhs = lhs.astype(tiled_dtype(block_rows, lhs.dtype))
  lhs, rhs, block_expert = vma.vary_alike(lhs, rhs, block_expert)
  tk, tn = lane_tile(k), lane_tile(n)
  last = num_experts - 1
  if transpose_rhs:  # [E, N, K]
    rhs_spec = pl.BlockSpec((pl.squeezed, tn, tk), lambda i, j, t, be: (jnp.minimum(be[i], last), j, t))
  else:
    rhs_spec = pl.BlockSpec((pl.squeezed, tk, tn), lambda i, j, t, be: (jnp.minimum(be[i], last), t, j))
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(nb, n // tn, k // tk),
      in_specs=[pl.BlockSpec((block_rows, tk), lambda i, j, t, be: (i, t)), rhs_spec],
      out_specs=pl.BlockSpec((block_rows, tn), lambda i, j, t, be: (i, j)),
      scratch_shapes=[pltpu.VMEM((block_rows, tn), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_gmm_kernel, num_experts=num_experts, transpose_rhs=transpose_rhs),
      grid_spec=spec, out_shape=vma.shape_dtype((m, n), lhs.dtype, lhs), interpret=interpret,
      compiler_params=_params(interpret, ("parallel", "parallel", "arbitrary")), name="moe_gmm_tpu",
      cost_estimate=_cost(m, k, n, nb, lhs, rhs, m * n * jnp.dtype(lhs.dtype).itemsize),
  )(block_expert, lhs, rhs).astype(out_dtype)


def _tgmm_kernel(be_ref, lhs_ref, dout_ref, out_ref, acc_ref, *, num_experts: int):
  b, nb = pl.program_id(2), pl.num_programs(2)
  last = num_experts - 1
  e = jnp.minimum(be_ref[b], last)
  first = (b == 0) | (jnp.minimum(be_ref[jnp.maximum(b - 1, 0)], last) != e)
  final = (b == nb - 1) | (jnp.minimum(be_ref[jnp.minimum(b + 1, nb - 1)], last) != e)

  @pl.when(first)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(be_ref[b] < num_experts)
  def _():
    acc_ref[...] += lax.dot_general(lhs_ref[...], dout_ref[...], (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)

  @pl.when(final)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs: jax.Array, dout: jax.Array, block_expert: jax.Array, block_offsets: jax.Array, num_experts: int, *,
         block_rows: int, interpret: bool = False) -> jax.Array:
  """`moe_dispatch.tgmm` for TPU: lhs [M, K], dout [M, N] -> [E, K, N], per expert lhs^T @ dout over its blocks."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  m, k = lhs.shape
  n = dout.shape[1]
  nb = m // block_rows
  out_dtype = lhs.dtype
  lhs = lhs.astype(tiled_dtype(block_rows, lhs.dtype))
  dout = dout.astype(tiled_dtype(block_rows, dout.dtype))
  lhs, dout, block_expert, block_offsets = vma.vary_alike(lhs, dout, block_expert, block_offsets)
  tk, tn = lane_tile(k), lane_tile(n)
  last = num_experts - 1
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(k // tk, n // tn, nb),
      in_specs=[pl.BlockSpec((block_rows, tk), lambda kk, j, b, be: (b, kk)),
                pl.BlockSpec((block_rows, tn), lambda kk, j, b, be: (b, j))],
      out_specs=pl.BlockSpec((pl.squeezed, tk, tn), lambda kk, j, b, be: (jnp.minimum(be[b], last), kk, j)),
      scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)])
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, num_experts=num_experts),
      grid_spec=spec, out_shape=vma.shape_dtype((num_experts, k, n), out_dtype, lhs), interpret=interpret,
      compiler_params=_params(interpret, ("parallel", "parallel", "arbitrary")), name="moe_tgmm_tpu",
      cost_estimate=_cost(m, k, n, nb, lhs, dout, num_experts * k * n * jnp.dtype(out_dtype).itemsize),
  )(block_expert, lhs, dout)
  has_blocks = block_offsets[1:] > block_offsets[:-1]  # experts never visited hold whatever was in HBM.
  return jnp.where(has_blocks[:, None, None], out, jnp.zeros((), out.dtype))
