"""postlab's one entry point.

  python launch.py --config=configs/quickstart.py:cpu --workdir=runs/quick
  python launch.py --config=configs/dpo.py:cpu --workdir=runs/dpo --config.train.steps=20

Loads the (locked) config, starts multi-process JAX when launched that way, builds the mesh,
writes the resolved config into the workdir and runs the task named by `config.task`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (refused if it holds another run)")
_RESUME = flags.DEFINE_bool("resume", False, "continue the run already in --workdir")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "call jax.distributed.initialize(); default: auto when a multi-process launcher is detected")

# task name -> "module:function(config, run_dir, mesh)"
TASKS = {
    "quickstart": "decode.quickstart:run",
    "decode_sweep": "decode.sweep:run",
    "train": "align.train:run",
    "align_eval": "align.evals.compare:run",
}

_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _multiprocess_launch() -> bool:
  if _DISTRIBUTED.value is not None:
    return _DISTRIBUTED.value
  if any(os.environ.get(k) for k in _MULTIPROCESS_ENV):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


class _QuietLibraries(logging.Filter):
  """Orbax logs every file it renames at INFO; keep its warnings and our progress lines."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  del argv
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/quickstart.py:cpu")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/quickstart")
  task = config.get("task")
  if task not in TASKS:
    raise app.UsageError(f"config.task={task!r} is unknown; known tasks: {sorted(TASKS)}")

  if task == "train":
    from lm.runtime import use_cpu_training_flags

    use_cpu_training_flags()  # before the backend starts
  import jax

  if _multiprocess_launch():
    jax.distributed.initialize()
  from lm import sharding
  from lm.run import RunDir

  mesh_cfg = config.get("mesh") or {}
  mesh = sharding.make_mesh(**{k: mesh_cfg.get(k, d) for k, d in
                               (("data", 1), ("fsdp", -1), ("tensor", 1))})
  logging.info("process %d/%d, devices %s, mesh %s", jax.process_index(), jax.process_count(),
               jax.devices(), dict(mesh.shape))
  run_dir = RunDir(_WORKDIR.value, config, resume=_RESUME.value)
  module_name, fn_name = TASKS[task].split(":")
  fn = getattr(importlib.import_module(module_name), fn_name)
  t0 = time.time()
  try:
    with jax.set_mesh(mesh):
      result = fn(config, run_dir, mesh)
  finally:
    run_dir.close()
  logging.info("%s finished in %.1fs; results in %s", task, time.time() - t0, run_dir.path)
  if result:
    logging.info("%s", {k: v for k, v in result.items() if isinstance(v, (int, float, str))})


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from lm.runtime import reexec_with_cpu_allocator

  reexec_with_cpu_allocator()  # glibc reads its tunables at start-up, before JAX allocates
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
