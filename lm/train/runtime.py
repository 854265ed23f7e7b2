"""Process settings for XLA:CPU that must exist before the process starts: glibc's allocator.

XLA:CPU allocates each executable's temporary buffer (GBs for a training step: the saved
activations) when it runs and frees it after. glibc serves allocations over 32 MB with a fresh
`mmap` and returns them with `munmap`, so every step page-faults its whole working set back in
(docs/benchmarks/README.md has the measured cost). Serving every allocation from the heap
(`mmap_max=0`), in one arena (worker threads' arenas fall back to `mmap`), and never trimming it
keeps the pages mapped from one step to the next. The cost: the process keeps its peak memory.

glibc reads `GLIBC_TUNABLES` once, at start-up, so `reexec_with_cpu_allocator` re-executes the
running command with it set (entry points call it first thing); `cpu_allocator_env` gives the
environment for a subprocess. Set `POSTLAB_SYSTEM_ALLOCATOR=1` to keep glibc's defaults.
"""

from __future__ import annotations

import glob
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

# trim_threshold 2**40: freed heap memory is never handed back (glibc's cap is SIZE_MAX).
CPU_ALLOCATOR_TUNABLES = (("glibc.malloc.arena_max", "1"), ("glibc.malloc.mmap_max", "0"),
                          ("glibc.malloc.trim_threshold", str(2**40)))
OPT_OUT = "POSTLAB_SYSTEM_ALLOCATOR"


def cpu_allocator_env(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` with `CPU_ALLOCATOR_TUNABLES` added to `GLIBC_TUNABLES`; tunables the user set win,
  and nothing changes off glibc Linux or with `POSTLAB_SYSTEM_ALLOCATOR=1`."""
  env = dict(environ)
  if env.get(OPT_OUT) == "1" or not _glibc_linux():
    return env
  current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  names = {t.split("=")[0] for t in current}
  extra = [f"{k}={v}" for k, v in CPU_ALLOCATOR_TUNABLES if k not in names]
  if extra:
    env["GLIBC_TUNABLES"] = ":".join(current + extra)
  return env


def reexec_with_cpu_allocator(argv: Sequence[str] | None = None) -> None:
  """Replace this process by the same command with `cpu_allocator_env` (no-op when it already
  has it). Call before importing JAX; `argv` defaults to the interpreter's own command line."""
  env = cpu_allocator_env(os.environ)
  if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
    return
  argv = list(argv) if argv is not None else [sys.executable] + sys.orig_argv[1:]
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)


def unused_accelerator(backend: str) -> str | None:
  """When JAX runs on `backend` "cpu" on a host that has an NVIDIA GPU or a TPU (jaxlib from PyPI
  is CPU-only), the line that says how to install the accelerator build; else None. Nothing is
  said when the user chose the platform ($JAX_PLATFORMS)."""
  if backend != "cpu" or os.environ.get("JAX_PLATFORMS"):
    return None
  if glob.glob("/dev/nvidia[0-9]*"):
    kind, extra = "an NVIDIA GPU", "cuda13"
  elif glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
    kind, extra = "a TPU", "tpu"
  else:
    return None
  return (f"this host has {kind} but JAX runs on the CPU (the CPU-only jaxlib is installed): "
          f"install the accelerator build with `make run EXTRAS={extra}` or `pip install -e "
          f"'.[{extra}]' --constraint constraints.txt`"
          + (" (cuda12 for NVIDIA drivers older than 580)" if extra == "cuda13" else "")
          + "; JAX_PLATFORMS=cpu keeps the CPU and silences this.")


def _glibc_linux() -> bool:
  return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


# XLA:CPU flags for training steps (docs/benchmarks/README.md): the concurrency-optimised
# scheduler runs independent backward ops side by side and starves the GEMMs that need both
# cores, and YNNPACK fusions slow the backward. A forward alone is slower with them, so decoding
# keeps the defaults.
CPU_TRAINING_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",
                          "--xla_cpu_experimental_ynn_fusion_type=")


def use_cpu_training_flags() -> None:
  """Add `CPU_TRAINING_XLA_FLAGS` to `XLA_FLAGS` (those the user set win). Call before the first
  JAX computation: XLA reads the variable once, when the backend starts. Nothing is added when
  `JAX_PLATFORMS` names no cpu (a GPU/TPU run whose XLA may not know these flags)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms.split(","):
    return
  current = os.environ.get("XLA_FLAGS", "")
  set_names = {f.split("=")[0] for f in current.split()}
  extra = [f for f in CPU_TRAINING_XLA_FLAGS if f.split("=")[0] not in set_names]
  os.environ["XLA_FLAGS"] = " ".join([current] + extra).strip()


CACHE_ENV = "POSTLAB_CACHE"


def cache_dir(kind: str) -> Path | None:
  """`<root>/<kind>`, where postlab keeps what a later process may reuse instead of recomputing
  (compiled programs, tokenizers built from a GGUF's metadata). The root is `$POSTLAB_CACHE`, else
  `$XDG_CACHE_HOME/postlab`, else `~/.cache/postlab`; `POSTLAB_CACHE=off` keeps nothing (None)."""
  root = os.environ.get(CACHE_ENV)
  if root == "off":
    return None
  if not root:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "postlab"
  return Path(root).expanduser() / kind


def use_compilation_cache() -> str | None:
  """Turn on JAX's persistent compilation cache in `cache_dir("jax")` (as MaxText does by default):
  a rerun, a resumed or preempted job and every process of a multi-process run on one host load
  the compiled step instead of compiling it again. A directory the user chose
  (`JAX_COMPILATION_CACHE_DIR`) wins; `JAX_ENABLE_COMPILATION_CACHE=false` or `POSTLAB_CACHE=off`
  keeps nothing. Returns the directory in use, or None."""
  import jax

  if not jax.config.jax_enable_compilation_cache:
    return None
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  path = cache_dir("jax")
  if path is None:
    return None
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    log.warning("no compilation cache: %s (set POSTLAB_CACHE to a writable directory)", e)
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  return str(path)
