"""Run directories: resolved config, JSONL + TensorBoard metrics, plots and a markdown report.

A workdir that already holds another run's config is never reused silently: pass `resume=True`
to continue it, or choose a new directory.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)


def write_text_atomic(path: Path, text: str) -> Path:
  """`text` into `path` through `<name>.tmp` beside it and a rename: a reader, or a crash, sees
  the old file or the new one, never part of one."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
  return path


class WorkdirExistsError(FileExistsError):
  pass


def _to_jsonable(x: Any):
  if isinstance(x, Mapping):
    return {str(k): _to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray) and x.ndim:
    return [_to_jsonable(v) for v in x]
  if hasattr(x, "item") and getattr(x, "shape", None) == ():
    x = x.item()
  if isinstance(x, float) and not np.isfinite(x):
    return None  # strict JSON has no NaN/inf; null marks "undefined here"
  return x


def is_scalar(v) -> bool:
  """A single number (python, numpy or a 0-d array), as opposed to a diagnostic array."""
  return isinstance(v, (int, float, np.floating, np.integer)) or getattr(v, "shape", None) == ()


def _summary_writer():
  """tensorboardX's `SummaryWriter`, imported with torch hidden where nothing imported it yet:
  tensorboardX imports torch whenever it is installed (to accept torch tensors, which postlab never
  passes), and no library path may import torch (the parity extra installs it beside us)."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Metrics to `metrics.jsonl` (one object per step; arrays as lists) and TensorBoard event files
  (scalars as scalars, arrays as histograms of their values)."""

  def __init__(self, workdir: Path):
    self.path = workdir / "metrics.jsonl"
    self._fh = open(self.path, "a")
    try:
      self._tb = _summary_writer()(str(workdir / "tensorboard"))
    except ImportError:  # TensorBoard is optional; JSONL is the record
      self._tb = None

  def write(self, step: int, scalars: Mapping[str, Any], **fields: Any) -> None:
    record = {"step": int(step), "time": time.time(), **_to_jsonable(fields),
              **_to_jsonable(scalars)}
    self._fh.write(json.dumps(record) + "\n")
    self._fh.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        if is_scalar(v):
          if np.isfinite(float(v)):
            self._tb.add_scalar(k, float(v), int(step))
        elif isinstance(v, np.ndarray) and v.size and np.isfinite(v).all():
          self._tb.add_histogram(k, v.ravel(), int(step))
      self._tb.flush()

  def rewind(self, step: int) -> None:
    """Drop JSONL records after `step`: a run resumed from a checkpoint at `step` logs them again."""
    self._fh.close()
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(self.path, "".join(line + "\n" for line in kept))
    self._fh = open(self.path, "a")

  def close(self) -> None:
    self._fh.close()
    if self._tb is not None:
      self._tb.close()


def read_history(path: str | os.PathLike) -> list[dict]:
  """The records of a `metrics.jsonl` as a run's history: dicts without the wall-clock `time`,
  lists back as numpy arrays and null (a non-finite value) as nan; [] when there is no file."""
  path = Path(path)
  if not path.exists():
    return []

  def nan_for_null(v):
    if isinstance(v, list):
      return [nan_for_null(x) for x in v]
    return float("nan") if v is None else v

  def value(v):
    v = nan_for_null(v)
    return np.asarray(v, np.float64) if isinstance(v, list) else v

  return [{k: value(v) for k, v in json.loads(line).items() if k != "time"}
          for line in path.read_text().splitlines() if line.strip()]


class _NoMetrics:
  """The metrics writer of a process that does not own the run directory."""

  def write(self, step: int, scalars: Mapping[str, Any], **fields: Any) -> None:
    del step, scalars, fields

  def rewind(self, step: int) -> None:
    del step

  def close(self) -> None:
    pass


class RunLockedError(WorkdirExistsError):
  """Another live process holds the run directory."""


class NoRunToResumeError(FileNotFoundError):
  """`--resume` names a workdir that holds no run."""


class ConfigChangedError(ValueError):
  """`--resume` with a config that differs from the run's in fields that cannot change."""


# Fields that may differ when a run is resumed (fnmatch patterns over dotted names): how long it
# trains, how often it evaluates, checkpoints and logs, and the device mesh. Anything else changes
# the experiment and needs --allow_config_change, which records the change.
RESUME_MAY_CHANGE = ("train.steps", "train.epochs", "*_every", "train.keep_checkpoints", "mesh.*")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_changes(old: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (old, new)} for every field whose value differs ("<absent>" where a side
  lacks it), both read as JSON."""
  a, b = _flat(old), _flat(new)
  missing = "<absent>"
  return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
          if a.get(k, missing) != b.get(k, missing)}


def _holder() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}


class RunLock:
  """An exclusive lock on a run directory for the life of a run: `<workdir>/.lock`, held with
  `flock` (the kernel drops it when the process dies, however it dies) and holding the holder's
  pid, host, start time and command, so a refused process can say who holds the run. A lock file
  left by a dead process is taken over with a warning."""

  def __init__(self, workdir: Path):
    self.path = workdir / ".lock"
    self._fd: int | None = None

  def acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read(fd)
      os.close(fd)
      who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
             f"({holder.get('command')})") if holder else "another process"
      raise RunLockedError(
          f"{self.path.parent} is in use by a live run: {who}. Two processes on one run would "
          "overwrite each other's checkpoints and metrics; wait for it to end or stop it first."
      ) from None
    previous = self._read(fd)
    if previous:
      log.warning("%s: took over the lock of a run that is no longer alive (pid %s on %s, started "
                  "%s)", self.path.parent, previous.get("pid"), previous.get("host"),
                  previous.get("started"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  @staticmethod
  def _read(fd: int) -> dict:
    try:
      return json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:
      return {}

  def release(self) -> None:
    """Empties the file (an empty lock file is a cleanly ended run) and unlocks it."""
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


class RunDir:
  """A run's directory: `config.json`, `provenance.json`, `metrics.jsonl`, `tensorboard/`,
  `plots/`, `report.md`, and `status.json` (running / finished / failed / preempted, with pid,
  host and times).

  The process that owns it holds `RunLock` until `close`. `resume=True` continues the run: its
  config must equal the run's apart from `RESUME_MAY_CHANGE` unless `allow_config_change`, which
  records the change in `config_changes.jsonl`; a finished run resumed with its own config sets
  `finished` and changes nothing. `config.json` is only (re)written after these checks.
  """

  def __init__(self, workdir: str | os.PathLike, config: Any, *, resume: bool | str = False,
               primary: bool = True, resume_step: int | None = None,
               allow_config_change: bool = False):
    """`resume`: True continues the run in `workdir` and refuses a workdir without one; "auto"
    continues a run when there is one and starts one otherwise (`self.resume` then says which).
    `primary=False` (processes other than 0 of a multi-process run): the same paths, no checks
    and no writes, so one process owns the directory."""
    if resume not in (False, True, "auto"):
      raise ValueError(f"resume={resume!r}: use True, False or 'auto'.")
    self.path = Path(workdir).absolute()
    has_run = (self.path / "config.json").exists()
    self.resume = has_run if resume == "auto" else resume
    self.resume_step = resume_step
    self.primary = primary
    self.finished = False
    self._lock: RunLock | None = None
    if not primary:
      self.metrics = _NoMetrics()
      return
    cfg_json = config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") \
        else json.dumps(_to_jsonable(config), indent=2)
    if resume is True and not has_run:  # refused before anything is made
      raise NoRunToResumeError(
          f"--resume: {self.path} holds no run to continue (no config.json). Start it without "
          "--resume, check --workdir, or pass --resume=auto to continue a run when there is one "
          "and start one otherwise.")
    self._created = self._make_dir()
    self._before = set(os.listdir(self.path))
    self._lock = RunLock(self.path)
    self._lock.acquire()
    try:
      self._continues = self._check_resume(json.loads(cfg_json), allow_config_change)
      if self.finished:
        self.metrics = _NoMetrics()
        return
      (self.path / "plots").mkdir(exist_ok=True)
      cfg_file = self.path / "config.json"
      if cfg_file.exists():
        os.replace(cfg_file, self.path / f"config.previous.{int(time.time())}.json")
      write_text_atomic(cfg_file, cfg_json)
      self._record_provenance()
      self.metrics = MetricsWriter(self.path)
      self.set_status("running")
    except BaseException:
      self._lock.release()
      raise

  def _record_provenance(self) -> None:
    """`provenance.json`: what started the run (`provenance.record`), and each resume after it."""
    from lm.train import provenance

    rec = provenance.record()
    path = self.path / "provenance.json"
    if self._continues and path.exists():
      prov = json.loads(path.read_text())
      prov.setdefault("resumed", []).append(rec)
    else:
      prov = rec
    self.write_json("provenance.json", prov)

  def _make_dir(self) -> bool:
    """Creates the workdir (True) or checks the existing one is a writable directory (False)."""
    if self.path.exists() and not self.path.is_dir():
      raise NotADirectoryError(f"--workdir {self.path} is a file, not a directory; choose another "
                               "--workdir.")
    existed = self.path.exists()
    try:
      self.path.mkdir(parents=True, exist_ok=True)
    except PermissionError:
      raise PermissionError(f"--workdir {self.path} cannot be created (permission denied); choose "
                            "a directory you can write to.") from None
    if not os.access(self.path, os.W_OK | os.X_OK):
      raise PermissionError(f"--workdir {self.path} is not writable; choose a directory you can "
                            "write to.")
    return not existed

  def _check_resume(self, new: dict, allow_config_change: bool) -> bool:
    """True when this continues a run already in the directory; refuses what may not be."""
    cfg_file = self.path / "config.json"
    if not cfg_file.exists():
      return False
    if not self.resume:
      raise WorkdirExistsError(
          f"{self.path} already holds a run (config.json). Pass --resume to continue it, or use a "
          "new --workdir; nothing was overwritten.")
    changes = config_changes(json.loads(cfg_file.read_text()), new)
    fixed = {k: v for k, v in changes.items()
             if not any(fnmatch.fnmatchcase(k, p) for p in RESUME_MAY_CHANGE)}
    if fixed and not allow_config_change:
      lines = "\n".join(f"  {k}: {old!r} -> {now!r}" for k, (old, now) in fixed.items())
      raise ConfigChangedError(
          f"--resume: the config differs from the run's ({cfg_file}) in fields that cannot change "
          f"on resume:\n{lines}\nResume with the run's config, or pass --allow_config_change to "
          f"continue with the new values (recorded in config_changes.jsonl). Fields that may "
          f"change: {', '.join(RESUME_MAY_CHANGE)}.")
    status = self.status()
    if not changes and status.get("state") == "finished" and self.resume_step is None:
      self.finished = True
      log.info("%s finished at %s; nothing to do (raise train.steps to train further)",
               self.path, status.get("ended"))
      return True
    if changes:
      record = {"time": time.time(), "allowed": bool(fixed),
                "changes": {k: list(v) for k, v in changes.items()}}
      with open(self.path / "config_changes.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
      if fixed:
        log.warning("--allow_config_change: continuing with %d changed fields (%s); recorded in "
                    "config_changes.jsonl", len(fixed), ", ".join(fixed))
    return True

  def status(self) -> dict:
    """`status.json` ({} when absent)."""
    path = self.path / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}

  def set_status(self, state: str, **info: Any) -> None:
    """Records the run's state (running, finished, failed, preempted) with who runs it."""
    if not self.primary or self.finished:
      return
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    status = {"state": state, **_holder(), "updated": now, **info}
    if state != "running":
      status["ended"] = now
    self.write_json("status.json", status)

  def discard_if_unstarted(self) -> bool:
    """After a failure: when this process started the run (not a resume of one) and no step
    was taken (no record past step 0, no checkpoint), remove what it created, so the corrected
    command can be rerun as it is. Returns whether it did."""
    if not self.primary or self.finished or getattr(self, "_continues", True):
      return False
    history = read_history(self.path / "metrics.jsonl")
    ckpts = self.path / "checkpoints"
    if any(h.get("step", 0) > 0 for h in history) or (
        ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
      return False
    self.metrics.close()
    self.metrics = _NoMetrics()
    for name in set(os.listdir(self.path)) - self._before - {".lock"}:
      target = self.path / name
      shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    self._lock.release()
    (self.path / ".lock").unlink(missing_ok=True)
    self._lock = None
    if self._created and not os.listdir(self.path):
      self.path.rmdir()
    return True

  @property
  def plots(self) -> Path:
    return self.path / "plots"

  def write_json(self, name: str, obj: Any) -> Path:
    path = self.path / name
    if not self.primary:
      return path
    return write_text_atomic(path, json.dumps(_to_jsonable(obj), indent=2))

  def write_report(self, text: str) -> Path:
    """`report.md`: `text`, then the run's provenance (what code, versions, devices, command and
    host made it)."""
    path = self.path / "report.md"
    if not self.primary:
      return path
    prov = self.path / "provenance.json"
    if prov.exists():
      from lm.train import provenance

      text = text.rstrip("\n") + "\n\n" + provenance.markdown(json.loads(prov.read_text()))
    write_text_atomic(path, text)
    log.info("report: %s", path)
    return path

  def close(self) -> None:
    if hasattr(self, "metrics"):
      self.metrics.close()
    if self._lock is not None:
      self._lock.release()
      self._lock = None


def pyplot():
  """`matplotlib.pyplot` on the file-only Agg backend: runs write PNGs and need no display."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120) -> Path:
  """`fig` with a tight layout as a PNG at `path`, then closed; the one place plots are saved."""
  path = Path(path)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return path


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None,
                   floatfmt: str = ".4g") -> str:
  """A GitHub markdown table of dict rows."""
  if not rows:
    return "(no rows)\n"
  columns = columns or list(rows[0])

  def fmt(v):
    if isinstance(v, float):
      return format(v, floatfmt)
    return str(v).replace("|", "\\|").replace("\n", " ")

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def _expand(history: list[dict], names: list[str]) -> list[str]:
  """`names` with each `prefix/*` replaced by the logged metrics under that prefix."""
  out = []
  for name in names:
    if name.endswith("/*"):
      found = {k.split("/", 1)[1] for h in history for k in h
               if k.split("/", 1)[-1].startswith(name[:-1]) and is_scalar(h[k])}
      out.extend(sorted(found))
    else:
      out.append(name)
  return out


def plot_history(history: list[dict], names: list[str], run_dir: "RunDir") -> list[str]:
  """One PNG per metric in `names` (`prefix/*` expands to every logged metric under it): train
  per step as a line, eval as points; returns the file names written under `run_dir.plots`."""
  plt = pyplot()
  files = []
  for name in _expand(history, names):
    if not any(is_scalar(h.get(f"{split}/{name}")) for h in history for split in ("train", "eval")):
      continue
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split, style in (("train", "-"), ("eval", "o-")):
      pts = [(h["step"], h[f"{split}/{name}"]) for h in history
             if is_scalar(h.get(f"{split}/{name}"))]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, style, label=split, alpha=0.8 if split == "train" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.legend()
    ax.grid(alpha=0.3)
    fname = name.replace("/", "_") + ".png"
    save_figure(fig, run_dir.plots / fname, dpi=110)
    files.append(fname)
  return files
