"""Run directories: resolved config, JSONL + TensorBoard metrics, plots and a markdown report.

A workdir that already holds another run's config is never reused silently: pass `resume=True`
to continue it, or choose a new directory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)


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


class MetricsWriter:
  """Metrics to `metrics.jsonl` (one object per step; arrays as lists) and TensorBoard event files
  (scalars as scalars, arrays as histograms of their values)."""

  def __init__(self, workdir: Path):
    self.path = workdir / "metrics.jsonl"
    self._fh = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(workdir / "tensorboard"))
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
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, self.path)
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


class RunDir:
  """A run's directory: `config.json`, `metrics.jsonl`, `tensorboard/`, `plots/`, `report.md`."""

  def __init__(self, workdir: str | os.PathLike, config: Any, *, resume: bool = False,
               primary: bool = True):
    """`primary=False` (processes other than 0 of a multi-process run): the same paths, no
    checks and no writes, so one process owns the directory."""
    self.path = Path(workdir).absolute()
    self.resume = resume
    self.primary = primary
    if not primary:
      self.metrics = _NoMetrics()
      return
    cfg_file = self.path / "config.json"
    cfg_json = config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") \
        else json.dumps(_to_jsonable(config), indent=2)
    if cfg_file.exists() and not resume:
      raise WorkdirExistsError(
          f"{self.path} already holds a run (config.json). Pass --resume to continue it, or use a "
          "new --workdir; nothing was overwritten."
      )
    self.path.mkdir(parents=True, exist_ok=True)
    (self.path / "plots").mkdir(exist_ok=True)
    if cfg_file.exists():
      os.replace(cfg_file, self.path / f"config.previous.{int(time.time())}.json")
    tmp = self.path / "config.json.tmp"
    tmp.write_text(cfg_json)
    os.replace(tmp, cfg_file)
    self.metrics = MetricsWriter(self.path)

  @property
  def plots(self) -> Path:
    return self.path / "plots"

  def write_json(self, name: str, obj: Any) -> Path:
    path = self.path / name
    if not self.primary:
      return path
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_to_jsonable(obj), indent=2))
    os.replace(tmp, path)
    return path

  def write_report(self, text: str) -> Path:
    path = self.path / "report.md"
    if not self.primary:
      return path
    path.write_text(text)
    log.info("report: %s", path)
    return path

  def close(self) -> None:
    self.metrics.close()


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
