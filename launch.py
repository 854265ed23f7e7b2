"""postlab's one entry point.

  python launch.py --config=configs/quickstart.py:cpu --workdir=runs/quick
  python launch.py --config=configs/dpo.py:cpu --workdir=runs/dpo --config.train.steps=20
  # two processes on one machine, 4 CPU devices each (one command per process):
  python launch.py --config=configs/dpo.py:smoke --workdir=runs/mp --num_processes=2 \
      --process_id=0 --coordinator_address=127.0.0.1:12355 --cpu_devices=4

Loads the (locked) config, refuses it if it lacks a field its task reads (the task's schema: the
default variant of the config module `configs.common.SCHEMAS` names), starts multi-process JAX
when launched that way, builds the mesh, writes the resolved config into the workdir and runs the
task named by `config.task`.
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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, for a multi-process run started by hand (else $JAX_COORDINATOR_ADDRESS "
    "or the cluster's launcher)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in a run started by hand")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "CPU devices this process exposes (tests and multi-process CPU runs)")

# task name -> "module:function(config, run_dir, mesh)"
TASKS = {
    "quickstart": "decode.quickstart:run",
    "decode_sweep": "decode.sweep:run",
    "train": "align.train:run",
    "pretrain": "lm.pretrain.task:run",
    "sinks": "lm.pretrain.sinks:run",
    "pipeline": "align.pipeline:run",
    "align_eval": "align.evals.compare:run",
    "toy_superposition": "sae.toy:run",
    "usae": "sae.experiment:run",
}

_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _multiprocess_launch() -> bool:
  if _DISTRIBUTED.value is not None:
    return _DISTRIBUTED.value
  if (_NUM_PROCESSES.value or 1) > 1:
    return True
  if any(os.environ.get(k) for k in _MULTIPROCESS_ENV):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


class _QuietLibraries(logging.Filter):
  """Orbax logs every file it renames at INFO; keep its warnings and our progress lines."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def check_fields(config, where: str) -> None:
  """A field the task reads and the config (from `where`) lacks fails here, before anything starts
  (ValueError naming the field and the config module that holds its default)."""
  from configs import common

  schema = common.schema_of(config)
  if schema is None:
    return
  module = importlib.import_module(schema.removesuffix(".py").replace("/", "."))
  common.check_fields(config, module.get_config(), where, schema)


def main(argv):
  del argv
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/quickstart.py:cpu")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/quickstart")
  task = config.task if "task" in config else None
  if task not in TASKS:
    raise app.UsageError(f"config.task={task!r} is unknown; known tasks: {sorted(TASKS)}")
  try:
    check_fields(config, flags.FLAGS["config"].config_filename)
  except ValueError as e:
    raise app.UsageError(str(e)) from None

  if task in ("train", "pretrain", "pipeline"):
    from lm.train.runtime import use_cpu_training_flags

    use_cpu_training_flags()  # before the backend starts
  import jax

  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  if _multiprocess_launch():
    # CPU processes reduce across each other through gloo; GPU/TPU use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  run(config, _WORKDIR.value, resume=_RESUME.value)


def run(config, workdir, *, resume: bool = False, devices=None,
        where: str | None = None) -> dict | None:
  """Runs `config.task` into `workdir` in this process, on a mesh of `config.mesh` over `devices`
  (default: every device), and returns the task's result. `main` calls it after the process-wide
  set-up (flags, the allocator, multi-process JAX, the field check); tests call it directly to run
  a task in-process, with `where` (the config's name) to check its fields first.
  """
  if where is not None:
    check_fields(config, where)
  import jax

  from lm import sharding
  from lm.train.rundir import RunDir

  task = config.task
  mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp,
                            tensor=config.mesh.tensor, devices=devices)
  logging.info("process %d/%d, devices %s, mesh %s", jax.process_index(), jax.process_count(),
               jax.devices(), dict(mesh.shape))
  # Every process runs the task; process 0 alone writes the run directory (orbax coordinates
  # checkpoints across processes itself).
  run_dir = RunDir(workdir, config, resume=resume, primary=jax.process_index() == 0)
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
  return result

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from lm.train.runtime import reexec_with_cpu_allocator

  reexec_with_cpu_allocator()  # glibc reads its tunables at start-up, before JAX allocates
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
