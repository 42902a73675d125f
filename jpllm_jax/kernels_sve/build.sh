#!/usr/bin/env bash
# Builds the SVE batched-GEMM FFI kernel (sve_gemm.cc) as an aarch64 shared object against XLA's FFI headers
# (jax.ffi.include_dir(): header-only C++ API).
#
#   jpllm_jax/kernels_sve/build.sh [OUT.so]     # default build/kernels_sve/libjpllm_sve_gemm.so in the repo
#
# On an aarch64 machine (A64FX) it uses $CXX or g++; elsewhere $CXX or aarch64-linux-gnu-g++ (tools/a64fx/setup.sh
# unpacks Debian's cross compiler and sets CXX="<cross>/aarch64-linux-gnu-g++ --sysroot=<cross root>").
# -march=armv8.2-a+sve is A64FX's ISA; no -msve-vector-bits: the code is vector-length agnostic.
# The loader (jpllm_jax/kernels_sve/__init__.py) finds the library at $JPLLM_SVE_GEMM_LIB or the default path.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/build/kernels_sve/libjpllm_sve_gemm.so}
PY=${PYTHON:-python}
if [ -z "${CXX:-}" ]; then
  if [ "$(uname -m)" = aarch64 ]; then CXX=g++; else CXX=aarch64-linux-gnu-g++; fi
fi
INC=$("$PY" -c 'import jax; print(jax.ffi.include_dir())')
mkdir -p "$(dirname "$OUT")"
# shellcheck disable=SC2086  # CXX may carry flags (--sysroot=...)
$CXX -O3 -std=c++17 -march=armv8.2-a+sve -mtune=a64fx -fPIC -shared -Wall -isystem "$INC" \
  "$HERE/sve_gemm.cc" -o "$OUT"
echo "$OUT"
