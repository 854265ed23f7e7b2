"""Progress of long work, with its rate and the time left: a tqdm bar on a terminal, and log lines
(the lines a log file or a CI job keeps) after the first unit of work, then at most every
`log_every_s` seconds, and at the end.

  with Progress(total=steps, desc="usae", unit="step", initial=start) as progress:
    for step in range(start, steps):
      ...
      progress.update(loss=f"{loss:.4g}")
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def _plural(noun: str) -> str:
  if noun.endswith("y") and noun[-2:-1] not in tuple("aeiou"):
    return noun[:-1] + "ies"  # strategy -> strategies
  return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
  """`total` units of work from `initial`: `update(n, **postfix)` after each. The rate counts the
  units done since this object was made (a resumed run's earlier steps are not in it); the time
  left is the units left at that rate. Only process 0 of a multi-process run reports, and nothing
  does with `enabled=False` (work too short to report)."""

  def __init__(self, total: int, desc: str, unit: str = "step", *, initial: int = 0,
               log_every_s: float = 30.0, logger: logging.Logger | None = None,
               enabled: bool = True):
    self.total, self.desc, self.unit = int(total), desc, unit
    self.n = self._first = int(initial)
    self.postfix: dict[str, str] = {}
    self._log = logger or log
    self._every = log_every_s
    self._t0 = self._t_log = time.perf_counter()
    self._quiet = not enabled or _process_index() != 0
    self._bar = None
    if sys.stderr.isatty() and not self._quiet:
      from tqdm import tqdm

      self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, mininterval=2.0)

  def rate(self) -> float:
    """Units per second since the start."""
    return (self.n - self._first) / max(time.perf_counter() - self._t0, 1e-9)

  def eta_s(self) -> float | None:
    """Seconds left at the rate so far (None before the first unit)."""
    rate = self.rate()
    return (self.total - self.n) / rate if rate > 0 else None

  def line(self) -> str:
    """`desc: 120/400 steps (30%), 3.21 steps/s, 0:37 elapsed, 1:27 left; loss 0.52`."""
    eta = self.eta_s()
    units = _plural(self.unit)
    text = (f"{self.desc}: {self.n}/{self.total} {units} ({self.n / max(self.total, 1):.0%}), "
            f"{self.rate():.3g} {units}/s, {_clock(time.perf_counter() - self._t0)} elapsed, "
            f"{'?' if eta is None else _clock(eta)} left")
    if self.postfix:
      text += "; " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
    return text

  def update(self, n: int = 1, **postfix) -> None:
    self.n += n
    self.postfix.update({k: str(v) for k, v in postfix.items()})
    if self._quiet:
      return
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix(self.postfix, refresh=False)
    now = time.perf_counter()
    first = self.n - n == self._first
    if first or now - self._t_log >= self._every or self.n >= self.total:
      self._t_log = now
      self._log.info("%s", self.line())

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _process_index() -> int:
  if "jax" not in sys.modules:
    return 0
  import jax

  return jax.process_index()
