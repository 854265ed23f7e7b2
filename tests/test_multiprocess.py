"""Multi-host for real, on one machine: `dpo.py:smoke` as two processes with 4 CPU devices each
(jax.distributed with a local coordinator, gloo collectives, each process feeding its own rows)
matches one process with 8 devices at every step, through a preemption: SIGTERM to one process,
both agree on a step, save there and exit 0, and the same command (`--resume=auto`) continues."""

import json
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from tests_helpers import REPO, check_train_run_directory, launch_cmd, launch_env

# One mesh for both layouts: data 2 x fsdp 4 over 8 devices; batches split 8 ways.
ARGS = ("--config=configs/dpo.py:smoke", "--config.mesh.data=2", "--config.mesh.fsdp=4",
        "--config.train.batch_size=8", "--config.train.eval_batch_size=8",
        "--config.train.steps=4", "--config.train.checkpoint_every=2")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, *extra):
  return subprocess.Popen(launch_cmd(*ARGS, f"--workdir={workdir}", *extra), cwd=REPO,
                          env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def _two_processes(workdir, *extra):
  port = _free_port()
  return [_start(workdir, "--cpu_devices=4", "--num_processes=2", f"--process_id={i}",
                 f"--coordinator_address=127.0.0.1:{port}", *extra) for i in range(2)]


def _wait(procs):
  for p in procs:
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]


def _metrics(workdir):
  rows = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    rows.setdefault(r["step"], {}).update(
        {k: v for k, v in r.items() if k.startswith(("train/loss", "train/rewards", "train/grad",
                                                       "eval/"))})
  return rows


@pytest.mark.subprocess
@pytest.mark.real_weights
def test_two_processes_equal_one_through_a_sigterm_and_resume_auto(tmp_path, smollm2_gguf):
  one = tmp_path / "one"
  single = _start(one, "--cpu_devices=8")  # runs beside the two processes: independent runs
  two = tmp_path / "two"
  procs = _two_processes(two, "--resume=auto")  # an empty workdir: auto starts the run
  deadline = time.time() + 600
  while '"step": 1,' not in _text(two / "metrics.jsonl"):
    assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs]
    assert time.time() < deadline
    time.sleep(0.1)
  # the scheduler's notice reaches one process; JAX's preemption service tells the other
  procs[1].send_signal(signal.SIGTERM)
  logs = [p.communicate(timeout=600)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [log[-3000:] for log in logs]
  status = json.loads((two / "status.json").read_text())
  assert status["state"] == "preempted" and 1 <= status["step"] < 4, status
  assert (two / "checkpoints" / str(status["step"])).is_dir()  # saved where both stopped
  assert "--resume=auto" in logs[0]  # the line saying how to continue
  _wait([single])
  _wait(_two_processes(two, "--resume=auto"))  # the scheduler reruns the same command
  a, b = _metrics(one), _metrics(two)
  assert sorted(a) == sorted(b) == list(range(5))
  for step in a:
    assert sorted(a[step]) == sorted(b[step]), step
    # gloo sums across processes in another order than one process does: last-bit differences
    for k in a[step]:
      np.testing.assert_allclose(b[step][k], a[step][k], rtol=1e-5, atol=1e-5, err_msg=f"{step} {k}")
  # the one-process run is also DPO's launch smoke: a whole run directory
  check_train_run_directory(one, ["loss.png", "rewards_margin.png"], steps=4)
  assert (two / "adapter/adapter_model.safetensors").exists()
  assert json.loads((two / "summary.json").read_text())["devices"] == 8


def _text(path):
  return path.read_text() if path.exists() else ""


@pytest.mark.subprocess
def test_a_slurm_job_of_two_tasks_runs_as_two_processes(tmp_path, shared_data):
  """SLURM's environment alone (as `srun --ntasks=2` sets it, on one node) makes launch.py start
  multi-process JAX: both tasks see 2 processes and 4 devices, and a pretraining run finishes with
  its report's sample, which process 0 draws from the model gathered by every process."""
  from lm.pretrain import corpus
  from tests_helpers import task_config

  work, store = tmp_path / "run", tmp_path / "corpus"
  # the token store built first: both processes building it at once race (issue 32, item 2)
  corpus.open_or_build(store, task_config("pretrain:smoke").corpus)
  slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
           "JAX_COORDINATOR_PORT": str(_free_port()),
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # as this process: it compiles, barely computes
  procs = [subprocess.Popen(
      launch_cmd("--config=configs/pretrain.py:smoke", f"--workdir={work}", "--cpu_devices=2",
                 "--config.train.steps=2", "--config.data.seq_len=256",  # fewer windows to score
                 f"--config.corpus.store={store}"),
      cwd=REPO, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True,
      env=launch_env(**slurm, SLURM_PROCID=str(i), SLURM_LOCALID=str(i))) for i in range(2)]
  logs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [log[-3000:] for log in logs]
  for i, log in enumerate(logs):
    assert f"process {i}/2, devices" in log and "CpuDevice(id=2049)" in log
  assert json.loads((work / "status.json").read_text())["state"] == "finished"
  assert "## Sample" in (work / "report.md").read_text()


def test_distributed_arguments_come_from_the_flags_then_jax_variables_then_detection():
  from launch import distributed_args

  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed_args(env) == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                                   "process_id": 3}
  assert distributed_args(env, "h:1", 2, 0) == {"coordinator_address": "h:1", "num_processes": 2,
                                                "process_id": 0}
  assert distributed_args({}) == {"coordinator_address": None, "num_processes": None,
                                  "process_id": None}  # jax.distributed detects the cluster
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
    distributed_args({"JAX_PROCESS_ID": "one"})
