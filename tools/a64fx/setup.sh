#!/usr/bin/env bash
# Builds the aarch64 environment for tools/a64fx/run.sh from package registries only, cached under $1:
#   qemu/     Debian's qemu-user-static (amd64), unpacked: qemu/usr/bin/qemu-aarch64-static
#   sysroot/  an aarch64 Python 3.11 and the libraries it loads, unpacked from Debian's arm64 packages
#   site/     aarch64 wheels (jax/jaxlib and the repo's runtime deps at the versions installed on this host)
#   cross/    Debian's gcc-aarch64-linux-gnu cross compiler, binutils and arm64 libc/libstdc++ dev files (amd64 and
#             "all" packages), unpacked: cross/usr/bin/aarch64-linux-gnu-g++ builds jpllm_jax/kernels_sve (~48 MB)
#   pyc.done  site/ and sysroot's standard library compiled to bytecode natively (when this host's Python is 3.11,
#             the emulated one's version): otherwise qemu compiles every module the smoke run imports, every run
# Needs root for `dpkg --add-architecture arm64` and `apt-get update` (done once). Idempotent: a finished part
# leaves a stamp file and is skipped next time.
set -euo pipefail
CACHE=${1:?cache dir}
mkdir -p "$CACHE"
cd "$CACHE"
log() { echo "[a64fx setup] $*" >&2; }
# apt-get download as root into a root-owned dir warns that it cannot sandbox; that warning only.
download() { apt-get download -q "$@" 2>&1 >/dev/null | { grep -v "unsandboxed as root" || true; } >&2; }

if ! dpkg --print-foreign-architectures | grep -qx arm64 \
    || ! apt-cache show libc6:arm64 >/dev/null 2>&1; then
  log "adding the arm64 architecture to apt"
  dpkg --add-architecture arm64
  apt-get update -q >/dev/null
elif ! apt-cache show qemu-user-static >/dev/null 2>&1; then
  apt-get update -q >/dev/null
fi

if [ ! -e qemu/.done ]; then
  log "qemu-user-static"
  rm -rf qemu debs-qemu && mkdir -p qemu debs-qemu
  (cd debs-qemu && download qemu-user-static)
  for d in debs-qemu/*.deb; do dpkg -x "$d" qemu; done
  test -x qemu/usr/bin/qemu-aarch64-static
  touch qemu/.done
fi

# The arm64 packages an interpreter that imports numpy/jaxlib loads (python3.11's own Depends minus the ones
# only its nis/dbm/readline modules use, plus libstdc++ for jaxlib and libssl for hashlib).
ARM_PKGS="libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libbz2-1.0 liblzma5 libcrypt1 libuuid1
  libsqlite3-0 libssl3 libncursesw6 libtinfo6 libreadline8 media-types
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11"
if [ ! -e sysroot/.done ]; then
  log "aarch64 python3.11 and libraries"
  rm -rf sysroot debs-arm64 && mkdir -p sysroot debs-arm64
  # shellcheck disable=SC2086
  (cd debs-arm64 && download $(for p in $ARM_PKGS; do
      case $p in media-types) echo $p;; *) echo "$p:arm64";; esac; done))
  rm -f pyc.done
  for d in debs-arm64/*.deb; do dpkg -x "$d" sysroot; done
  test -x sysroot/usr/bin/python3.11
  touch sysroot/.done
fi

if [ ! -e site/.done ]; then
  log "aarch64 wheels"
  rm -rf site pyc.done && mkdir -p site
  python -m pip freeze --exclude-editable | grep -v -e '^-e ' -e ' @ ' > constraints.txt
  python -m pip install -q --disable-pip-version-check --no-compile \
    --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    --implementation cp --python-version 3.11 --abi cp311 --only-binary=:all: \
    -c constraints.txt --target site "jax==$(python -c 'import jax; print(jax.__version__)')" jaxlib flax optax \
    2> >(grep -v -e "is ignored: it is neither a file nor a directory" -e "Running pip as the 'root' user" >&2)
  touch site/.done
fi
# Host-side dependencies of the cross compiler (libisl23, libmpc3, libmpfr6, libjansson4, ...) are those of the
# host's own gcc-12 and binutils, already installed where the repo builds.
CROSS_PKGS="gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cpp-aarch64-linux-gnu gcc-12-aarch64-linux-gnu
  g++-12-aarch64-linux-gnu cpp-12-aarch64-linux-gnu gcc-12-aarch64-linux-gnu-base gcc-12-cross-base
  binutils-aarch64-linux-gnu libgcc-12-dev-arm64-cross libstdc++-12-dev-arm64-cross libc6-dev-arm64-cross
  libc6-arm64-cross linux-libc-dev-arm64-cross libgcc-s1-arm64-cross libstdc++6-arm64-cross"
if [ ! -e cross/.done ]; then
  log "aarch64 cross compiler"
  rm -rf cross debs-cross && mkdir -p cross debs-cross
  # shellcheck disable=SC2086
  (cd debs-cross && download $CROSS_PKGS)
  for d in debs-cross/*.deb; do dpkg -x "$d" cross; done
  test -x cross/usr/bin/aarch64-linux-gnu-g++
  touch cross/.done
fi

if [ ! -e pyc.done ] && python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  log "bytecode of site/ and the aarch64 standard library"
  # A file that does not compile (the standard library's deliberately broken test inputs) is left to the run.
  python -m compileall -q -j 0 site sysroot/usr/lib/python3.11 >/dev/null 2>&1 || true
  touch pyc.done
fi
log "ready: $CACHE"
