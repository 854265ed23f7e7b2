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
import json
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (refused if it holds another run)")


class _ResumeParser(flags.BooleanParser):
  """--resume (continue the run in --workdir; there must be one), --noresume, or --resume=auto
  (continue it when there is one, else start it: what a scheduler reruns after a preemption)."""

  def parse(self, argument):
    if isinstance(argument, str) and argument.strip().lower() == "auto":
      return "auto"
    return super().parse(argument)

  def flag_type(self):
    return "bool or auto"


_RESUME = flags.DEFINE_flag(flags.Flag(
    _ResumeParser(), flags.ArgumentSerializer(), "resume", False,
    "continue the run in --workdir (refused when there is none); --resume=auto: continue it when "
    "there is one, else start it (a rerun of a preempted job's own command)", boolean=True))
_RESUME_STEP = flags.DEFINE_integer(
    "resume_step", None, "with --resume: continue from this checkpoint step (default: the newest "
    "intact one)")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "with --resume: continue although the config differs from the "
    "run's in fields that change the experiment (recorded in config_changes.jsonl)")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "show the traceback of an error in the input (also: POSTLAB_VERBOSE=1)")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "call jax.distributed.initialize(); default: auto when a multi-process launcher is detected")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, for a multi-process run started by hand (else $JAX_COORDINATOR_ADDRESS "
    "or the cluster's launcher)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in a run started by hand")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "compile the training step for --topology on abstract arrays (no "
    "weights or data read), write <workdir>/aot.json (memory per device, fits, FLOPs, roofline) "
    "and stop")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "with --compile_only: the target, a TPU topology name (v5p:2x2x1, v5e:4x4, "
    "...; needs the tpu extra) or cpu:N")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "CPU devices this process exposes (tests and multi-process CPU runs)")
_LIST = flags.DEFINE_bool("list", False, "list the tasks and the configs with their variants, one "
                          "line each, and exit")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "print the resolved config (the variant with every --config.* "
    "override, checked as a run checks it) as config.json would hold it, and exit")

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

# task name -> "module:function(config, mesh, topology)" of --compile_only
COMPILE_ONLY = {
    "pretrain": "lm.pretrain.task:compile_only",
    "usae": "sae.experiment:compile_only",
    "train": "align.train:compile_only",
    "pipeline": "align.pipeline:compile_only",
}

_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _multiprocess_launch() -> bool:
  if _DISTRIBUTED.value is not None:
    return _DISTRIBUTED.value
  if (_NUM_PROCESSES.value or 1) > 1:
    return True
  if any(os.environ.get(k) for k in _MULTIPROCESS_ENV):
    return True
  if any(int(os.environ.get(k, "1")) > 1
         for k in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")):
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def distributed_args(env, coordinator_address=None, num_processes=None, process_id=None) -> dict:
  """`jax.distributed.initialize`'s arguments: the flags' values, else `JAX_COORDINATOR_ADDRESS`
  with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` from `env` (a job started by hand or by a launcher
  JAX does not know), else None each: JAX detects SLURM, Open MPI, Kubernetes and Cloud TPU (GCE,
  GKE) itself."""
  def number(value, name):
    if value is not None or not env.get(name):
      return value
    try:
      return int(env[name])
    except ValueError:
      raise ValueError(f"${name}={env[name]!r} is not an integer.") from None

  return {"coordinator_address": coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None,
          "num_processes": number(num_processes, "JAX_NUM_PROCESSES"),
          "process_id": number(process_id, "JAX_PROCESS_ID")}


class _QuietLibraries(logging.Filter):
  """Orbax logs every file it renames at INFO, and jax each backend it did not find (libtpu on a
  CPU host); keep their warnings and our progress lines."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not (
        "/orbax/" in record.pathname or record.pathname.endswith("xla_bridge.py"))


def check_fields(config, where: str) -> None:
  """A field the task reads and the config (from `where`) lacks, or a value no run can use
  (`configs.common.check_values`: out of its range, or of another type), fails here, before
  anything starts or is created on disk (ValueError naming the field, the value and the range or
  the config module that holds its default)."""
  from configs import common

  schema = common.schema_of(config)
  if schema is None:
    return
  module = importlib.import_module(schema.removesuffix(".py").replace("/", "."))
  reference = module.get_config()
  common.check_fields(config, reference, where, schema)
  common.check_values(config, where, reference)


# Errors in what the user gave (config values, data files, paths, a diverged run): one line
# naming the field or file and the fix, unless --verbose. Anything else is a bug: its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _verbose() -> bool:
  return _VERBOSE.value or os.environ.get("POSTLAB_VERBOSE") == "1"


def _resume_command() -> str:
  """This process's command with --resume=auto (and without --resume_step): what continues the
  run, and what a scheduler may rerun whether or not the run got as far as a checkpoint."""
  args = [a for a in sys.argv[1:] if not a.startswith(("--resume", "--noresume"))]
  return " ".join(shlex.quote(a) for a in ["python", "launch.py", *args, "--resume=auto"])


def _shipped_configs() -> Path:
  """The `configs/` directory postlab ships (beside this file in a checkout)."""
  import configs

  return Path(configs.__file__).parent


def list_configs() -> str:
  """The tasks (config.task -> the function that runs it) and every config module with its task,
  variants (`*` marks the default) and the first line of its docstring: `launch.py --list`."""
  lines = ["tasks (config.task: the code that runs it)"]
  lines += [f"  {task:<18} {target}" for task, target in TASKS.items()]
  lines += ["", "configs (--config=configs/NAME.py:VARIANT; * marks the variant used without one)"]
  rows = []
  for path in sorted(_shipped_configs().glob("*.py")):
    module = importlib.import_module(f"configs.{path.stem}")
    if not hasattr(module, "get_config"):
      continue  # shared pieces (common.py, train_base.py), tables (aot.py)
    default = module.get_config()
    variants = " ".join(v + ("*" if v == default.variant else "") for v in module.VARIANTS)
    doc = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())  # first paragraph
    doc = re.split(r"\.\s+(?=[A-Z])", doc)[0].rstrip(".:")  # its first sentence
    doc = doc if len(doc) <= 100 else doc[:99] + "…"
    rows.append((path.name, default.task, variants, doc))
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  if _LIST.value:
    print(list_configs())
    return
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/quickstart.py:cpu "
                         "(--list shows every config and variant)")
  if not _WORKDIR.value and not _PRINT_CONFIG.value:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/quickstart")
  try:
    task = config.task if "task" in config else None
  except OSError as e:  # ml_collections reports a config file that failed to load on first use
    if _verbose():
      raise
    sys.exit("error: " + _config_flag_error(sys.argv, e))
  if task not in TASKS:
    raise app.UsageError(f"config.task={task!r} is unknown; known tasks: {sorted(TASKS)}")
  try:
    check_fields(config, flags.FLAGS["config"].config_filename)
  except ValueError as e:
    if _verbose():
      raise
    sys.exit(f"error: {e}")
  if _PRINT_CONFIG.value:
    print(config.to_json_best_effort(indent=2))
    return

  if task in ("train", "pretrain", "pipeline"):
    from lm.train.runtime import use_cpu_training_flags

    use_cpu_training_flags()  # before the backend starts
  import jax

  from lm.train.runtime import use_compilation_cache

  use_compilation_cache()
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  if _multiprocess_launch():
    # CPU processes reduce across each other through gloo; GPU/TPU use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**distributed_args(
        os.environ, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value))
  try:
    if _COMPILE_ONLY.value:
      compile_only(config, _WORKDIR.value, _TOPOLOGY.value,
                   where=flags.FLAGS["config"].config_filename,
                   command=shlex.join(["python", "launch.py", *sys.argv[1:]]))
      return
    resume = _RESUME.value or (_RESUME_STEP.value is not None)
    result = run(config, _WORKDIR.value, resume=resume,
                 resume_step=_RESUME_STEP.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except USER_ERRORS as e:
    if _verbose():
      raise
    sys.stderr.write(f"error: {e}\n(--verbose or POSTLAB_VERBOSE=1 shows the traceback)\n")
    sys.exit(1)
  if result and "preempted_at" in result:
    logging.info("to continue: %s", _resume_command())


def run(config, workdir, *, resume: bool | str = False, devices=None, where: str | None = None,
        resume_step: int | None = None, allow_config_change: bool = False) -> dict | None:
  """Runs `config.task` into `workdir` in this process, on a mesh of `config.mesh` over `devices`
  (default: every device), and returns the task's result. `main` calls it after the process-wide
  set-up (flags, the allocator, multi-process JAX, the field check); tests call it directly to run
  a task in-process, with `where` (the config's name) to check its fields first.

  `resume`: True continues the run in `workdir` (there must be one), "auto" continues it when
  there is one and starts it otherwise. The run directory is locked while the task runs and its
  `status.json` says how it ended. A
  run stopped by SIGTERM/SIGINT saves a checkpoint and returns `{"preempted_at": step}`; a run
  that fails before its first step leaves nothing behind; resuming a finished run returns its
  summary and changes nothing.
  """
  if where is not None:
    check_fields(config, where)
  import jax

  from lm import sharding
  from lm.train import trainer
  from lm.train.rundir import RunDir

  task = config.task
  mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp,
                            tensor=config.mesh.tensor, devices=devices)
  logging.info("process %d/%d, devices %s, mesh %s", jax.process_index(), jax.process_count(),
               jax.devices(), dict(mesh.shape))
  from lm.train.runtime import unused_accelerator

  if hint := unused_accelerator(jax.default_backend()):
    logging.warning("%s", hint)
  # Every process runs the task; process 0 alone writes the run directory (orbax coordinates
  # checkpoints across processes itself).
  run_dir = RunDir(workdir, config, resume=resume, primary=jax.process_index() == 0,
                   resume_step=resume_step, allow_config_change=allow_config_change)
  if run_dir.finished:
    run_dir.close()
    summary = run_dir.path / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}
  module_name, fn_name = TASKS[task].split(":")
  fn = getattr(importlib.import_module(module_name), fn_name)
  preempted = getattr(trainer, "Preempted", ())
  t0 = time.time()
  try:
    with jax.set_mesh(mesh):
      result = fn(config, run_dir, mesh)
  except preempted as e:
    run_dir.set_status("preempted", step=e.step)
    logging.warning("%s stopped at step %d by a signal; its checkpoint is saved. Continue it with "
                    "--resume.", task, e.step)
    return {"preempted_at": e.step}
  except Exception as e:  # a kill or Ctrl-C leaves the run as a kill would: resumable
    run_dir.set_status("failed", error=f"{type(e).__name__}: {e}")
    if run_dir.discard_if_unstarted():
      logging.info("the run failed before its first step; removed what it had created in %s",
                   run_dir.path)
    raise
  finally:
    run_dir.close()
  run_dir.set_status("finished", wall_s=round(time.time() - t0, 1))
  logging.info("%s finished in %.1fs; results in %s", task, time.time() - t0, run_dir.path)
  if result:
    logging.info("%s", {k: v for k, v in result.items() if isinstance(v, (int, float, str))})
  return result


def compile_only(config, workdir, topology: str | None, where: str | None = None,
                 command: str | None = None) -> dict:
  """Compiles `config`'s training step for `topology` with the config's mesh laid over its
  devices, and writes `workdir/aot.json` (see `lm.train.aot`; `where` and `command` say which
  config and command line made it); returns what it wrote."""
  if not topology:
    raise ValueError("--compile_only needs --topology, e.g. --topology=v5p:2x2x1 or cpu:8.")
  if config.task not in COMPILE_ONLY:
    raise ValueError(f"--compile_only is built for the tasks {sorted(COMPILE_ONLY)}; "
                     f"config.task={config.task!r} is not one yet.")
  import jax

  from lm import sharding
  from lm.train import aot
  from lm.train.rundir import write_text_atomic

  devices = aot.topology_devices(topology)
  try:
    mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp,
                              tensor=config.mesh.tensor, devices=devices)
  except ValueError as e:
    raise ValueError(f"--topology={topology}: {str(e).rstrip('.')} (--config.mesh.data/fsdp/"
                     "tensor; one may be -1).") from None
  module_name, fn_name = COMPILE_ONLY[config.task].split(":")
  fn = getattr(importlib.import_module(module_name), fn_name)
  t0 = time.time()
  result = fn(config, mesh, topology)  # host-side work runs on this host's CPU, not the mesh
  result["compile_s"] = round(time.time() - t0, 1)
  result.update(config=where, command=command, versions=aot.versions())
  out = Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  write_text_atomic(out / "aot.json", json.dumps(result, indent=1))
  gb = result["bytes_per_device"]["total"] / 1e9
  logging.info("compiled %s for %s (%d devices, mesh %s): %.2f GB per device%s; step >= %s s; "
               "written to %s", config.task, topology, result["devices"], result["mesh"], gb,
               "" if result.get("fits") is None else (" (fits)" if result["fits"] else
                                                       " (does NOT fit)"),
               f"{result['step_s_bound']:.3g}" if result.get("step_s_bound") else "?",
               out / "aot.json")
  return result


def _packaged_config_paths(argv: list[str]) -> list[str]:
  """`--config=configs/NAME.py[:VARIANT]` names the config shipped with postlab when no such file is
  in the working directory, so `postlab` runs from any directory."""
  out = []
  for arg in argv:
    if arg.startswith("--config=configs/"):
      path, sep, variant = arg.removeprefix("--config=").partition(":")
      shipped = _shipped_configs() / path.removeprefix("configs/")
      if not os.path.exists(path) and shipped.is_file():
        arg = f"--config={shipped}{sep}{variant}"
    out.append(arg)
  return out


def _parse_flags(argv):
  """absl's flag parsing, with the config's own errors (a file that does not load, an override
  of a field the config lacks) as one line naming the flag."""
  argv = _packaged_config_paths(argv)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, OSError, ValueError, TypeError) as e:
    if _verbose_argv(argv):
      raise
    if isinstance(e, flags.Error) and (str(e).startswith("flag --config.") or (
        e.__cause__ is None and e.__context__ is None)):
      sys.exit(f"error: {str(e).splitlines()[0]}\nPass --helpshort for the flags.")
    sys.exit("error: " + _config_flag_error(argv, e))


def _verbose_argv(argv) -> bool:
  return "--verbose" in argv or os.environ.get("POSTLAB_VERBOSE") == "1"


def _config_flag_error(argv, e: BaseException) -> str:
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  cause = e
  while cause.__cause__ or cause.__context__:
    cause = cause.__cause__ or cause.__context__
  if spec and isinstance(cause, (OSError, ValueError)) and not isinstance(cause, KeyError):
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
      here = os.path.dirname(path) or "."
      known = sorted(n for n in os.listdir(here) if n.endswith(".py")) if os.path.isdir(here) else []
      return f"--config={spec}: no file {path}" + (
          f"; {here}/ holds {', '.join(known)}." if known else ".")
    return f"--config={spec}: {cause}"
  key = str(cause).strip("'\"")
  overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  named = [o for o in overrides if o.rsplit(".", 1)[-1] == key] or overrides
  return (f"{' '.join(named) or '--config'}: the config {spec} has no field {key!r} "
          f"({type(cause).__name__}); check the spelling against {spec.split(':', 1)[0] if spec else 'the config'}.")


def cli() -> None:
  """`python launch.py ...` and the `postlab` command (pyproject.toml's console script)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from lm.train.runtime import reexec_with_cpu_allocator

  reexec_with_cpu_allocator()  # glibc reads its tunables at start-up, before JAX allocates
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
