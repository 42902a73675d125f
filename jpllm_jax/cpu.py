"""Host-process settings for running XLA on CPUs (laptops, CPU clusters, A64FX).

XLA:CPU allocates each step's temporary buffers (gigabytes for a training step) afresh from the OS. With
the kernel's transparent huge pages in `madvise` mode (the common default), every 4 KiB page of them is
faulted in and zeroed again on every step: about a million page faults and 20% of the CPU time of the
benchmark step (benchmarks/train_throughput.py). glibc's `glibc.malloc.hugetlb=1` tunable makes malloc
ask for huge pages for such allocations, which cuts the faults 100-fold. Tunables are read when a process
starts, so `use_huge_pages()` re-executes the current command with it set (the process id is kept).
"""
from __future__ import annotations

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
