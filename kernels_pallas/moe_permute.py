"""The MoE layer's token permutation and gate-weighted combine as row gathers by DMA (Mosaic, TPU).

  gather_rows(x [T, D], idx [R])                 out[r] = x[idx[r]]                          (0 if idx[r] not in [0, T))
  gather_combine(rows [R, D], row_of [N, k], w)  out[n] = sum_j w[n, j] * rows[row_of[n, j]]  (0 terms for rows not
                                                 in [0, R)), products and sum in float32, out in rows' dtype

jpllm_jax/moe/ops.py uses them around the grouped matmul of its "pallas" layout: tokens (and dy) into the
expert-sorted rows (index A // k = N for an empty padding row), rows back to assignment order (row_of, index = the
row count for a dropped assignment), and the combines of y and dx.

Mosaic design: the indices are scalar prefetch (SMEM, 4 bytes per index: a few hundred KiB of SMEM bound one call),
the source stays in HBM (`memory_space=pl.ANY`), and each grid step moves `block_rows` rows, one DMA per row, at
most `INFLIGHT` outstanding on one semaphore (all copies are one row, so any completion satisfies a wait). A DMA
moves whole 32-bit sublanes: bf16 rows are moved as uint32 words of column pairs (`_words`; a packed bf16 tile
holds two rows per sublane, so a single bf16 row is not addressable) and unpacked to float32 by shifts in the
combine. `gather_rows` copies HBM to HBM (an out-of-range row copies from a zero row in VMEM), so nothing is staged;
the combine DMAs the k rows of each token of its block into a [k, block_rows, 1, D] VMEM scratch (a 1-row leading
dim, so a row's offset is not a tiled one) and sums them weighted in float32.

What it beats: XLA's combine gathers the picked [N, k, D] rows and reduces them (materialised in HBM unless XLA
fuses the gather into the reduce); here only the [N, D] result is written, and each permutation is one pass of row
DMAs (R D bytes read, R D written). What it does not beat: the bytes of the permutation itself, nor the grouped
matmul's separate read of its rows (nothing is fused into the GMM); single-row DMAs are short transfers whose
issue rate, not bandwidth, may bound small D; and the bf16 word view may cost XLA a relayout copy on either side
(compiled HLO, benchmarks/moe_permute_tpu.py). Not timed on a TPU here: only compiled.

`backend`: "mosaic", "xla" (jnp.take and an f32 weighted sum, the same numerics), or "auto": Mosaic when the
program is lowered for TPU, XLA elsewhere, chosen by the platform the program is lowered for the way the grouped
matmul chooses (moe_dispatch._by_backend, `lax.platform_dependent`). `interpret=True` runs the Mosaic design in
Pallas's TPU interpreter (DMAs and semaphores simulated; CPU tests). The Mosaic design takes float32 and bfloat16.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import moe_dispatch, moe_gmm_tpu, vma

BACKENDS = ("auto", "mosaic", "xla")
INFLIGHT = 64  # row DMAs outstanding per grid step
GATHER_BLOCK_ROWS = 512  # rows per grid step of gather_rows (HBM to HBM: no VMEM block)
COMBINE_BYTES = 4 << 20  # VMEM bytes of the combine's gathered rows per grid step
COMBINE_BLOCK_ROWS = (8, 256)  # bounds of the combine's tokens per grid step (a multiple of 8: f32 tiles)
LANES = 128


# ------------------------------------------------------------------------------------------------ helpers
def _pad_to(a: jax.Array, size: int, axis: int, value) -> jax.Array:
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, pad, constant_values=value) if size != a.shape[axis] else a


def _words(a: jax.Array) -> jax.Array:
  """a [M, D] as 32-bit rows [M, D'] of whole lane tiles (D zero-padded): f32 as it is, bf16 as uint32 words that
  hold column c in the low and column c + D'' / 2 in the high half (two elementwise passes of XLA's, no reshape)."""
  dtype = jnp.dtype(a.dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"the Mosaic row gathers take float32 or bfloat16, not {dtype.name}")
  per_word = 4 // dtype.itemsize
  a = _pad_to(a, -(-a.shape[1] // (LANES * per_word)) * LANES * per_word, 1, 0)
  if per_word == 1:
    return a
  u, h = lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.uint32), a.shape[1] // 2
  return u[:, :h] | (u[:, h:] << 16)


def _unwords(w: jax.Array, dtype, d: int) -> jax.Array:
  """The inverse of `_words`: [M, D'] words -> [M, d] of dtype."""
  if jnp.dtype(dtype).itemsize == 4:
    return w[:, :d] if d < w.shape[1] else w
  halves = jnp.concatenate([w & jnp.uint32(0xFFFF), w >> 16], axis=1).astype(jnp.uint16)
  out = lax.bitcast_convert_type(halves, dtype)
  return out[:, :d] if d < out.shape[1] else out


def _row_dmas(count: int, copy, live):
  """Issues copy(t).start() for t < count where live(t), at most INFLIGHT outstanding, and waits for all of them."""
  def body(t, carry):
    first = jnp.minimum(t, count - 1)

    @pl.when((t < count) & live(first))
    def _():
      copy(first).start()

    done = jnp.maximum(t - INFLIGHT, 0)

    @pl.when((t >= INFLIGHT) & live(done))
    def _():
      copy(done).wait()
    return carry

  lax.fori_loop(0, count + INFLIGHT, body, 0)


def _in_range(i, size: int):
  return (i >= 0) & (i < size)


def _dispatch(xla_fn, mosaic_fn, args, interpret: bool | None, backend: str):
  """mosaic_fn(*args, interpret=...) or xla_fn(*args) as `backend` and `interpret` choose (module docstring): the
  grouped matmul's chooser, with this module's XLA path in the place of its Triton design."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if interpret or backend == "mosaic":
    return mosaic_fn(*args, interpret=bool(interpret))
  other = lambda *a, interpret: xla_fn(*a)  # (the XLA path has no interpreter)
  return moe_dispatch._by_backend(  # pylint: disable=protected-access
      other, mosaic_fn, args, False, "triton" if backend == "xla" else "auto")


def _call(kernel, grid_spec, out_shape, interpret: bool, name: str, cost: pl.CostEstimate):
  """A pallas_call of this module's kernels: the TPU interpreter or the Mosaic compiler, row blocks in parallel."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, name=name, cost_estimate=cost,
                        interpret=pltpu.InterpretParams() if interpret else False,
                        compiler_params=None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel",)))


def _copy(src, dst, sem):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  return pltpu.make_async_copy(src, dst, sem)


# ------------------------------------------------------------------------------------------- gather_rows
def gather_rows(x: jax.Array, idx: jax.Array, *, block_rows: int | None = None, interpret: bool | None = None,
                backend: str = "auto") -> jax.Array:
  """x [T, D], idx int [R] -> [R, D]: out[r] = x[idx[r]], zeros where idx[r] is not in [0, T) (jnp.take with
  mode="fill", fill_value=0, except that negative indices do not wrap). block_rows: rows per grid step."""
  return _dispatch(_gather_rows_xla, functools.partial(_gather_rows_mosaic, block_rows=block_rows),
                   (x, idx.astype(jnp.int32)), interpret, backend)


def _gather_rows_xla(x, idx):
  return jnp.take(x, jnp.where(idx < 0, x.shape[0], idx), axis=0, mode="fill", fill_value=0)


def _gather_rows_kernel(idx_ref, x_hbm, out_hbm, zero_ref, sem, *, block_rows: int, num_src: int, num_out: int):
  base = pl.program_id(0) * block_rows
  zero_ref[...] = jnp.zeros_like(zero_ref)

  def copy_or_zero(r):
    i, dst = idx_ref[base + r], out_hbm.at[pl.ds(base + r, 1)]
    return _Either(_in_range(i, num_src), lambda: _copy(x_hbm.at[pl.ds(jnp.clip(i, 0, num_src - 1), 1)], dst, sem),
                   lambda: _copy(zero_ref.at[pl.ds(0, 1)], dst, sem))

  _row_dmas(block_rows, copy_or_zero, lambda r: base + r < num_out)  # (the last block may be partial)


class _Either:
  """One of two row DMAs (made by the thunks if_true and if_false), chosen at run time by `pred`."""

  def __init__(self, pred, if_true, if_false):
    self.pred, self.if_true, self.if_false = pred, if_true, if_false

  def start(self):
    pl.when(self.pred)(lambda: self.if_true().start())
    pl.when(~self.pred)(lambda: self.if_false().start())

  def wait(self):
    self.if_true().wait()  # (either one: the same byte count on the same semaphore)


def _gather_rows_mosaic(x, idx, *, block_rows: int | None, interpret: bool):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  (t, d), r = x.shape, idx.shape[0]
  xw = _words(x)
  dw = xw.shape[1]
  bm = block_rows or min(GATHER_BLOCK_ROWS, -(-r // 8) * 8)
  rp = -(-r // bm) * bm
  idx = _pad_to(idx, rp, 0, t)  # (the last block's indices: SMEM reads stay in bounds)
  xw, idx = vma.vary_alike(xw, idx)
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(rp // bm,), in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec(memory_space=pl.ANY),
      scratch_shapes=[pltpu.VMEM((8, dw), xw.dtype), pltpu.SemaphoreType.DMA(())])
  cost = pl.CostEstimate(flops=0, transcendentals=0, bytes_accessed=2 * r * dw * 4 + 4 * r)
  out = _call(functools.partial(_gather_rows_kernel, block_rows=bm, num_src=t, num_out=r), spec,
              vma.shape_dtype((r, dw), xw.dtype, xw), interpret, "moe_gather_rows", cost)(idx, xw)
  return _unwords(out, x.dtype, d)


# ---------------------------------------------------------------------------------------- gather_combine
def gather_combine(rows: jax.Array, row_of: jax.Array, weights: jax.Array | None = None, *, k: int | None = None,
                   block_rows: int | None = None, interpret: bool | None = None, backend: str = "auto") -> jax.Array:
  """rows [R, D], row_of int [N, k] (or [N * k] with k given), weights [N, k] (or [N * k]) or None (all ones)
  -> [N, D] in rows' dtype: out[n] = sum_j weights[n, j] * rows[row_of[n, j]], terms with row_of not in [0, R)
  zero; the products (rows and weights in float32) and the sum in float32. block_rows: tokens per grid step."""
  k = row_of.shape[-1] if row_of.ndim == 2 else k
  if k is None:
    raise ValueError("gather_combine: give k with a flat row_of")
  row_of = row_of.reshape(-1, k).astype(jnp.int32)
  w = jnp.ones(row_of.shape, jnp.float32) if weights is None else weights.reshape(row_of.shape).astype(jnp.float32)
  return _dispatch(_gather_combine_xla, functools.partial(_gather_combine_mosaic, block_rows=block_rows),
                   (rows, row_of, w), interpret, backend)


def _gather_combine_xla(rows, row_of, w):
  valid = _in_range(row_of, rows.shape[0])
  picked = jnp.take(rows, jnp.where(valid, row_of, 0), axis=0).astype(jnp.float32)
  return jnp.where(valid[..., None], picked * w[..., None], 0.0).sum(1).astype(rows.dtype)


def _unpack(words, packed: bool):
  """32-bit rows to float32 values: (values,), or the (low, high) halves of bf16 words (`_words`)."""
  if not packed:
    return (words,)
  as_f32 = lambda u: lax.bitcast_convert_type(u, jnp.float32)
  return as_f32(words << 16), as_f32(words & jnp.uint32(0xFFFF0000))  # (columns c, c + D / 2: `_words`)


def _pack(parts, packed: bool):
  """The inverse of `_unpack`, rounding to bf16 (round to nearest even, by the hardware convert)."""
  if not packed:
    return parts[0]
  bits = lambda v: lax.bitcast_convert_type(v.astype(jnp.bfloat16).astype(jnp.float32), jnp.uint32)
  return (bits(parts[0]) >> 16) | (bits(parts[1]) & jnp.uint32(0xFFFF0000))


def _gather_combine_kernel(idx_ref, w_ref, rows_hbm, out_ref, picked_ref, zero_ref, sem, *, block_rows: int, k: int,
                           num_src: int, packed: bool):
  base = pl.program_id(0) * block_rows * k
  zero_ref[...] = jnp.zeros_like(zero_ref)

  def copy(t):  # t = token * k + slot within the block (lax.div/rem: t >= 0, and no sign op to lower)
    i, dst = idx_ref[base + t], picked_ref.at[lax.rem(t, k), lax.div(t, k)]
    return _Either(_in_range(i, num_src), lambda: _copy(rows_hbm.at[pl.ds(jnp.clip(i, 0, num_src - 1), 1)], dst, sem),
                   lambda: _copy(zero_ref.at[pl.ds(0, 1)], dst, sem))

  _row_dmas(block_rows * k, copy, lambda t: True)
  cw = moe_gmm_tpu.lane_tile(out_ref.shape[1])

  def tile(i, carry):  # 8 rows x cw words at a time: the terms stay in vector registers
    r0 = pl.multiple_of(i * 8, 8)
    w = w_ref[pl.ds(r0, 8), :]
    for c0 in range(0, out_ref.shape[1], cw):
      acc = None
      for j in range(k):
        parts = _unpack(picked_ref[j, pl.ds(r0, 8), :, pl.ds(c0, cw)].reshape(8, cw), packed)
        terms = [p * w[:, j:j + 1] for p in parts]
        acc = terms if acc is None else [a + b for a, b in zip(acc, terms)]
      out_ref[pl.ds(r0, 8), pl.ds(c0, cw)] = _pack(acc, packed).astype(out_ref.dtype)
    return carry

  lax.fori_loop(0, block_rows // 8, tile, 0)


def _gather_combine_mosaic(rows, row_of, w, *, block_rows: int | None, interpret: bool):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  (r, d), (n, k) = rows.shape, row_of.shape
  rw = _words(rows)
  dw = rw.shape[1]
  lo, hi = COMBINE_BLOCK_ROWS
  bm = block_rows or max(lo, min(hi, -(-n // lo) * lo, COMBINE_BYTES // (k * dw * 4) // lo * lo))
  np_ = -(-n // bm) * bm
  row_of = _pad_to(row_of, np_, 0, r)
  w = jnp.where(_in_range(row_of, r), _pad_to(w, np_, 0, 0.0), 0.0)
  rw, row_of, w = vma.vary_alike(rw, row_of, w)
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(np_ // bm,),
      in_specs=[pl.BlockSpec((bm, k), lambda i, idx: (i, 0)), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((bm, dw), lambda i, idx: (i, 0)),
      scratch_shapes=[pltpu.VMEM((k, bm, 1, dw), rw.dtype), pltpu.VMEM((8, dw), rw.dtype),
                      pltpu.SemaphoreType.DMA(())])
  cost = pl.CostEstimate(flops=2 * n * k * dw * 4 // jnp.dtype(rows.dtype).itemsize, transcendentals=0,
                         bytes_accessed=n * k * dw * 4 + n * dw * 4 + 8 * n * k)
  kernel = functools.partial(_gather_combine_kernel, block_rows=bm, k=k, num_src=r, packed=rw.dtype == jnp.uint32)
  out = _call(kernel, spec, vma.shape_dtype((n, dw), rw.dtype, rw), interpret, "moe_gather_combine", cost)(
      row_of.reshape(-1), w, rw)  # (the last block may be partial: Pallas drops its rows past n)
  return _unwords(out, rows.dtype, d)
