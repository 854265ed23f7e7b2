"""The glibc allocator settings of `lm.train.runtime`: added once, the user's tunables win, and the
re-executed process sees them (glibc reads them only at start-up)."""

import os
import subprocess
import sys

import pytest

from lm.train import runtime

pytestmark = pytest.mark.skipif(not runtime._glibc_linux(), reason="glibc Linux only")


def test_allocator_env_keeps_the_users_tunables():
  env = runtime.cpu_allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.pthread."
                                                     "rseq=0"})
  tunables = env["GLIBC_TUNABLES"].split(":")
  assert "glibc.malloc.arena_max=4" in tunables and "glibc.pthread.rseq=0" in tunables
  assert "glibc.malloc.arena_max=1" not in tunables
  assert "glibc.malloc.mmap_max=0" in tunables
  assert runtime.cpu_allocator_env(env) == env  # idempotent
  assert "GLIBC_TUNABLES" not in runtime.cpu_allocator_env({runtime.OPT_OUT: "1"})


@pytest.mark.subprocess
def test_reexec_starts_the_same_command_with_the_tunables():
  code = ("import os; from lm.train.runtime import reexec_with_cpu_allocator; "
          "reexec_with_cpu_allocator(); print(os.environ['GLIBC_TUNABLES'])")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT)}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=root, check=True)
  assert out.stdout.strip() == runtime.cpu_allocator_env(env)["GLIBC_TUNABLES"]
