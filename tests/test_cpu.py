"""The launchers' re-execution with glibc huge pages (jpllm_jax/cpu.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from jpllm_jax import cpu

CODE = ("import os, sys; from jpllm_jax import cpu; cpu.use_huge_pages(); "
        "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])")


def _run(env):
  env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
  out = subprocess.run([sys.executable, "-c", CODE, "a", "--b=1"], cwd=REPO, env=env, capture_output=True,
                       text=True, check=True)
  return out.stdout.strip()


@pytest.mark.skipif(not cpu.huge_pages_helpful(), reason="no glibc >= 2.35 with THP in madvise mode here")
def test_reexecutes_once_with_the_tunable_keeping_arguments_and_other_tunables():
  assert _run({"GLIBC_TUNABLES": None}) == "glibc.malloc.hugetlb=1 ['a', '--b=1']"
  assert _run({"GLIBC_TUNABLES": "glibc.malloc.check=0"}) == \
      "glibc.malloc.check=0:glibc.malloc.hugetlb=1 ['a', '--b=1']"


def test_can_be_turned_off():
  assert _run({"GLIBC_TUNABLES": None, cpu.DISABLE_ENV: "1"}) == "['a', '--b=1']"


# ---------------------------------------------------------------------------------------- platform profile
A64FX_CPUINFO = """processor\t: 0
BogoMIPS\t: 200.00
Features\t: fp asimd evtstrm sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm fcma dcpop sve
CPU implementer\t: 0x46
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0x001
CPU revision\t: 0

processor\t: 1
Features\t: fp asimd
"""


def test_detects_a64fx_by_implementer_and_part_with_the_sve_length():
  p = cpu.detect(A64FX_CPUINFO, arch="aarch64", sve_bits=512, cores=48, numa_nodes=4)
  assert (p.name, p.isa, p.a64fx, p.fp32_lanes, p.threads_per_process, p.processes_per_node) == \
      ("a64fx", "sve", True, 16, 12, 4)
  assert p.pad(144) == 144 and p.pad(100) == 112 and p.pad(100, itemsize=2) == 128
  # A kernel that limits SVE to 256 bits (prctl) halves the lanes.
  assert cpu.detect(A64FX_CPUINFO, arch="aarch64", sve_bits=256, cores=48, numa_nodes=4).fp32_lanes == 8


def test_detects_other_aarch64_and_x86():
  neon = A64FX_CPUINFO.replace(" sve", "").replace("0x46", "0x41").replace("0x001", "0xd0c")
  assert cpu.detect(neon, arch="aarch64", sve_bits=0, cores=4, numa_nodes=1).name == "aarch64-neon"
  sve = A64FX_CPUINFO.replace("0x46", "0x41").replace("0x001", "0xd40")
  assert cpu.detect(sve, arch="aarch64", sve_bits=256, cores=4, numa_nodes=1).fp32_lanes == 8
  # Under qemu-user /proc/cpuinfo is the host's, but prctl reports the emulated SVE length.
  assert cpu.detect("flags : avx2\n", arch="aarch64", sve_bits=512, cores=2, numa_nodes=1).fp32_lanes == 16
  assert cpu.detect("flags : avx2\n", arch="aarch64", sve_bits=0, cores=2, numa_nodes=1).name == "aarch64-neon"
  x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2\n"
  assert cpu.detect(x86, arch="x86_64", cores=8, numa_nodes=2).fp32_lanes == 8
  assert cpu.detect(x86.replace("avx2", "avx2 avx512f"), arch="x86_64").fp32_lanes == 16
  assert cpu.detect("flags : sse2\n", arch="x86_64").isa == "sse"


def test_profile_is_cached_and_overridable(monkeypatch):
  monkeypatch.setenv(cpu.PROFILE_ENV, "a64fx")
  cpu.profile.cache_clear()
  try:
    p = cpu.profile()
    assert p is cpu.profile() and p == cpu.PRESETS["a64fx"] and p.threads_per_process == 12
    assert p.grad_barrier("cpu") and not p.grad_barrier("gpu")
    assert p.moe_impl("cpu") == "padded" and p.moe_impl("tpu") == "ragged"
    monkeypatch.setenv(cpu.PROFILE_ENV, "pentium")
    cpu.profile.cache_clear()
    with pytest.raises(ValueError, match="pentium"):
      cpu.profile()
  finally:
    monkeypatch.delenv(cpu.PROFILE_ENV)
    cpu.profile.cache_clear()
  assert cpu.profile() == cpu.detect()
