"""Long work reports its rate and the time left: a log line after the first unit, then at most
every `log_every_s` seconds, and one at the end, the rate counting only the work done since the
start (a resumed run's earlier steps are not in it)."""

import logging

from lm import progress as progress_lib


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_lines_carry_rate_and_time_left_and_come_at_most_every_interval(monkeypatch, caplog):
  clock = _Clock()
  monkeypatch.setattr(progress_lib.time, "perf_counter", clock)
  with caplog.at_level(logging.INFO, logger="lm.progress"):
    p = progress_lib.Progress(10, "train", "step", initial=4, log_every_s=30.0)
    clock.now += 20.0
    p.update(2, loss="0.51")  # the first update: 2 steps in 20 s, 4 steps left at 0.1 step/s
    assert caplog.messages == ["train: 6/10 steps (60%), 0.1 steps/s, 0:20 elapsed, 0:40 left; "
                               "loss 0.51"]
    clock.now += 10.0
    p.update(1)  # 30 s since the start, 10 s since the last line: nothing
    assert len(caplog.messages) == 1
    clock.now += 30.0
    p.update(1, loss="0.47")  # 4 in 60 s, 2 left -> 30 s
    assert caplog.messages[-1] == ("train: 8/10 steps (80%), 0.0667 steps/s, 1:00 elapsed, 0:30 "
                                   "left; loss 0.47")
    clock.now += 3680.0
    p.update(2, loss="0.40")  # 6 in 3740 s; the last unit is always reported
    p.close()
  assert caplog.messages[-1] == ("train: 10/10 steps (100%), 0.0016 steps/s, 1:02:20 elapsed, "
                                 "0:00 left; loss 0.40")
  assert len(caplog.messages) == 3
  assert progress_lib.Progress(3, "scoring", "batch", enabled=False).line().startswith(
      "scoring: 0/3 batches (0%)")
  assert progress_lib.Progress(12, "decode_sweep", "strategy", enabled=False).line().startswith(
      "decode_sweep: 0/12 strategies (0%)")
  assert progress_lib.Progress(2, "sweep", "day", enabled=False).line().startswith(
      "sweep: 0/2 days (0%)")


def test_nothing_is_reported_when_disabled_and_nothing_is_known_before_the_first_unit(caplog):
  with caplog.at_level(logging.INFO, logger="lm.progress"):
    p = progress_lib.Progress(2, "scoring", "batch", enabled=False)
    assert p.eta_s() is None and p.line().endswith("? left")
    p.update(2)
    p.close()
  assert caplog.messages == []
