"""What made a run: the code (git commit, and whether the tree had uncommitted changes), the package
versions, the devices, the command line and the host. `RunDir` writes it into `provenance.json`
when a run starts (and appends each resume), and every report ends with it."""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

# The packages whose versions a number depends on, in the order a report lists them.
PACKAGES = ("postlab", "jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax",
            "optax", "orbax-checkpoint", "grain", "numpy", "tokenizers", "transformers", "gguf",
            "safetensors")

_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding lm/


def versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
  """{package: version} of those of `names` installed."""
  out = {}
  for name in names:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def _git(*args: str) -> str | None:
  try:
    done = subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True,
                          timeout=10, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return done.stdout.strip() if done.returncode == 0 else None


def code() -> dict:
  """The commit of the checkout postlab runs from, and whether tracked files differ from it
  (`dirty`: the numbers may come from code no commit holds); {"commit": None} outside a git
  checkout (an installed wheel: its version is in `versions`)."""
  if not (_ROOT / ".git").exists():
    return {"commit": None}
  commit = _git("rev-parse", "HEAD")
  if commit is None:
    return {"commit": None}
  changed = _git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": bool(changed), "branch": _git("rev-parse", "--abbrev-ref",
                                                                   "HEAD")}


def devices() -> dict:
  """The JAX backend, its devices (count and kind) and the processes sharing them."""
  import jax

  devs = jax.devices()
  return {"backend": jax.default_backend(), "count": len(devs),
          "kind": sorted({d.device_kind for d in devs}), "processes": jax.process_count()}


def host() -> dict:
  return {"name": socket.gethostname(), "platform": platform.platform(),
          "python": platform.python_version(), "cpus": os.cpu_count()}


def record(command: list[str] | None = None) -> dict:
  """This process's provenance: time, command line (default `sys.argv` as `python ...`), code,
  versions, devices and host."""
  argv = command if command is not None else [Path(sys.executable).name, *sys.argv]
  return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join(argv),
          "code": code(), "versions": versions(), "devices": devices(), "host": host()}


def markdown(prov: dict) -> str:
  """The `## Provenance` section of a report from a `provenance.json`."""
  lines = ["## Provenance", ""]
  for title, rec in [("started", prov)] + [("resumed", r) for r in prov.get("resumed", [])]:
    c = rec.get("code", {})
    commit = (f"`{c['commit'][:12]}`" + (" with uncommitted changes" if c.get("dirty") else "")
              if c.get("commit") else "not a git checkout")
    d = rec.get("devices", {})
    h = rec.get("host", {})
    lines += [f"- {title} {rec.get('time')}: `{rec.get('command')}`",
              f"  - code: {commit}",
              f"  - devices: {d.get('count')} × {', '.join(d.get('kind', []))} "
              f"({d.get('backend')}, "
              f"{d.get('processes')} process{'es' if d.get('processes', 1) > 1 else ''})",
              f"  - host: {h.get('name')}, {h.get('platform')}, Python {h.get('python')}, "
              f"{h.get('cpus')} CPUs",
              "  - versions: " + ", ".join(f"{k} {v}" for k, v in rec.get("versions", {}).items())]
  return "\n".join(lines) + "\n"
