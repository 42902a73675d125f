"""Blockwise-scaled FP8 GEMM (DeepSeek-V3 §3.3) in Pallas, with an XLA fallback, and its FP8 custom VJP.

`fp8_matmul(x, w)` quantises x per 1x128 tile along K and w per 128x128 block (amax -> FP32 scale -> E4M3),
multiplies the FP8 operands one 128-wide K tile at a time and adds each tile's product, times its two scales,
into an FP32 accumulator (the promotion every 128 elements of K). `scaling='tensorwise'` uses one scale per
tensor instead: from its current amax, or from given amaxes (`amax=`: delayed scaling, models/fp8.py). The
backward pass is FP8 too: dx = dy @ w^T with dy re-quantised per 1x128 tile along N and w^T per block,
dw = x^T @ dy with both re-quantised per 128-tile along M (their own K).

Backends (`backend=`; the default 'auto' picks by the platform the program is lowered for, with
`lax.platform_dependent`, so a deviceless TPU compile on a CPU host gets Mosaic: 'mosaic' on TPU, 'triton' on
CUDA, else 'xla'):
- 'xla': `fp8_quant.gemm_xla`, jnp with float8 dtypes; the CPU default.
- 'triton': one program per (128 x 128) output tile looping over K tiles (GPU, Triton lowering).
- 'mosaic': K tiles on the grid's last ("arbitrary") axis with a VMEM FP32 accumulator (TPU). The FP8 tiles are
  widened to bf16 before the MXU dot (exact: every E4M3/E5M2 value is a bf16 value), since v5p's MXU has no FP8.
`interpret=True` runs either Pallas kernel in the interpreter (CPU tests). Shapes that are not multiples of 128
are zero-padded to them (zeros change neither the amax of a tile nor any sum) and the result is sliced back.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import vma
from kernels_pallas.fp8_quant import E4M3, E5M2, TILE, gemm_xla, quantize_blocks, quantize_cols, \
  quantize_rows, quantize_tensor

__all__ = ["fp8_matmul", "fp8_gemm", "quantize_operands", "E4M3", "E5M2"]

BACKENDS = ("auto", "xla", "triton", "mosaic")
SCALINGS = ("blockwise", "tensorwise")
# Output tile of both kernels (a multiple of TPU's (8, 128) layout and a power of two for Triton).
BLOCK_M = BLOCK_N = 128
TRITON_PARAMS = dict(num_warps=4, num_stages=3)


def _triton_kernel(aq_ref, sa_ref, bq_ref, sb_ref, o_ref):
  """One output tile: aq [bm, K], saT [nk, bm], bq [K, bn], sb [nk, bn]; loops over the K tiles."""
  nk = sa_ref.shape[0]

  def body(t, acc):
    a = aq_ref[:, pl.ds(t * TILE, TILE)]
    b = bq_ref[pl.ds(t * TILE, TILE), :]
    part = lax.dot(a, b, preferred_element_type=jnp.float32)
    return acc + part * sa_ref[t, :][:, None] * sb_ref[t, :][None, :]

  acc = lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _triton_call(aq, sa, bq, sb, out_dtype, interpret):
  m, k = aq.shape
  n = bq.shape[1]
  nk = k // TILE
  params = None
  if not interpret:
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
    params = pltriton.CompilerParams(**TRITON_PARAMS)
  return pl.pallas_call(
      _triton_kernel,
      grid=(m // BLOCK_M, n // BLOCK_N),
      in_specs=[pl.BlockSpec((BLOCK_M, k), lambda i, j: (i, 0)),
                pl.BlockSpec((nk, BLOCK_M), lambda i, j: (0, i)),
                pl.BlockSpec((k, BLOCK_N), lambda i, j: (0, j)),
                pl.BlockSpec((nk, BLOCK_N), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((BLOCK_M, BLOCK_N), lambda i, j: (i, j)),
      out_shape=vma.shape_dtype((m, n), out_dtype, aq),
      interpret=interpret, compiler_params=params, name="fp8_gemm_triton",
  )(aq, sa.T, bq, sb)


def _mosaic_kernel(aq_ref, sa_ref, bq_ref, sb_ref, o_ref, acc_ref):
  """One (output tile, K tile) step: aq [bm, 128], sa [bm, 1], bq [128, bn], sb [1, bn]."""
  t = pl.program_id(2)

  @pl.when(t == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  part = lax.dot(aq_ref[...].astype(jnp.bfloat16), bq_ref[...].astype(jnp.bfloat16),
                 preferred_element_type=jnp.float32)
  acc_ref[...] += part * sa_ref[...] * sb_ref[...]

  @pl.when(t == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _mosaic_call(aq, sa, bq, sb, out_dtype, interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  m, k = aq.shape
  n = bq.shape[1]
  nk = k // TILE
  params = None if interpret else pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"))
  sq = pl.squeezed
  return pl.pallas_call(
      _mosaic_kernel,
      grid=(m // BLOCK_M, n // BLOCK_N, nk),
      in_specs=[pl.BlockSpec((BLOCK_M, TILE), lambda i, j, t: (i, t)),
                pl.BlockSpec((sq, BLOCK_M, 1), lambda i, j, t: (t, i, 0)),
                pl.BlockSpec((TILE, BLOCK_N), lambda i, j, t: (t, j)),
                pl.BlockSpec((sq, 1, BLOCK_N), lambda i, j, t: (t, 0, j))],
      out_specs=pl.BlockSpec((BLOCK_M, BLOCK_N), lambda i, j, t: (i, j)),
      out_shape=vma.shape_dtype((m, n), out_dtype, aq),
      scratch_shapes=[pltpu.VMEM((BLOCK_M, BLOCK_N), jnp.float32)],
      interpret=interpret, compiler_params=params, name="fp8_gemm_mosaic",
  )(aq, sa.T[:, :, None], bq, sb[:, None, :])


def fp8_gemm(aq, sa, bq, sb, *, out_dtype=jnp.float32, backend: str | None = None,
             interpret: bool = False) -> jax.Array:
  """The GEMM of quantised operands (layouts in `fp8_quant`): aq [M, K], sa [M, K/128], bq [K, N],
  sb [K/128, N], all dims multiples of 128 -> [M, N] in out_dtype."""
  backend = backend or "auto"
  aq, sa, bq, sb = vma.vary_alike(aq, sa, bq, sb)  # (inside shard_map: one output type)
  if backend == "auto":
    run = lambda b: lambda *ops: fp8_gemm(*ops, out_dtype=out_dtype, backend=b, interpret=interpret)  # noqa: E731
    return lax.platform_dependent(aq, sa, bq, sb, tpu=run("mosaic"), cuda=run("triton"), default=run("xla"))
  if backend == "xla":
    return gemm_xla(aq, sa, bq, sb, out_dtype=out_dtype)
  if backend == "triton":
    return _triton_call(aq, sa, bq, sb, out_dtype, interpret)
  if backend == "mosaic":
    return _mosaic_call(aq, sa, bq, sb, out_dtype, interpret)
  raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")


def quantize_operands(a, b, *, scaling: str, a_dtype=E4M3, b_dtype=E4M3, b_is_weight: bool = True, amax=None):
  """(aq, sa, bq, sb) for a [M, K] @ b [K, N]: a per 1x128 tile, b per 128x128 block if it is a weight else per
  128x1 tile (an activation or gradient), or one scale each with `scaling='tensorwise'`, from the operands'
  current amaxes or from `amax` = (amax of a, amax of b) (delayed scaling; tensorwise only)."""
  if scaling == "tensorwise":
    a_amax, b_amax = (None, None) if amax is None else amax
    return (*quantize_tensor(a, a_dtype, lhs=True, amax=a_amax), *quantize_tensor(b, b_dtype, lhs=False, amax=b_amax))
  if amax is not None:
    raise ValueError("given amaxes (delayed scaling) need scaling='tensorwise'")
  if scaling == "blockwise":
    bq = quantize_blocks(b, b_dtype) if b_is_weight else quantize_cols(b, b_dtype)
    return (*quantize_rows(a, a_dtype), *bq)
  raise ValueError(f"scaling must be one of {SCALINGS}, not {scaling!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _matmul(x, w, amax, scaling, out_dtype, backend, interpret, grad_dtype):
  return fp8_gemm(*quantize_operands(x, w, scaling=scaling, amax=None if amax is None else amax[:2]),
                  out_dtype=out_dtype, backend=backend, interpret=interpret)


def _matmul_fwd(x, w, amax, scaling, out_dtype, backend, interpret, grad_dtype):
  return _matmul(x, w, amax, scaling, out_dtype, backend, interpret, grad_dtype), (x, w, amax)


def _matmul_bwd(scaling, out_dtype, backend, interpret, grad_dtype, res, dy):
  x, w, amax = res
  ax, aw, ady = (None, None, None) if amax is None else amax
  pair = lambda a, b: None if amax is None else (a, b)  # noqa: E731  (the given amaxes of a GEMM's operands)
  gemm = functools.partial(fp8_gemm, out_dtype=jnp.float32, backend=backend, interpret=interpret)
  dx = gemm(*quantize_operands(dy, w.T, scaling=scaling, a_dtype=grad_dtype, amax=pair(ady, aw)))
  dw = gemm(*quantize_operands(x.T, dy, scaling=scaling, b_dtype=grad_dtype, b_is_weight=False,
                               amax=pair(ax, ady)))
  return dx.astype(x.dtype), dw.astype(w.dtype), jax.tree.map(jnp.zeros_like, amax)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _pad_to(x: jax.Array, rows: int, cols: int) -> jax.Array:
  return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def fp8_matmul(x: jax.Array, w: jax.Array, *, scaling: str = "blockwise", out_dtype=None,
               backend: str | None = None, interpret: bool = False, grad_dtype=E4M3, amax=None) -> jax.Array:
  """x [M, K] @ w [K, N] through FP8 (see the module docstring), differentiable, in `out_dtype` or x's dtype.

  `backend`: 'auto' (default: by the lowering platform) | 'xla' | 'triton' | 'mosaic'; `interpret` runs a Pallas
  backend in the interpreter; `grad_dtype`: the FP8 type of dy in the backward GEMMs (E4M3 or E5M2).
  `amax` = (amax of x, of w, of dy), scalars (not differentiated): per-tensor delayed scaling, each operand scaled
  by its given amax / FP8 max instead of its own (values beyond saturate; an amax of 0, i.e. none recorded yet,
  stands for the operand's own); tensorwise only."""
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"fp8_matmul needs x [M, K] and w [K, N], got {x.shape} and {w.shape}")
  if scaling not in SCALINGS:
    raise ValueError(f"scaling must be one of {SCALINGS}, not {scaling!r}")
  if amax is not None and (scaling != "tensorwise" or len(amax) != 3):
    raise ValueError(f"amax needs scaling='tensorwise' and three values (x, w, dy), got {scaling!r}, {amax!r}")
  backend = backend or "auto"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  (m, k), n = x.shape, w.shape[1]
  up = lambda d: -(-d // TILE) * TILE  # noqa: E731  (BLOCK_M = BLOCK_N = TILE)
  mp, kp, np_ = up(m), up(k), up(n)
  if (mp, kp, np_) != (m, k, n):
    x, w = _pad_to(x, mp, kp), _pad_to(w, kp, np_)
  x, w = vma.vary_alike(x, w)  # (inside shard_map the cast's transpose sums dw over x's axes)
  amax = None if amax is None else tuple(jnp.asarray(a, jnp.float32) for a in amax)
  y = _matmul(x, w, amax, scaling, out_dtype, backend, interpret, jnp.dtype(grad_dtype))
  return y[:m, :n] if (mp, np_) != (m, n) else y
