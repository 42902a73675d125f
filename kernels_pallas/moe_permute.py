"""The MoE layer's token permutation and gate-weighted combine as row gathers by DMA (Mosaic, TPU).

  gather_rows(x [T, D], idx [R])                 out[r] = x[idx[r]]                          (0 if idx[r] not in [0, T))
  gather_combine(rows [R, D], row_of [N, k], w)  out[n] = sum_j w[n, j] * rows[row_of[n, j]]  (0 terms for rows not
                                                 in [0, R)), products and sum in float32, out in rows' dtype

jpllm_jax/moe/ops.py uses them around the grouped matmul of its "pallas" layout: tokens (and dy) into the
expert-sorted rows (index A // k = N for an empty padding row), rows back to assignment order (row_of, index = the
row count for a dropped assignment), and the combines of y and dx.

Mosaic design: the indices are scalar prefetch (SMEM, 4 bytes per index: a few hundred KiB of SMEM bound one call),
the source stays in HBM (`memory_space=pl.ANY`), and each grid step DMAs the source rows of its `block_rows`
output rows (k per token for the combine), one DMA per row, at most `INFLIGHT` outstanding on one semaphore (all
copies are one row, so any completion satisfies a wait), into a [k, block_rows, 1, D] VMEM scratch (the 1-row
dim keeps a row's offset off the tiled dims); an out-of-range row copies a zero row. It then writes the output
block from the scratch 8 (16 for bf16) rows by one lane tile at a time: the rows as they are, or for the
combine their weighted sum in float32.

A DMA moves whole 32-bit sublanes and a packed bf16 tile holds two rows per sublane, so a single bf16 row of an HBM
array is not addressable: bf16 sources are first viewed as uint32 words that hold column c in the low and column
c + D/2 in the high half (`_words`: one elementwise XLA pass over the source and a [T, D/2] uint32 temporary); the
kernel unpacks the words by shifts and writes bf16 output blocks directly. f32 sources are read as they are.

What it beats: XLA's combine gathers the picked [N, k, D] rows and reduces them (materialised in HBM unless XLA
fuses the gather into the reduce); here only the [N, D] result is written, and each permutation is one pass of row
DMAs (R D bytes read, R D written). What it does not beat: the bytes of the permutation itself, nor the grouped
matmul's separate read of its rows (nothing is fused into the GMM); for bf16 the word view of the source costs an
extra pass and temporary (for ops.py's [A, F] residual gathers, the largest); and single-row DMAs are short
transfers whose issue rate, not bandwidth, may bound small D. Not timed on a TPU here: only compiled
(benchmarks/moe_permute_tpu.py).

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
SCRATCH_BYTES = 2 << 20  # VMEM bytes of the gathered rows of one grid step (the output block is as large, twice)
MAX_BLOCK_ROWS = 256
LANES = 128


# ------------------------------------------------------------------------------------------------ helpers
def _pad_to(a: jax.Array, size: int, axis: int, value) -> jax.Array:
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, pad, constant_values=value) if size != a.shape[axis] else a


def _words(a: jax.Array) -> jax.Array:
  """a [M, D] as 32-bit rows [M, D'] of whole lane tiles (D zero-padded): f32 as it is, bf16 as uint32 words that
  hold column c in the low and column c + D' / 2 of the padded array in the high half (module docstring)."""
  dtype = jnp.dtype(a.dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"the Mosaic row gathers take float32 or bfloat16, not {dtype.name}")
  per_word = 4 // dtype.itemsize
  a = _pad_to(a, -(-a.shape[1] // (LANES * per_word)) * LANES * per_word, 1, 0)
  if per_word == 1:
    return a
  h = a.shape[1] // 2
  half = lambda v: lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32)  # (sliced first: one XLA fusion)
  return half(a[:, :h]) | (half(a[:, h:]) << 16)


def _unpack(words, packed: bool):
  """Word rows to float32 values: (values,), or the (low, high) halves of bf16 words: columns c and c + D' / 2."""
  if not packed:
    return (words,)
  as_f32 = lambda u: lax.bitcast_convert_type(u, jnp.float32)
  return as_f32(words << 16), as_f32(words & jnp.uint32(0xFFFF0000))


def _block_rows(rows: int, row_bytes: int, dtype, block_rows: int | None) -> int:
  """block_rows, or the largest power of two whose gathered rows take at most SCRATCH_BYTES (<= MAX_BLOCK_ROWS and
  not far past `rows`); a multiple of the output's TPU row tile either way (moe_gmm_tpu.row_multiple)."""
  rm = moe_gmm_tpu.row_multiple(dtype)
  if block_rows is None:
    block_rows = MAX_BLOCK_ROWS
    while block_rows > rm and (block_rows * row_bytes > SCRATCH_BYTES or block_rows >= 2 * rows):
      block_rows //= 2
  if block_rows % rm:
    raise ValueError(f"block_rows={block_rows} must be a multiple of {rm} for {jnp.dtype(dtype).name} TPU tiles")
  return block_rows


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


def _copy(src, dst, sem):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  return pltpu.make_async_copy(src, dst, sem)


def _gather_into(idx_ref, src_hbm, picked_ref, zero_ref, sem, *, k: int, num_src: int):
  """DMAs, for t < block rows * k, source row idx_ref[base + t] (base: this grid step's first) into
  picked_ref[t % k, t // k], a zero row where the index is out of range; at most INFLIGHT outstanding."""
  count = picked_ref.shape[0] * picked_ref.shape[1]
  base = pl.program_id(0) * count
  zero_ref[...] = jnp.zeros_like(zero_ref)

  def start_or_wait(t, start: bool):  # (lax.div/rem: t >= 0, and no sign op to lower)
    i, dst = idx_ref[base + t], picked_ref.at[lax.rem(t, k), lax.div(t, k)]
    row = lambda: _copy(src_hbm.at[pl.ds(jnp.clip(i, 0, num_src - 1), 1)], dst, sem)
    if not start:
      return row().wait()  # (either copy: the same byte count on the same semaphore)
    pl.when(_in_range(i, num_src))(lambda: row().start())
    pl.when(~_in_range(i, num_src))(lambda: _copy(zero_ref.at[pl.ds(0, 1)], dst, sem).start())

  def body(t, carry):
    pl.when(t < count)(lambda: start_or_wait(jnp.minimum(t, count - 1), True))
    pl.when(t >= INFLIGHT)(lambda: start_or_wait(jnp.maximum(t - INFLIGHT, 0), False))
    return carry

  lax.fori_loop(0, count + INFLIGHT, body, 0)


def _write_tiles(out_ref, picked_ref, values):
  """out_ref's block, (rows of one sublane tile) x (one lane tile of words) at a time, so the values stay in vector
  registers: values(words [k, rows, lane tile], first row) -> the tile's output parts (bf16: the low and high
  halves' columns, module docstring; f32: one)."""
  rt, dw = moe_gmm_tpu.row_multiple(out_ref.dtype), picked_ref.shape[-1]
  cw = moe_gmm_tpu.lane_tile(dw)

  def tile(i, carry):
    r0 = pl.multiple_of(i * rt, rt)
    for c0 in range(0, dw, cw):
      words = picked_ref[:, pl.ds(r0, rt), :, pl.ds(c0, cw)].reshape(picked_ref.shape[0], rt, cw)
      for h, part in enumerate(values(words, r0)):
        out_ref[pl.ds(r0, rt), pl.ds(h * dw + c0, cw)] = part.astype(out_ref.dtype)
    return carry

  lax.fori_loop(0, out_ref.shape[0] // rt, tile, 0)


def _call(kernel, grid_spec, out_shape, interpret: bool, name: str, cost: pl.CostEstimate):
  """A pallas_call of this module's kernels: the TPU interpreter or the Mosaic compiler, row blocks in parallel."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, name=name, cost_estimate=cost,
                        interpret=pltpu.InterpretParams() if interpret else False,
                        compiler_params=None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel",)))


def _gather_call(name: str, kernel, rows_w, idx, extra, k: int, n_out: int, out_dtype, bm: int, interpret: bool,
                 cost: pl.CostEstimate):
  """The pallas_call shared by both kernels: idx (padded to whole blocks with out-of-range rows) as scalar
  prefetch, `extra` [n, k] f32 inputs blocked with the output rows, the word rows in HBM, the [n_out, D'] output."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  dw = rows_w.shape[1]
  d_out = dw * 4 // jnp.dtype(out_dtype).itemsize
  nb = -(-n_out // bm)
  idx = _pad_to(idx, nb * bm * k, 0, rows_w.shape[0])
  rows_w, idx, *extra = vma.vary_alike(rows_w, idx, *extra)
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(nb,),
      in_specs=[*[pl.BlockSpec((bm, k), lambda i, idx: (i, 0)) for _ in extra], pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((bm, d_out), lambda i, idx: (i, 0)),  # (the last block may be partial: rows dropped)
      scratch_shapes=[pltpu.VMEM((k, bm, 1, dw), rows_w.dtype), pltpu.VMEM((8, dw), rows_w.dtype),
                      pltpu.SemaphoreType.DMA(())])
  return _call(kernel, spec, vma.shape_dtype((n_out, d_out), out_dtype, rows_w), interpret, name, cost)(
      idx, *extra, rows_w)


# ------------------------------------------------------------------------------------------- gather_rows
def gather_rows(x: jax.Array, idx: jax.Array, *, block_rows: int | None = None, interpret: bool | None = None,
                backend: str = "auto") -> jax.Array:
  """x [T, D], idx int [R] -> [R, D]: out[r] = x[idx[r]], zeros where idx[r] is not in [0, T) (jnp.take with
  mode="fill", fill_value=0, except that negative indices do not wrap). block_rows: rows per grid step."""
  return _dispatch(_gather_rows_xla, functools.partial(_gather_rows_mosaic, block_rows=block_rows),
                   (x, idx.astype(jnp.int32)), interpret, backend)


def _gather_rows_xla(x, idx):
  return jnp.take(x, jnp.where(idx < 0, x.shape[0], idx), axis=0, mode="fill", fill_value=0)


def _gather_rows_kernel(idx_ref, x_hbm, out_ref, picked_ref, zero_ref, sem, *, num_src: int):
  _gather_into(idx_ref, x_hbm, picked_ref, zero_ref, sem, k=1, num_src=num_src)
  packed = picked_ref.dtype == jnp.uint32
  _write_tiles(out_ref, picked_ref, lambda words, r0: _unpack(words[0], packed))


def _gather_rows_mosaic(x, idx, *, block_rows: int | None, interpret: bool):
  (t, d), r = x.shape, idx.shape[0]
  xw = _words(x)
  bm = _block_rows(r, xw.shape[1] * 4, x.dtype, block_rows)
  cost = pl.CostEstimate(flops=0, transcendentals=0, bytes_accessed=2 * r * xw.shape[1] * 4 + 4 * r)
  out = _gather_call("moe_gather_rows", functools.partial(_gather_rows_kernel, num_src=t), xw, idx, (), 1, r,
                     x.dtype, bm, interpret, cost)
  return out[:, :d] if out.shape[1] != d else out


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


def _gather_combine_kernel(idx_ref, w_ref, rows_hbm, out_ref, picked_ref, zero_ref, sem, *, k: int, num_src: int):
  _gather_into(idx_ref, rows_hbm, picked_ref, zero_ref, sem, k=k, num_src=num_src)
  packed = picked_ref.dtype == jnp.uint32

  def weighted_sum(words, r0):
    w = w_ref[pl.ds(r0, words.shape[1]), :]
    acc = None
    for j in range(k):
      terms = [p * w[:, j:j + 1] for p in _unpack(words[j], packed)]
      acc = terms if acc is None else [a + b for a, b in zip(acc, terms)]
    return acc

  _write_tiles(out_ref, picked_ref, weighted_sum)


def _gather_combine_mosaic(rows, row_of, w, *, block_rows: int | None, interpret: bool):
  (r, d), (n, k) = rows.shape, row_of.shape
  rw = _words(rows)
  dw = rw.shape[1]
  bm = _block_rows(n, k * dw * 4, rows.dtype, block_rows)
  w = jnp.where(_in_range(row_of, r), w, 0.0)  # (a zero row's weight: no 0 * inf)
  w = _pad_to(w, -(-n // bm) * bm, 0, 0.0)
  flops = 2 * n * k * dw * 4 // jnp.dtype(rows.dtype).itemsize
  cost = pl.CostEstimate(flops=flops, transcendentals=0,
                         bytes_accessed=n * k * dw * 4 + n * dw * 4 + 8 * n * k)
  out = _gather_call("moe_gather_combine", functools.partial(_gather_combine_kernel, k=k, num_src=r), rw,
                     row_of.reshape(-1), (w,), k, n, rows.dtype, bm, interpret, cost)
  return out[:, :d] if out.shape[1] != d else out
