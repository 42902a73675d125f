"""The SVE batched-GEMM kernel (sve_gemm.cc) as a JAX op through XLA's FFI (issue 19).

`bdot(a, b)` is [G, M, K] x [G, K, N] -> [G, M, N] in fp32, one custom call running the ACLE kernel; its
gradient is two more calls of it on transposed operands. It runs only in an aarch64 process with SVE whose
shared object has been built (build.sh) and is found at $JPLLM_SVE_GEMM_LIB or build/kernels_sve/ in the repo;
`available()` says whether it is. batched_gemm.py uses it for its padded buckets when the platform profile
(cpu.Profile.gemm_kernel) asks for it and it is available, and XLA's dot_general otherwise.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

import jax
import jax.numpy as jnp

LIB_ENV = "JPLLM_SVE_GEMM_LIB"
TARGET = "jpllm_sve_bgemm"
_DEFAULT_LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "build", "kernels_sve", "libjpllm_sve_gemm.so")


def library_path() -> str:
  return os.environ.get(LIB_ENV) or _DEFAULT_LIB


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
  """(the loaded library, "") with its FFI target registered, or (None, why not)."""
  if platform.machine() not in ("aarch64", "arm64"):
    return None, f"not an aarch64 process ({platform.machine()})"
  path = library_path()
  if not os.path.exists(path):
    return None, f"{path} not built (jpllm_jax/kernels_sve/build.sh)"
  try:
    lib = ctypes.CDLL(path)
  except OSError as e:
    return None, f"{path}: {e}"
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JpllmSveBatchedGemm), platform="cpu")
  return lib, ""


def available() -> bool:
  """Whether bdot can run here (aarch64, library built and loaded)."""
  return _load()[0] is not None


def unavailable_reason() -> str:
  return _load()[1]


def fp32_lanes() -> int:
  """The kernel's SVE vector length in fp32 lanes, as svcntw() reports it (16 on A64FX)."""
  lib = _load()[0]
  if lib is None:
    raise RuntimeError(f"SVE GEMM kernel unavailable: {unavailable_reason()}")
  lib.jpllm_sve_fp32_lanes.restype = ctypes.c_int64
  return int(lib.jpllm_sve_fp32_lanes())


def _call(a: jax.Array, b: jax.Array) -> jax.Array:
  g, m, _ = a.shape
  out = jax.ShapeDtypeStruct((g, m, b.shape[2]), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(a, b)


@jax.custom_vjp
def bdot(a: jax.Array, b: jax.Array) -> jax.Array:
  """[G, M, K] x [G, K, N] -> [G, M, N], fp32, by the SVE kernel (inputs cast to fp32)."""
  if not available():
    raise RuntimeError(f"SVE GEMM kernel unavailable: {unavailable_reason()}")
  if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
    raise ValueError(f"bdot wants [G, M, K] x [G, K, N], got {a.shape} x {b.shape}")
  return _call(a.astype(jnp.float32), b.astype(jnp.float32))


def _fwd(a, b):
  return bdot(a, b), (a, b)


def _bwd(res, dc):
  a, b = res
  da = bdot(dc, jnp.swapaxes(b, 1, 2))     # [G, M, N] x [G, N, K]
  db = bdot(jnp.swapaxes(a, 1, 2), dc)     # [G, K, M] x [G, M, N]
  return da.astype(a.dtype), db.astype(b.dtype)


bdot.defvjp(_fwd, _bwd)
