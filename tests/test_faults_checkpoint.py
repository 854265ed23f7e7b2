"""Faults around checkpoints, injected: a bit-flipped, truncated or missing file in the newest
checkpoint is skipped with a line naming why and the run resumes from the previous intact one as
if nothing happened; a damaged `resume_step` is refused by name; a poisoned run (lr 1e30) stops
naming a good checkpoint with the poisoned one marked bad; a stalled run (lr 1e6) stops like a
NaN; SIGTERM saves at the step boundary and resumes exactly; a resumed run's history, report and
summary equal an uninterrupted run's."""

import contextlib
import json
import logging
import os
import re
import signal

import numpy as np
import pytest
from flax import nnx
from tests_helpers import Killed, run_task

from align import losses
from configs import train_base
from lm import config as lm_config
from lm import lora
from lm.model import Transformer
from lm.train.checkpoint import DIGEST, Checkpointer, CheckpointError
from lm.train.trainer import NonFiniteLossError, Preempted, StalledError, Trainer

CKPT_LOG = "lm.train.checkpoint"


def _cfg(**kw):
  """A train section for the tiny LoRA model below: 6 steps, a checkpoint every 2, one warm-up
  step (the first step's lr is 0)."""
  cfg = train_base.base("align.losses.sft", "smoke").train
  cfg.update(steps=6, batch_size=8, grad_accum=1, lr=1e-2, warmup_steps=1, schedule="constant",
             min_lr_ratio=0.0, grad_clip=1.0, weight_decay=0.0, seed=0, eval_every=0,
             checkpoint_every=2)
  cfg.update(kw)
  return cfg


def _trainer(**kw) -> Trainer:
  model = Transformer(lm_config.preset("tiny"), rngs=nnx.Rngs(0))
  lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0),
                  rngs=nnx.Rngs(params=1, lora_dropout=2))
  return Trainer(model, losses.get("sft"), None, _cfg(**kw),
                 trainable=lora.trainable_filter("lora"))


def _batch(i: int, b: int = 8, s: int = 16) -> dict:
  rng = np.random.default_rng(i)
  tokens = rng.integers(1, 256, (b, s)).astype(np.int32)
  loss_mask = np.ones((b, s), np.float32)
  loss_mask[:, :4] = 0
  return {"tokens": tokens, "attn_mask": np.ones((b, s), np.int32), "loss_mask": loss_mask}


class _Batches:
  """Batch i at step i + 1, with a grain iterator's `get_state`/`set_state`; dies (as a SIGKILL
  would) when asked for batch `kill_at`, i.e. before step `kill_at + 1`."""

  def __init__(self, kill_at: int | None = None):
    self.i, self.kill_at = 0, kill_at

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.i == self.kill_at:
      raise Killed(f"killed before step {self.i + 1}")
    self.i += 1
    return _batch(self.i - 1)

  def get_state(self) -> dict:
    return {"i": self.i}

  def set_state(self, state: dict) -> None:
    self.i = state["i"]


def _params(trainer: Trainer) -> dict:
  return {"/".join(map(str, k)): np.asarray(v.get_value())
          for k, v in trainer.params.flat_state()}


@pytest.fixture(scope="module")
def uninterrupted():
  """Losses by step and final parameters of the 6-step run, never stopped."""
  trainer = _trainer()
  history = trainer.fit(_Batches())
  return {h["step"]: h["train/loss"] for h in history}, _params(trainer)


def _largest_array_file(step_dir):
  return max((p for p in (step_dir / "model").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _damage(step_dir, kind: str) -> str:
  """Damage one array file of the checkpoint in `step_dir`; the reason a restore should give."""
  path = _largest_array_file(step_dir)
  rel = path.relative_to(step_dir).as_posix()
  data = bytearray(path.read_bytes())
  if kind == "bitflip":
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return f"digest mismatch in {rel}"
  if kind == "truncated":
    path.write_bytes(bytes(data[:len(data) // 2]))
    return f"{rel} is {len(data) // 2} bytes, its digest says {len(data)} (truncated or overwritten)"
  path.unlink()
  return f"file missing: {rel}"


def test_a_save_cut_off_mid_write_is_skipped_by_name_and_resume_equals_uninterrupted(
    tmp_path, caplog, uninterrupted):
  ckpt = Checkpointer(tmp_path / "ckpt")
  with pytest.raises(Killed):
    _trainer().fit(_Batches(kill_at=4), ckpt=ckpt)
  # killed while Orbax wrote step 4: its temporary directory, half written, never renamed
  cut = ckpt.directory / "4.orbax-checkpoint-tmp-1796680000"
  os.rename(ckpt.step_dir(4), cut)
  _largest_array_file(cut).write_bytes(b"")
  ckpt = Checkpointer(tmp_path / "ckpt")  # the restarted process finds the directory so
  assert ckpt.all_steps() == [2]
  trainer = _trainer()
  with caplog.at_level(logging.WARNING, logger=CKPT_LOG):
    history = trainer.fit(_Batches(), ckpt=ckpt, resume=True)
  skipped = [r.getMessage() for r in caplog.records if r.name == CKPT_LOG]
  assert skipped == [f"checkpoint {cut} was cut off mid-write (Orbax's temporary directory, "
                     "never renamed into place): skipped"]
  losses_seen, params = uninterrupted
  assert {h["step"]: h["train/loss"] for h in history} == {s: losses_seen[s] for s in (3, 4, 5, 6)}
  for name, value in params.items():
    np.testing.assert_array_equal(_params(trainer)[name], value, err_msg=name)
  # the only save cut off: nothing to restore, the run starts over and still names it
  for step in ckpt.all_steps():
    os.rename(ckpt.step_dir(step), ckpt.directory / f"{step}.orbax-checkpoint-tmp-1")
  ckpt = Checkpointer(tmp_path / "ckpt")
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=CKPT_LOG):
    history = _trainer().fit(_Batches(), ckpt=ckpt, resume=True)
  assert [h["step"] for h in history] == list(range(1, 7))
  named = [r.getMessage().split()[1] for r in caplog.records
           if "cut off mid-write" in r.getMessage()]
  assert named == [str(p) for p in ckpt.cut_off()] and len(named) >= 2


@pytest.mark.parametrize("kind", ["bitflip", "truncated", "missing"])
def test_damaged_newest_checkpoint_is_skipped_and_resume_equals_uninterrupted(
    tmp_path, caplog, uninterrupted, kind):
  ckpt = Checkpointer(tmp_path / "ckpt")
  with pytest.raises(Killed):
    _trainer().fit(_Batches(kill_at=4), ckpt=ckpt)
  assert ckpt.all_steps() == [2, 4]
  why = _damage(ckpt.step_dir(4), kind)

  with pytest.raises(CheckpointError, match=rf"checkpoint step 4 .*{re.escape(why)}"):
    _trainer().fit(_Batches(), ckpt=ckpt, resume_step=4)  # chosen by name: refused by name

  trainer = _trainer()
  with caplog.at_level(logging.WARNING, logger=CKPT_LOG):
    history = trainer.fit(_Batches(), ckpt=ckpt, resume=True)
  skipped = [r.getMessage() for r in caplog.records if r.name == CKPT_LOG]
  assert skipped == [f"checkpoint step 4 in {ckpt.directory} skipped: {why}"]
  losses_seen, params = uninterrupted
  assert {h["step"]: h["train/loss"] for h in history} == {s: losses_seen[s] for s in (3, 4, 5, 6)}
  for name, value in params.items():
    np.testing.assert_array_equal(_params(trainer)[name], value, err_msg=name)
  # the damaged step was replaced by the resumed run's own
  assert ckpt.all_steps() == [2, 4, 6]
  assert all(ckpt.check(s).state == "intact" for s in ckpt.all_steps())


def test_digest_goes_with_its_step_and_a_step_without_one_is_unverified(tmp_path, caplog):
  """Orbax lists, restores and garbage-collects steps with the digest inside; a step whose digest
  is missing (killed between Orbax's rename and the digest) is passed over for an intact one and
  taken, with a warning, when it is all there is; a non-finite state is never taken."""
  model = Transformer(lm_config.preset("tiny"), rngs=nnx.Rngs(0))
  with Checkpointer(tmp_path, max_to_keep=2) as ck:
    for step in (1, 2, 3):
      ck.save(step, model)
    assert ck.all_steps() == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]  # step 1's digest went too
    digest = json.loads((ck.step_dir(3) / DIGEST).read_text())
    assert digest["finite"] is True and digest["bad"] is None
    assert "model/_METADATA" in digest["files"] and "extra/metadata" in digest["files"]

    (ck.step_dir(3) / DIGEST).unlink()
    with caplog.at_level(logging.WARNING, logger=CKPT_LOG):
      assert ck.restore(model)[1]["step"] == 2
    assert "checkpoint step 3" in caplog.text and "skipped: no digest.json" in caplog.text

    (ck.step_dir(2) / DIGEST).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=CKPT_LOG):
      assert ck.restore(model)[1]["step"] == 3
    assert "restoring step 3 unverified" in caplog.text

    model.final_norm.scale[...] = np.nan
    ck.save(4, model)
    assert ck.check(4).why == "it holds non-finite values"
    assert ck.restore(model)[1]["step"] == 3
    with pytest.raises(CheckpointError, match="step 4 .*non-finite"):
      ck.restore(model, step=4)
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 5 .*\[3, 4\]"):
      ck.restore(model, step=5)
    (ck.step_dir(4) / DIGEST).write_text("{not json")
    assert ck.check(4).why == f"its {DIGEST} does not parse"


def _saved_params(step_dir) -> list[np.ndarray]:
  import jax
  import orbax.checkpoint as ocp

  return [np.asarray(x) for x in jax.tree.leaves(ocp.StandardCheckpointer().restore(
      step_dir / "model"))]


def test_poisoned_checkpoint_is_marked_bad_and_resume_continues_from_a_good_one(tmp_path,
                                                                                caplog):
  """lr 1e30 after a warm-up step at lr 0: step 2's update leaves finite weights around 1e30, the
  loss of step 3 is NaN. The checkpoint at step 2 held that state: it is marked bad, and the
  error names the newest good one (none with a checkpoint every 2 steps, step 1 with one every
  step), which a resume with a sane lr continues from."""
  ckpt = Checkpointer(tmp_path / "every2")
  with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3; .*checkpoint 2 held the "
                     r"state that led here and is marked bad; no good checkpoint is left"):
    _trainer(lr=1e30).fit(_Batches(), ckpt=ckpt)
  assert max(np.abs(x).max() for x in _saved_params(ckpt.step_dir(2))) > 1e20  # finite, huge
  assert ckpt.check(2).why == "marked bad because the loss of step 3 computed from it was nan"
  with pytest.raises(CheckpointError, match=r"no intact checkpoint .*step 2: marked bad"):
    _trainer().fit(_Batches(), ckpt=ckpt, resume=True)

  ckpt = Checkpointer(tmp_path / "every1")
  with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3; .*checkpoint 2 .*marked "
                     r"bad; the last good checkpoint \(step 1\) .*--resume \(or --resume_step=1\)"):
    _trainer(lr=1e30, checkpoint_every=1).fit(_Batches(), ckpt=ckpt)
  with caplog.at_level(logging.WARNING, logger=CKPT_LOG):
    history = _trainer().fit(_Batches(), ckpt=ckpt, resume=True)
  assert f"checkpoint step 2 in {ckpt.directory} skipped: marked bad" in caplog.text
  assert [h["step"] for h in history] == [2, 3, 4, 5, 6]
  assert all(np.isfinite(h["train/loss"]) for h in history)


def test_a_stalled_run_stops_naming_the_loss_and_the_last_good_checkpoint(tmp_path):
  """lr 1e6: from step 4 the loss sits at ln V (uniform) with a zero gradient; after
  stall_steps = 5 such steps the run stops, the checkpoints from the state before the stall on
  marked bad; stall_steps = 0 lets the same run finish."""
  ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  with pytest.raises(StalledError, match=r"stalled at step 8: the loss sits at 5\.545\d* "
                     r"\(= ln 256, the uniform prediction\) with zero gradient since step 4 .*"
                     r"checkpoints 4, 6 .* marked bad; the last good checkpoint \(step 2\).*"
                     r"Lower train\.lr"):
    _trainer(lr=1e6, steps=10, stall_steps=5).fit(_Batches(), ckpt=ckpt)
  assert [ckpt.check(s).state for s in ckpt.all_steps()] == ["intact", "bad", "bad"]
  history = _trainer(lr=1e6, steps=10, stall_steps=0).fit(_Batches())
  assert [h["train/grad_norm"] for h in history[3:]] == [0.0] * 7


@contextlib.contextmanager
def _signal_during_step(step: int, *signals: int):
  """The trainer sends itself `signals` while it trains step `step`."""
  train_step = Trainer.train_step

  def signalled(self, batch):
    if self.step == step - 1:
      for sig in signals:
        # a signal without the trainer's handler would end the test process
        assert getattr(signal.getsignal(sig), "__self__", None) is not None, "no handler"
        os.kill(os.getpid(), sig)
    return train_step(self, batch)

  with pytest.MonkeyPatch.context() as m:
    m.setattr(Trainer, "train_step", signalled)
    yield


def test_sigterm_saves_at_the_step_and_resume_equals_uninterrupted(tmp_path, caplog,
                                                                   uninterrupted):
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  ckpt = Checkpointer(tmp_path / "ckpt")
  with _signal_during_step(3, signal.SIGTERM), caplog.at_level(logging.WARNING), \
      pytest.raises(Preempted) as stop:
    _trainer().fit(_Batches(), ckpt=ckpt)
  assert (stop.value.step, stop.value.checkpoint_dir) == (3, ckpt.directory)
  assert not isinstance(stop.value, (ValueError, OSError, FloatingPointError))
  assert f"stopped by SIGTERM at step 3; checkpoint saved in {ckpt.directory}" in caplog.text
  assert ckpt.all_steps() == [2, 3] and ckpt.check(3).state == "intact"
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

  trainer = _trainer()
  history = trainer.fit(_Batches(), ckpt=ckpt, resume=True)
  losses_seen, params = uninterrupted
  assert {h["step"]: h["train/loss"] for h in history} == {s: losses_seen[s] for s in (4, 5, 6)}
  for name, value in params.items():
    np.testing.assert_array_equal(_params(trainer)[name], value, err_msg=name)

  with _signal_during_step(2, signal.SIGINT, signal.SIGINT), pytest.raises(KeyboardInterrupt):
    _trainer().fit(_Batches(), ckpt=Checkpointer(tmp_path / "twice"))
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def _stopped_at(spec, workdir, overrides) -> int:
  """The step a task run stopped by a signal reports (launch.run returns it, or lets the
  trainer's `Preempted` through)."""
  try:
    result = run_task(spec, workdir, overrides)
  except Preempted as e:
    return e.step
  return result["preempted_at"]


_WALL_CLOCK = ("train/step_s", "train/tokens_per_s", "train/tflops_per_s", "train/mfu")


def _held_out_table(report: str) -> str:
  return report.split("## Held-out metrics")[1].split("## Plots")[0]


@pytest.mark.real_weights
def test_resumed_run_returns_and_reports_the_whole_history(tmp_path, shared_data, smollm2_gguf,
                                                           monkeypatch):
  """SFT smoke stopped by SIGTERM during step 1 (checkpoint 1 saved) and resumed: `fit` returns
  the whole run's history, and the report's start/end table, its plots and summary.json's eval
  start and end are those of the uninterrupted run (evaluations at steps 0 and 2 only: the start
  row is step 0's). The settings are test_launch's SFT smoke's, so the programs compile once."""
  fit, returned = Trainer.fit, []

  def fit_and_keep(self, *args, **kwargs):
    returned.append(fit(self, *args, **kwargs))
    return returned[-1]

  monkeypatch.setattr(Trainer, "fit", fit_and_keep)
  overrides = {"train.steps": 2, "train.eval_every": 0}
  full, stopped = tmp_path / "full", tmp_path / "stopped"
  run_task("sft:smoke", full, overrides)
  with _signal_during_step(1, signal.SIGTERM):
    assert _stopped_at("sft:smoke", stopped, overrides) == 1
  assert (stopped / "checkpoints/1").is_dir()
  run_task("sft:smoke", stopped, overrides, resume=True)

  def comparable(history):
    return [{k: v for k, v in h.items() if k not in _WALL_CLOCK} for h in history]

  assert len(returned) == 2  # the stopped run returned nothing
  a, b = comparable(returned[0]), comparable(returned[1])
  assert [h["step"] for h in a] == [h["step"] for h in b] == [0, 1, 2, 2]
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=f"step {x['step']} {k}")
  summaries = [json.loads((w / "summary.json").read_text()) for w in (full, stopped)]
  for key in ("eval_start", "eval_end", "steps"):
    assert summaries[0][key] == summaries[1][key], key
  reports = [(w / "report.md").read_text() for w in (full, stopped)]
  assert _held_out_table(reports[0]) == _held_out_table(reports[1])
  for plot in ("loss.png", "perplexity.png"):
    assert (full / "plots" / plot).read_bytes() == (stopped / "plots" / plot).read_bytes(), plot
