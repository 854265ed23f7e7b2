"""Faults around a run directory (issue 30): a live run's lock, a config changed on resume, a
finished run resumed, a run that fails before its first step, and launch.py's one-line errors.
The checkpoint faults (bit flips, truncation, poisoned states, SIGTERM) are in
tests/test_faults_checkpoint.py, the value and data-file errors in tests/test_faults_inputs.py."""

import json
import logging
import os
import subprocess

import pytest

from lm.train import rundir
from tests_helpers import REPO, launch_cmd, launch_env, run_task, task_config


def _pretrain(workdir, store, *, resume=False, allow_config_change=False, **overrides):
  """pretrain.py:smoke (a character model on tiny Shakespeare) for 4 steps, a checkpoint every 2."""
  return run_task("pretrain:smoke", workdir,
                  {"corpus.store": str(store), "train.steps": 4, "train.checkpoint_every": 2,
                   "train.eval_every": 2, "sample_tokens": 0, **overrides}, resume=resume,
                  allow_config_change=allow_config_change)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shared_data):
  """A finished 4-step pretraining run (and the token store later runs reuse)."""
  del shared_data
  root = tmp_path_factory.mktemp("runs")
  _pretrain(root / "run", root / "store")
  return root / "run", root / "store"


def _files(workdir):
  """{relative path: bytes} of everything in a run directory but its lock file."""
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
          if p.is_file() and p.name != ".lock"}


def test_a_live_run_refuses_a_second_process_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
  config = task_config("pretrain:smoke")
  live = rundir.RunDir(tmp_path / "run", config)
  holder = json.loads((tmp_path / "run/.lock").read_text())
  assert holder["pid"] == os.getpid()
  # a requeued job resuming the directory while the first process still trains
  with pytest.raises(rundir.RunLockedError, match=rf"in use by a live run: pid {os.getpid()} on "):
    rundir.RunDir(tmp_path / "run", config, resume=True)
  live.close()
  assert (tmp_path / "run/.lock").read_text() == ""  # a cleanly ended run leaves an empty lock
  again = rundir.RunDir(tmp_path / "run", config, resume=True)
  again.close()
  # a process killed without releasing leaves its holder in the file but no flock on it
  (tmp_path / "run/.lock").write_text(json.dumps({"pid": 2**22 + 7, "host": "gone",
                                                  "started": "then"}))
  with caplog.at_level(logging.WARNING):
    rundir.RunDir(tmp_path / "run", config, resume=True).close()
  assert f"took over the lock of a run that is no longer alive (pid {2**22 + 7} on gone" in caplog.text


def test_resume_refuses_a_changed_config_unless_allowed_and_records_it(finished_run, tmp_path):
  run, store = finished_run
  work = tmp_path / "run"
  _pretrain(work, store, **{"train.steps": 2})
  before = (work / "config.json").read_text()
  with pytest.raises(rundir.ConfigChangedError) as e:
    _pretrain(work, store, resume=True, **{"train.lr": 0.5, "model.seed": 3})
  assert "train.lr: 0.001 -> 0.5" in str(e.value) and "model.seed: 0 -> 3" in str(e.value)
  assert "--allow_config_change" in str(e.value) and "train.steps" not in str(e.value).split(
      "Fields that may")[0]
  assert (work / "config.json").read_text() == before  # refused before anything was rewritten
  assert not (work / "config_changes.jsonl").exists()
  # the steps may change on resume: the run continues to 4, and the change is recorded
  _pretrain(work, store, resume=True)
  assert json.loads((work / "config.json").read_text())["train"]["steps"] == 4
  changes = [json.loads(line) for line in (work / "config_changes.jsonl").read_text().splitlines()]
  assert changes[-1]["changes"] == {"train.steps": [2, 4]} and not changes[-1]["allowed"]
  # --allow_config_change continues with the new value and says so in the record
  _pretrain(work, store, resume=True, allow_config_change=True,
            **{"train.steps": 6, "train.lr": 5e-4})
  last = json.loads((work / "config_changes.jsonl").read_text().splitlines()[-1])
  assert last["allowed"] and last["changes"]["train.lr"] == [0.001, 5e-4]
  assert json.loads((work / "status.json").read_text())["state"] == "finished"
  del run


def test_resuming_a_finished_run_changes_nothing(finished_run):
  run, store = finished_run
  status = json.loads((run / "status.json").read_text())
  assert status["state"] == "finished" and status["pid"] == os.getpid()
  before = _files(run)
  result = _pretrain(run, store, resume=True)
  assert result == json.loads((run / "summary.json").read_text())
  assert _files(run) == before


def test_a_run_that_fails_before_its_first_step_leaves_nothing_behind(finished_run, tmp_path):
  _, store = finished_run
  bad = {"corpus.sources": ["no-such-source"], "corpus.store": str(tmp_path / "new-store")}
  with pytest.raises(ValueError, match="no-such-source"):
    run_task("pretrain:smoke", tmp_path / "fresh", bad)
  assert not (tmp_path / "fresh").exists()
  # in a directory the user made: only what the run created goes
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine/notes.txt").write_text("keep")
  with pytest.raises(ValueError, match="no-such-source"):
    run_task("pretrain:smoke", tmp_path / "mine", bad)
  assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
  # so the corrected command runs as it is
  _pretrain(tmp_path / "mine", store, **{"train.steps": 2})
  assert json.loads((tmp_path / "mine/status.json").read_text())["state"] == "finished"


@pytest.mark.subprocess
def test_launch_errors_are_one_line_naming_the_flag_and_the_fix(tmp_path):
  """Mistakes in the command line: one `error:` line (no traceback) that names what to change."""
  (tmp_path / "a_file").write_text("")
  cases = [
      (["--config=configs/sft.py:smoke", "--config.train.nosuch=3"],
       "--config.train.nosuch: the config configs/sft.py:smoke has no field 'nosuch'"),
      (["--config=configs/nosuch.py"], "--config=configs/nosuch.py: no file configs/nosuch.py; "
       "configs/ holds "),
      (["--config=configs/sft.py:nosuch"], "unknown sft variant 'nosuch'; use one of smoke"),
      (["--config=configs/sft.py:smoke", "--config.train.steps=abc"],
       "flag --config.train.steps=abc: invalid literal"),
      (["--config=configs/sft.py:smoke", "--config.train.steps=-1", "--config.train.lr=-0.01"],
       "train.steps=-1 is out of range; must be an integer >= 1"),
      (["--config=configs/quickstart.py:smoke", f"--workdir={tmp_path / 'a_file'}"],
       f"--workdir {tmp_path / 'a_file'} is a file, not a directory; choose another --workdir."),
  ]
  for args, expected in cases:
    if not any(a.startswith("--workdir") for a in args):
      args = args + [f"--workdir={tmp_path / 'w'}"]
    out = subprocess.run(launch_cmd(*args), cwd=REPO, env=launch_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1, (args, out.stderr[-2000:])
    assert expected in out.stderr, (args, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, (args, out.stderr[-2000:])
    assert not (tmp_path / "w").exists()  # refused before anything was created
