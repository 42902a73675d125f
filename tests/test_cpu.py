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
