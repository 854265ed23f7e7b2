"""What every benchmark here shares: the machine's state, alternating timed rounds, their spread.

This machine's speed drifts 2-3x from day to day, and another process beside a benchmark slows
torch and XLA unequally, so a ratio is only worth quoting when both sides ran interleaved on a
machine that stayed the same:

- `Monitor` probes the machine before and after (a float32 GEMM and a memory read through
  numpy, the load average) and measures the CPU time other processes used meanwhile
  (`/proc/stat` minus this process and its children). `verdict` is "quiet", or says what was
  wrong: probes that moved by more than `tolerance`, or other work above `busy_frac` of the
  machine. `--strict` in a benchmark turns that into a refusal.
- `alternate` runs the sides' timed calls in rounds, A B then B A, so drift hits both alike.
- `spread` is min / median / max; a ratio is the ratio of medians.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Mapping

import numpy as np


def _times(fn: Callable[[], object], repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def probe() -> dict[str, float]:
  """GEMM GFLOP/s (2048^3 float32 through numpy's BLAS, best of 7: the machine's capacity, steady
  to a few percent here), memory read GB/s (sum of 256 MB, median of 9) and the 1-minute load
  average: what a drifting or shared machine changes."""
  rng = np.random.default_rng(0)
  n = 2048
  a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
  a @ b  # warm the BLAS threads
  gemm_s = min(_times(lambda: a @ b, 7))
  big = np.ones(64 * 2**20, np.float32)
  big.sum()
  read_s = statistics.median(_times(big.sum, 9))
  return {"gemm_gflops": 2 * n**3 / gemm_s / 1e9, "mem_read_gbs": big.nbytes / read_s / 1e9,
          "loadavg_1m": os.getloadavg()[0]}


def _busy_jiffies() -> int | None:
  """Non-idle CPU time of the whole machine, in clock ticks (Linux); None elsewhere."""
  try:
    with open("/proc/stat") as fh:
      fields = [int(x) for x in fh.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return sum(fields[:8]) - idle


def _own_cpu_s() -> float:
  own = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Monitor:
  """Machine state around a benchmark: `with Monitor() as m: ...` (or `m.start()` ... `m.stop()`),
  then `m.report()`."""

  def __init__(self, *, tolerance: float = 0.10, busy_frac: float = 0.10):
    self.tolerance, self.busy_frac = tolerance, busy_frac
    self.before: dict | None = None
    self.after: dict | None = None

  def __enter__(self) -> Monitor:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def start(self) -> Monitor:
    self.before = probe()
    self._t0, self._busy0, self._own0 = time.time(), _busy_jiffies(), _own_cpu_s()
    return self

  def stop(self) -> None:
    wall = time.time() - self._t0
    busy1, own1 = _busy_jiffies(), _own_cpu_s()
    self.after = probe()
    cpus = os.cpu_count() or 1
    self.other_cpu_frac = None
    if self._busy0 is not None and busy1 is not None and wall > 0:
      machine_s = (busy1 - self._busy0) / os.sysconf("SC_CLK_TCK")
      self.other_cpu_frac = max(machine_s - (own1 - self._own0), 0.0) / (wall * cpus)
    self.wall_s = wall

  def problems(self) -> list[str]:
    out = []
    for key in ("gemm_gflops", "mem_read_gbs"):
      a, b = self.before[key], self.after[key]
      if abs(b / a - 1) > self.tolerance:
        out.append(f"{key} moved {a:.1f} -> {b:.1f} ({100 * (b / a - 1):+.0f}%, more than "
                   f"{100 * self.tolerance:.0f}%): the machine's speed changed during the run")
    if self.other_cpu_frac is not None and self.other_cpu_frac > self.busy_frac:
      out.append(f"other processes used {100 * self.other_cpu_frac:.0f}% of the CPUs during the "
                 "run: measure on a quiet machine")
    if self.other_cpu_frac is None and self.before["loadavg_1m"] > 0.5:
      out.append(f"load average {self.before['loadavg_1m']:.2f} at the start: other work is "
                 "running")
    return out

  def report(self) -> dict:
    problems = self.problems()
    return {"start": self.before, "end": self.after, "wall_s": self.wall_s,
            "other_cpu_frac": self.other_cpu_frac, "cpus": os.cpu_count(),
            "verdict": "quiet" if not problems else "; ".join(problems)}


def alternate(sides: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
  """`rounds` timings of each side, interleaved: A B, B A, A B, ... Each callable does one timed
  unit and returns its seconds (so it can leave set-up out of the timing)."""
  names = list(sides)
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
      times[n].append(float(sides[n]()))
  return times


def timed(fn: Callable[[], object]) -> Callable[[], float]:
  """`fn` as a side for `alternate`: wall seconds of one call."""

  def run() -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

  return run


def spread(values: list[float]) -> dict[str, float]:
  """min / median / max and the count."""
  return {"min": min(values), "median": statistics.median(values), "max": max(values),
          "n": len(values)}


PROTOCOL = "@@bench "  # prefix of the lines a live side and its driver exchange


def say(**event) -> None:
  """A side's event line to the driver (`LiveSide.read`)."""
  print(PROTOCOL + json.dumps(event), flush=True)


def wait_go() -> None:
  """In a side: block until the driver sends 'go' (`LiveSide.step`)."""
  line = sys.stdin.readline()
  if line.strip() != "go":
    raise SystemExit(f"driver sent {line!r}, expected 'go'")


class LiveSide:
  """One side of a benchmark in its own live subprocess (its own peak memory, its own runtime
  settings), stepped by the driver one timed step per `step()`: the side waits for 'go'
  (`wait_go`), runs a step and reports `say(event="step", s=seconds, ...)`."""

  def __init__(self, name: str, cmd: list[str], env: Mapping[str, str]):
    self.name = name
    self._err = tempfile.TemporaryFile("w+")
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._err, text=True, env=dict(env))
    self.steps: list[dict] = []

  def read(self, want: str) -> dict:
    for line in self.proc.stdout:
      if line.startswith(PROTOCOL):
        event = json.loads(line[len(PROTOCOL):])
        if event["event"] != want:
          raise RuntimeError(f"{self.name} side sent {event}, expected {want!r}")
        return event
    self._err.seek(0)
    raise RuntimeError(f"{self.name} side ended before {want!r}:\n{self._err.read()[-4000:]}")

  def step(self) -> float:
    self.proc.stdin.write("go\n")
    self.proc.stdin.flush()
    self.steps.append(self.read("step"))
    return self.steps[-1]["s"]

  def finish(self) -> dict:
    done = self.read("done")
    self.proc.wait()
    return done


def max_rss_mb() -> float:
  """This process's peak resident memory, MB (a side reports it in its 'done' event)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def race(start: Mapping[str, Callable[[], LiveSide]], *, warmup: int, rounds: int
         ) -> tuple[dict[str, tuple[LiveSide, dict]], dict]:
  """Start each side in order (each reports 'ready' before the next starts), then inside a
  `Monitor`: `warmup` untimed steps per side, `rounds` alternating timed rounds, and each side's
  'done' event (waited for inside the monitor, so the sides' CPU time counts as this run's, not
  as other work). Returns ({name: (side, done event)}, the monitor's report)."""
  sides = {}
  for name, make in start.items():
    sides[name] = make()
    sides[name].read("ready")
  with Monitor() as monitor:
    for _ in range(warmup):
      for side in sides.values():
        side.step()
    alternate({name: side.step for name, side in sides.items()}, rounds)
    done = {name: (side, side.finish()) for name, side in sides.items()}
  return done, monitor.report()
