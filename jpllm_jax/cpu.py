"""Host-process settings for running XLA on CPUs (laptops, CPU clusters, A64FX).

XLA:CPU allocates each step's temporary buffers (gigabytes for a training step) afresh from the OS. With
the kernel's transparent huge pages in `madvise` mode (the common default), every 4 KiB page of them is
faulted in and zeroed again on every step: about a million page faults and 20% of the CPU time of the
benchmark step (benchmarks/train_throughput.py). glibc's `glibc.malloc.hugetlb=1` tunable makes malloc
ask for huge pages for such allocations, which cuts the faults 100-fold. Tunables are read when a process
starts, so `use_huge_pages()` re-executes the current command with it set (the process id is kept).

`profile()` is the platform profile: the CPU detected once (x86 AVX2 / AVX-512, aarch64 NEON / SVE and its
vector length, A64FX by its part number, core and NUMA counts) and the one place the code asks for vector width,
padding, threads per process and the backend heuristics.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import sys

_TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
DISABLE_ENV = "JPLLM_NO_HUGE_PAGES"


def huge_pages_helpful() -> bool:
  """Whether the re-execution would change anything: Linux, glibc >= 2.35, THP in `madvise` mode, and the
  tunable not yet set (nor disabled with JPLLM_NO_HUGE_PAGES=1)."""
  if sys.platform != "linux" or os.environ.get(DISABLE_ENV):
    return False
  if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
    return False
  lib, version = platform.libc_ver()
  try:
    if lib != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
      return False
    with open(_THP, encoding="ascii") as f:
      return "[madvise]" in f.read()
  except (OSError, ValueError):
    return False


def use_huge_pages() -> None:
  """Re-executes this process with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` when that helps (see the module
  docstring); call it first thing in a launcher's `__main__`. Returns without doing anything otherwise."""
  if not huge_pages_helpful():
    return
  tunables = os.environ.get("GLIBC_TUNABLES")
  os.environ["GLIBC_TUNABLES"] = f"{tunables}:{_TUNABLE}" if tunables else _TUNABLE
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


# ------------------------------------------------------------------------------------------ platform profile
# The one place the code asks what CPU it runs on: vector width, padding, threads per process and the backend
# heuristics that steer code paths (issue 19). Detected once from /proc and /sys; JPLLM_CPU_PROFILE names a
# preset instead (tests, cross-planning for Fugaku from an x86 login node).
PROFILE_ENV = "JPLLM_CPU_PROFILE"
_CPUINFO = "/proc/cpuinfo"
_SVE_VL = "/proc/sys/abi/sve_default_vector_length"
_PR_SVE_GET_VL, _PR_SVE_VL_LEN_MASK = 51, 0xFFFF
# A64FX: "CPU implementer 0x46" (Fujitsu), "CPU part 0x001"; 48 compute cores in 4 CMGs (NUMA nodes).
_A64FX = ("0x46", "0x001")


@dataclasses.dataclass(frozen=True)
class Profile:
  """What the code needs to know about the CPU. `vector_bits` is the widest SIMD register the ISA offers
  (512 for AVX-512 and A64FX's SVE, 256 for AVX2, 128 for NEON and SSE)."""
  name: str          # a64fx | aarch64-sve | aarch64-neon | x86-avx512 | x86-avx2 | x86-sse | generic
  arch: str          # platform.machine(): x86_64, aarch64, ...
  isa: str           # avx512 | avx2 | sse | sve | neon | scalar
  vector_bits: int
  cores: int         # CPUs this process may run on
  numa_nodes: int    # CMGs on A64FX
  a64fx: bool = False

  @property
  def fp32_lanes(self) -> int:
    """fp32 elements per vector register: 16 for SVE-512 / AVX-512, 8 for AVX2, 4 for NEON."""
    return max(1, self.vector_bits // 32)

  def lanes(self, itemsize: int = 4) -> int:
    """Elements of `itemsize` bytes per vector register."""
    return max(1, self.vector_bits // (8 * itemsize))

  @property
  def pad_multiple(self) -> int:
    """The multiple GEMM dimensions are padded to (batched_gemm.py): one vector of fp32."""
    return self.fp32_lanes

  def pad(self, n: int, itemsize: int = 4) -> int:
    """`n` rounded up to a whole number of vectors of `itemsize`-byte elements."""
    m = self.lanes(itemsize)
    return -(-n // m) * m

  @property
  def gemm_kernel(self) -> str:
    """The kernel of batched_gemm's padded buckets: "sve" (jpllm_jax/kernels_sve, an ACLE FFI kernel, used where
    its library loads: an aarch64 process with SVE) or "xla" (XLA's dot_general; stock XLA emits NEON on
    aarch64, a quarter of A64FX's vector width)."""
    return "sve" if self.isa == "sve" else "xla"

  @property
  def processes_per_node(self) -> int:
    """One process per NUMA node (a CMG on A64FX): local memory, no cross-CMG traffic inside a step."""
    return max(1, self.numa_nodes)

  @property
  def threads_per_process(self) -> int:
    """Compute threads for one process per NUMA node (12 on A64FX)."""
    return max(1, self.cores // self.processes_per_node)

  def grad_barrier(self, backend: str) -> bool:
    """Whether the house matmul's backward puts an optimisation barrier on the cotangent (models/layers.py):
    on XLA:CPU it stops the elementwise backward from fusing into a slow transposing copy."""
    return backend == "cpu"

  def moe_impl(self, backend: str) -> str:
    """moe_ffn's "auto" implementation on `backend` (the table and its reasons: moe/tuning.py)."""
    from jpllm_jax.moe import tuning  # pylint: disable=import-outside-toplevel
    return tuning.IMPL_BY_BACKEND.get(backend, tuning.DEFAULT_IMPL)


def _read(path: str) -> str:
  try:
    with open(path, encoding="ascii", errors="replace") as f:
      return f.read()
  except OSError:
    return ""


def _cpuinfo_fields(text: str) -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo ("flags" on x86, "Features" on aarch64)."""
  fields: dict[str, str] = {}
  for line in text.splitlines():
    if not line.strip():
      if fields:
        break
      continue
    key, _, value = line.partition(":")
    fields.setdefault(key.strip().lower(), value.strip())
  return fields


def _sve_bits() -> int:
  """This process's SVE vector length in bits: prctl(PR_SVE_GET_VL), else the kernel's default, else 0."""
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    vl = ctypes.CDLL(None, use_errno=True).prctl(_PR_SVE_GET_VL, 0, 0, 0, 0)
    if vl > 0:
      return 8 * (vl & _PR_SVE_VL_LEN_MASK)
  except (OSError, AttributeError):
    pass
  text = _read(_SVE_VL).strip()
  return 8 * int(text) if text.isdigit() else 0


def _numa_nodes() -> int:
  try:
    return max(1, sum(1 for n in os.listdir("/sys/devices/system/node") if n[4:].isdigit() and n[:4] == "node"))
  except OSError:
    return 1


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def detect(cpuinfo: str | None = None, arch: str | None = None, sve_bits: int | None = None,
           cores: int | None = None, numa_nodes: int | None = None) -> Profile:
  """The profile of this machine; the arguments replace what is read from /proc and /sys (tests)."""
  arch = arch or platform.machine()
  fields = _cpuinfo_fields(_read(_CPUINFO) if cpuinfo is None else cpuinfo)
  cores = _cores() if cores is None else cores
  numa_nodes = _numa_nodes() if numa_nodes is None else numa_nodes
  if arch in ("aarch64", "arm64"):
    features = set(fields.get("features", "").split())
    a64fx = (fields.get("cpu implementer", "").lower(), fields.get("cpu part", "").lower()) == _A64FX
    # prctl answers for this process even where /proc/cpuinfo is not this CPU's (qemu-user shows the host's).
    bits = _sve_bits() if sve_bits is None else sve_bits
    if "sve" in features or a64fx or bits:
      bits = bits or (512 if a64fx else 128)
      return Profile("a64fx" if a64fx else "aarch64-sve", "aarch64", "sve", bits, cores, numa_nodes, a64fx)
    return Profile("aarch64-neon", "aarch64", "neon", 128, cores, numa_nodes)
  if arch in ("x86_64", "AMD64", "i686"):
    flags = set(fields.get("flags", "").split())
    if "avx512f" in flags:
      return Profile("x86-avx512", arch, "avx512", 512, cores, numa_nodes)
    if "avx2" in flags:
      return Profile("x86-avx2", arch, "avx2", 256, cores, numa_nodes)
    return Profile("x86-sse", arch, "sse", 128, cores, numa_nodes)
  return Profile("generic", arch, "scalar", 128, cores, numa_nodes)


# Named profiles for JPLLM_CPU_PROFILE (planning for a machine from another one, tests).
PRESETS = {
    "a64fx": Profile("a64fx", "aarch64", "sve", 512, 48, 4, True),
    "aarch64-sve": Profile("aarch64-sve", "aarch64", "sve", 256, 64, 1),
    "aarch64-neon": Profile("aarch64-neon", "aarch64", "neon", 128, 8, 1),
    "x86-avx512": Profile("x86-avx512", "x86_64", "avx512", 512, 16, 1),
    "x86-avx2": Profile("x86-avx2", "x86_64", "avx2", 256, 8, 1),
    "x86-sse": Profile("x86-sse", "x86_64", "sse", 128, 4, 1),
}


@functools.lru_cache(maxsize=None)
def profile() -> Profile:
  """This machine's profile, detected once per process; JPLLM_CPU_PROFILE=<preset> (see PRESETS) overrides it.
  Tests that change the variable call `profile.cache_clear()`."""
  name = os.environ.get(PROFILE_ENV, "").strip()
  if not name:
    return detect()
  if name not in PRESETS:
    raise ValueError(f"{PROFILE_ENV}={name!r}: not one of {sorted(PRESETS)}")
  return PRESETS[name]
