"""Every run directory says what made it: `provenance.json` holds the code's commit and whether the
tree was dirty, the package versions, the devices, the command line and the host; each resume is
appended; the report ends with it."""

import json
import socket
import subprocess
import sys

import jax
import pytest

from lm.train import provenance, rundir
from tests_helpers import task_config


def _git(cwd, *args):
  return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                        text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch):
  """A git checkout with one commit, standing in for postlab's own."""
  root = tmp_path / "checkout"
  root.mkdir()
  _git(root, "init", "-q")
  (root / "code.py").write_text("x = 1\n")
  _git(root, "add", "code.py")
  _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
  monkeypatch.setattr(provenance, "_ROOT", root)
  return root


def test_code_names_the_commit_and_a_dirty_tree(checkout, tmp_path, monkeypatch):
  head = _git(checkout, "rev-parse", "HEAD")
  assert provenance.code() == {"commit": head, "dirty": False, "branch": _git(
      checkout, "rev-parse", "--abbrev-ref", "HEAD")}
  (checkout / "notes.txt").write_text("untracked files do not change the code that ran\n")
  assert provenance.code()["dirty"] is False
  (checkout / "code.py").write_text("x = 2\n")
  changed = provenance.code()
  assert changed["commit"] == head and changed["dirty"] is True
  monkeypatch.setattr(provenance, "_ROOT", tmp_path / "not-a-checkout")
  assert provenance.code() == {"commit": None}


def test_run_directory_records_provenance_and_each_resume(checkout, tmp_path, monkeypatch):
  config = task_config("quickstart:smoke")
  monkeypatch.setattr(sys, "argv", ["launch.py", "--config=configs/quickstart.py:smoke"])
  run = rundir.RunDir(tmp_path / "run", config)
  run.close()
  prov = json.loads((tmp_path / "run/provenance.json").read_text())
  assert prov["code"]["commit"] == _git(checkout, "rev-parse", "HEAD")
  assert prov["code"]["dirty"] is False
  assert prov["command"].endswith("launch.py --config=configs/quickstart.py:smoke")
  assert prov["versions"]["jax"] == jax.__version__
  assert prov["devices"] == {"backend": "cpu", "count": len(jax.devices()), "kind": ["cpu"],
                             "processes": 1}
  assert prov["host"]["name"] == socket.gethostname()
  assert "resumed" not in prov

  (checkout / "code.py").write_text("x = 3\n")  # resumed from changed code: the record says so
  again = rundir.RunDir(tmp_path / "run", config, resume=True)
  report = again.write_report("# quickstart\n\nanswers\n").read_text()
  again.close()
  prov = json.loads((tmp_path / "run/provenance.json").read_text())
  assert prov["code"]["dirty"] is False and len(prov["resumed"]) == 1
  assert prov["resumed"][0]["code"]["dirty"] is True
  assert report.startswith("# quickstart\n\nanswers\n\n## Provenance\n")
  assert f"`{prov['code']['commit'][:12]}`" in report
  assert "with uncommitted changes" in report  # the resume's
  assert f"jax {jax.__version__}" in report and socket.gethostname() in report
