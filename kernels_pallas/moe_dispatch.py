"""Grouped matmul (GMM) over expert-sorted row blocks for mixture-of-experts layers, in Pallas.

The rows of `lhs` are token assignments sorted by expert and padded so that each expert's group fills whole
blocks of `block_rows` rows (the "megablocks" layout, Gale et al. 2022): block `b` belongs to expert
`block_expert[b]`, and the blocks of expert `e` are `block_offsets[e]:block_offsets[e + 1]`. Blocks past the
last group carry the expert id `E` (no expert) and produce zeros. Then

  gmm(lhs, rhs)[b-th block]      = lhs[b-th block] @ rhs[block_expert[b]]          (forward, and dx with rhs^T)
  tgmm(lhs, dout)[e]             = sum over blocks b of e: lhs[b-th block]^T @ dout[b-th block]   (dW)

`grouped_matmul` ties them together with a custom VJP. Two designs of the same kernels (`backend`):
  "triton"  here: the block tables and the weights are read as whole arrays and indexed inside the kernel (no
            scalar prefetch), which the Triton lowering (GPU) and the interpreter (CPU tests) both accept; tile
            sizes are powers of two, as Triton requires.
  "mosaic"  moe_gmm_tpu.py: the block tables are scalar prefetch that choose which weight tile streams into
            VMEM (TPU).
  "auto"    by the platform the program is lowered for (`lax.platform_dependent`, so a deviceless TPU compile on
            a CPU host gets Mosaic): TPU Mosaic, CUDA Triton, else the Triton design in the interpreter.
`interpret=True` runs the chosen design ("auto": Triton's) in the interpreter.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import moe_gmm_tpu, vma

# Triton launch settings: the largest tile edge (64 keeps a block's operands within a GPU's shared memory at
# bf16/f32), and the warps and software-pipeline stages of each program.
MAX_TILE = 64
TRITON_PARAMS = dict(num_warps=4, num_stages=3)


def _tile(dim: int, cap: int = MAX_TILE) -> int:
  """The largest power of two <= cap that divides dim (a Triton tile size)."""
  t = cap
  while dim % t:
    t //= 2
  return t


def _interpret(interpret: bool | None) -> bool:
  return jax.default_backend() == "cpu" if interpret is None else interpret


def _compiler_params(interpret: bool):
  """Triton settings; none for the interpreter."""
  if interpret:
    return None
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
  return pltriton.CompilerParams(**TRITON_PARAMS)


def _dot(a, b, contract_a: int, contract_b: int):
  """2-D product contracting a's and b's given dims, accumulated in f32 (lowers to tl.dot under Triton)."""
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _gmm_kernel(be_ref, lhs_ref, rhs_ref, out_ref, *, num_experts: int, bk: int, nk: int, transpose_rhs: bool):
  """One (row block, column tile) of the output: lhs block @ rhs[expert of the block] over K tiles."""
  i, j = pl.program_id(0), pl.program_id(1)
  e = be_ref[i]
  bm, bn = out_ref.shape

  @pl.when(e < num_experts)
  def _():
    def body(t, acc):
      a = lhs_ref[:, pl.ds(t * bk, bk)]
      if transpose_rhs:
        b = rhs_ref[e, pl.ds(j * bn, bn), pl.ds(t * bk, bk)]
        return acc + _dot(a, b, 1, 1)
      b = rhs_ref[e, pl.ds(t * bk, bk), pl.ds(j * bn, bn)]
      return acc + _dot(a, b, 1, 0)

    acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)

  @pl.when(e >= num_experts)
  def _():
    out_ref[...] = jnp.zeros((bm, bn), out_ref.dtype)


BACKENDS = ("auto", "triton", "mosaic")


def _by_backend(triton_fn, mosaic_fn, args, interpret: bool | None, backend: str):
  """triton_fn(*args, interpret=...) or mosaic_fn(*args, interpret=...) as `backend` and `interpret` choose
  (module docstring)."""
  if backend == "mosaic":
    return mosaic_fn(*args, interpret=bool(interpret))
  if backend == "triton":
    return triton_fn(*args, interpret=_interpret(interpret))
  if backend != "auto":
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if interpret:
    return triton_fn(*args, interpret=True)
  return lax.platform_dependent(
      *args, tpu=functools.partial(mosaic_fn, interpret=False), cuda=functools.partial(triton_fn, interpret=False),
      default=functools.partial(triton_fn, interpret=interpret is None))


def gmm(lhs: jax.Array, rhs: jax.Array, block_expert: jax.Array, *, block_rows: int, transpose_rhs: bool = False,
        interpret: bool | None = None, backend: str = "auto") -> jax.Array:
  """lhs [M, K] (M = blocks * block_rows), rhs [E, K, N] (or [E, N, K] with transpose_rhs), block_expert int32
  [blocks] -> [M, N]: each row block times the weight of its expert (zeros for blocks of expert id E)."""
  kw = dict(block_rows=block_rows, transpose_rhs=transpose_rhs)
  return _by_backend(functools.partial(_gmm_triton, **kw), functools.partial(moe_gmm_tpu.gmm, **kw),
                     (lhs, rhs, block_expert), interpret, backend)


def _gmm_triton(lhs, rhs, block_expert, *, block_rows: int, transpose_rhs: bool, interpret: bool) -> jax.Array:
  m, k = lhs.shape
  num_experts = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  nb = m // block_rows
  assert nb * block_rows == m and block_expert.shape == (nb,), (lhs.shape, block_rows, block_expert.shape)
  lhs, rhs, block_expert = vma.vary_alike(lhs, rhs, block_expert)  # (inside shard_map: one output type)
  bk, bn = _tile(k), _tile(n)
  kernel = functools.partial(_gmm_kernel, num_experts=num_experts, bk=bk, nk=k // bk, transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      grid=(nb, n // bn),
      in_specs=[pl.BlockSpec((nb,), lambda i, j: (0,)),
                pl.BlockSpec((block_rows, k), lambda i, j: (i, 0)),
                pl.BlockSpec(rhs.shape, lambda i, j: (0, 0, 0))],
      out_specs=pl.BlockSpec((block_rows, bn), lambda i, j: (i, j)),
      out_shape=vma.shape_dtype((m, n), lhs.dtype, lhs),
      interpret=interpret,
      compiler_params=_compiler_params(interpret),
      name="moe_gmm",
  )(block_expert, lhs, rhs)


def _tgmm_kernel(off_ref, lhs_ref, dout_ref, out_ref, *, bm: int):
  """One (expert, K tile, N tile) of dW: the sum over the expert's row blocks of lhs^T @ dout."""
  e, kk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bk, bn = out_ref.shape

  def body(b, acc):
    a = lhs_ref[pl.ds(b * bm, bm), pl.ds(kk * bk, bk)]
    g = dout_ref[pl.ds(b * bm, bm), pl.ds(j * bn, bn)]
    return acc + _dot(a, g, 0, 0)

  acc = lax.fori_loop(off_ref[e], off_ref[e + 1], body, jnp.zeros((bk, bn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs: jax.Array, dout: jax.Array, block_expert: jax.Array, block_offsets: jax.Array, num_experts: int, *,
         block_rows: int, interpret: bool | None = None, backend: str = "auto") -> jax.Array:
  """lhs [M, K], dout [M, N], the layout's block_expert [blocks] and block_offsets int32 [E + 1] -> [E, K, N]:
  per expert, lhs^T @ dout over the expert's row blocks (zeros for an expert without blocks)."""
  kw = dict(num_experts=num_experts, block_rows=block_rows)
  triton_fn = lambda lhs, dout, be, off, **k: _tgmm_triton(lhs, dout, off, **kw, **k)
  return _by_backend(triton_fn, functools.partial(moe_gmm_tpu.tgmm, **kw), (lhs, dout, block_expert, block_offsets),
                     interpret, backend)


def _tgmm_triton(lhs, dout, block_offsets, *, num_experts: int, block_rows: int, interpret: bool) -> jax.Array:
  m, k = lhs.shape
  n = dout.shape[1]
  lhs, dout, block_offsets = vma.vary_alike(lhs, dout, block_offsets)
  bk, bn = _tile(k), _tile(n)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, bm=block_rows),
      grid=(num_experts, k // bk, n // bn),
      in_specs=[pl.BlockSpec((num_experts + 1,), lambda e, kk, j: (0,)),
                pl.BlockSpec((m, k), lambda e, kk, j: (0, 0)),
                pl.BlockSpec((m, n), lambda e, kk, j: (0, 0))],
      out_specs=pl.BlockSpec((pl.squeezed, bk, bn), lambda e, kk, j: (e, kk, j)),
      out_shape=vma.shape_dtype((num_experts, k, n), lhs.dtype, lhs),
      interpret=interpret,
      compiler_params=_compiler_params(interpret),
      name="moe_tgmm",
  )(block_offsets, lhs, dout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def grouped_matmul(lhs: jax.Array, rhs: jax.Array, block_expert: jax.Array, block_offsets: jax.Array,
                   block_rows: int, interpret: bool | None = None, backend: str = "auto") -> jax.Array:
  """`gmm` with gradients: d lhs = gmm(dout, rhs^T), d rhs = tgmm(lhs, dout). Both tables must describe the
  same layout (block_expert[b] = e for block_offsets[e] <= b < block_offsets[e + 1], else E)."""
  return gmm(lhs, rhs, block_expert, block_rows=block_rows, interpret=interpret, backend=backend)


def _grouped_matmul_fwd(lhs, rhs, block_expert, block_offsets, block_rows, interpret, backend):
  out = gmm(lhs, rhs, block_expert, block_rows=block_rows, interpret=interpret, backend=backend)
  return out, (lhs, rhs, block_expert, block_offsets)


def _grouped_matmul_bwd(block_rows, interpret, backend, res, dout):
  lhs, rhs, block_expert, block_offsets = res
  kw = dict(block_rows=block_rows, interpret=interpret, backend=backend)
  dlhs = gmm(dout, rhs, block_expert, transpose_rhs=True, **kw)
  drhs = tgmm(lhs, dout, block_expert, block_offsets, rhs.shape[0], **kw)
  return dlhs, drhs.astype(rhs.dtype), None, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)
