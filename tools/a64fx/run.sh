#!/usr/bin/env bash
# A64FX verified under emulation (issue 19): builds an aarch64 environment from package registries only
# (tools/a64fx/setup.sh: Debian's qemu-user-static and arm64 Python 3.11 via apt-get download + dpkg -x, jax/jaxlib
# aarch64 wheels via pip --platform, Debian's gcc-aarch64-linux-gnu cross compiler), cross-compiles the SVE
# batched-GEMM FFI kernel (jpllm_jax/kernels_sve/build.sh) and checks with aarch64-linux-gnu-objdump that its GEMM
# holds SVE `fmla z` instructions, then runs tools/a64fx/smoke.py (a tiny GPT's forward, one train step, the
# batched GEMM path incl. Fugaku-LLM's TP6 shapes and ragged MoE groups) natively (XLA's dot) and under
# `qemu-aarch64-static -cpu a64fx` (the SVE kernel, required there, also compared with XLA's dot in-process), and
# compares the two (1e-5).
#
#   tools/a64fx/run.sh [CACHE_DIR]        # default $JPLLM_A64FX_CACHE or ~/.cache/jpllm-a64fx
#
# Exit 0 only when the environment builds, both runs finish and every compared array agrees. The last line is
# JSON: setup_s (download + unpack; ~0 when cached), kernel_build_s, sve_fmla (count in the GEMM's object code),
# native_s, emulated_s, max_rel_diff, ok.
# Both sides run with XLA_FLAGS=--xla_backend_optimization_level=0 (XLA's compile under emulation is the slow
# part; natively it changes these results by < 1e-6) and JPLLM_CPU_PROFILE=a64fx (the same GEMM plan; qemu-user
# shows the host's /proc/cpuinfo, so detection there would not see an A64FX).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${1:-${JPLLM_A64FX_CACHE:-$HOME/.cache/jpllm-a64fx}}
PY=${PYTHON:-python}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

t0=$(now)
bash "$HERE/setup.sh" "$CACHE"
t1=$(now)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
X="$CACHE/cross/usr"
LD_LIBRARY_PATH="$X/lib/x86_64-linux-gnu" CXX="$X/bin/aarch64-linux-gnu-g++ --sysroot=$CACHE/cross" PYTHON="$PY" \
  bash "$REPO/jpllm_jax/kernels_sve/build.sh" "$WORK/libjpllm_sve_gemm.so" >/dev/null
fmla=$(LD_LIBRARY_PATH="$X/lib/x86_64-linux-gnu" "$X/bin/aarch64-linux-gnu-objdump" -d "$WORK/libjpllm_sve_gemm.so" \
  | awk '/<jpllm_sve_bgemm>:/,/^$/' | grep -c -P '\tfmla\s+z' || true)
echo "[a64fx run] jpllm_sve_bgemm: $fmla SVE fmla z instructions" >&2
if [ "$fmla" -lt 1 ]; then echo "no SVE fmla in the kernel's object code" >&2; exit 1; fi
t1b=$(now)
export JPLLM_CPU_PROFILE=a64fx JAX_PLATFORMS=cpu XLA_FLAGS=--xla_backend_optimization_level=0
cd "$REPO"
"$PY" tools/a64fx/smoke.py --make-inputs "$WORK/in.npz"
"$PY" tools/a64fx/smoke.py --inputs "$WORK/in.npz" --out "$WORK/x86.npz"
t2=$(now)
JPLLM_SVE_GEMM_LIB="$WORK/libjpllm_sve_gemm.so" PYTHONHOME="$CACHE/sysroot/usr" PYTHONPATH="$CACHE/site" \
  PYTHONDONTWRITEBYTECODE=1 \
  "$CACHE/qemu/usr/bin/qemu-aarch64-static" -cpu a64fx -L "$CACHE/sysroot" "$CACHE/sysroot/usr/bin/python3.11" \
  tools/a64fx/smoke.py --inputs "$WORK/in.npz" --out "$WORK/a64fx.npz" --require-sve
t3=$(now)
status=0
cmp=$("$PY" tools/a64fx/smoke.py --compare "$WORK/x86.npz" "$WORK/a64fx.npz") || status=$?
echo "$cmp"
diff=$(echo "$cmp" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["max_rel_diff"])')
ok=$([ "$status" = 0 ] && echo true || echo false)
times="\"setup_s\": $(secs "$t0" "$t1"), \"kernel_build_s\": $(secs "$t1" "$t1b"), \"sve_fmla\": $fmla"
times="$times, \"native_s\": $(secs "$t1b" "$t2"), \"emulated_s\": $(secs "$t2" "$t3")"
echo "{$times, \"max_rel_diff\": $diff, \"ok\": $ok}"
exit "$status"
