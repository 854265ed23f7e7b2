"""The glibc allocator settings of `lm.train.runtime`: added once, the user's tunables win, and the
re-executed process sees them (glibc reads them only at start-up); and the line that names the
extra to install when a GPU or TPU host runs JAX on its CPU."""

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


@pytest.mark.parametrize("devices,extra", [(["/dev/nvidia0"], "cuda13"), (["/dev/accel0"], "tpu"),
                                           ([], None)])
def test_an_unused_accelerator_names_the_extra_that_installs_its_build(monkeypatch, devices, extra):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(runtime.glob, "glob",
                      lambda pattern: [d for d in devices if d.startswith(pattern.split("[")[0])])
  hint = runtime.unused_accelerator("cpu")
  if extra is None:
    assert hint is None
    return
  assert f"make run EXTRAS={extra}" in hint and f"'.[{extra}]'" in hint
  assert runtime.unused_accelerator("gpu") is None  # JAX already runs on it
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the user chose the CPU
  assert runtime.unused_accelerator("cpu") is None
