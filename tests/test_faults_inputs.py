"""Bad inputs fail by name, before they cost a run: a data file that is not JSON, not UTF-8 or
empty names the file, the line and the fix (and `data.on_error=skip` skips and counts a broken
line), and the KL estimators of GRPO and PPO stay finite for any log-ratio at their default
configs. The range and type checks of every config field are in test_configs.py."""

import gzip
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align import data as D
from align.losses import grpo, ppo
from configs import grpo as grpo_config
from configs import ppo as ppo_config
from configs import sft as sft_config
from lm.data.sources import DataFileError
from lm.hub.vocab import ByteTokenizer

ROWS = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(6)]


class _Bytes(ByteTokenizer):
  """The byte tokenizer with the batch call and plain-prompt rendering `align.encoding` uses."""

  eos_token = chat_template = None

  def __call__(self, texts, add_special_tokens=False):
    return {"input_ids": [self.encode(t) for t in texts]}


def _build(path, **data):
  cfg = sft_config.get_config("smoke").data
  cfg.update(source=str(path), n=None, n_eval=1, max_length=64, max_prompt_length=32,
             pad_multiple=0, **data)
  return D.build(cfg, _Bytes(), "sft")


def _jsonl(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return path


def test_a_broken_json_line_names_the_file_the_line_and_the_fix(tmp_path):
  """The line is the file's (blank lines count), 1-based; the fix names on_error=skip."""
  lines = [json.dumps(r) for r in ROWS]
  lines[3:3] = ["", '{"prompt": "x", oops}']  # line 5 of the file
  path = _jsonl(tmp_path / "train.jsonl", lines)
  with pytest.raises(DataFileError) as e:
    _build(path, on_error="fail")
  first, second = str(e.value).splitlines()
  assert first.startswith(f"{path}, line 5: not valid JSON")
  assert "on_error=skip" in second


def test_on_error_skip_skips_a_broken_line_and_counts_it(tmp_path):
  lines = [json.dumps(r) for r in ROWS]
  lines.insert(2, '{"prompt": "x", oops}')
  _, _, stats = _build(_jsonl(tmp_path / "train.jsonl", lines), on_error="skip")
  norm = stats["normalize"]
  assert (norm["n_rows"], norm["n_records"], norm["n_malformed"]) == (7, 6, 1)
  assert norm["unreadable_lines"] == [3] and norm["malformed_indices"] == [2]
  assert stats["n_train"] + stats["n_eval"] == 6


@pytest.mark.parametrize("gz", [False, True])
def test_a_file_that_is_not_utf8_names_the_line(tmp_path, gz):
  text = "".join(json.dumps(r) + "\n" for r in ROWS[:2]).encode()
  text += '{"prompt": "caf\u00e9", "response": "r"}\n'.encode("latin-1")
  path = tmp_path / ("train.jsonl.gz" if gz else "train.jsonl")
  path.write_bytes(gzip.compress(text) if gz else text)
  with pytest.raises(DataFileError) as e:
    _build(path, on_error="skip")
  first, second = str(e.value).splitlines()
  assert first.startswith(f"{path}, line 3: not UTF-8 text") and "UTF-8" in second


@pytest.mark.parametrize("text", ["", "\n\n", "[]"])
def test_an_empty_file_says_it_holds_no_records(tmp_path, text):
  path = tmp_path / ("train.json" if text == "[]" else "train.jsonl")
  path.write_text(text)
  with pytest.raises(DataFileError, match="holds no records") as e:
    _build(path, on_error="skip")
  assert str(e.value).startswith(f"{path}: ") and "Fix:" in str(e.value)


def test_a_file_whose_every_row_is_broken_says_so(tmp_path):
  path = _jsonl(tmp_path / "train.jsonl", ["{oops}", '{"prompt": 1}'])
  with pytest.raises(ValueError, match=r"none of its 2 rows is a usable sft record") as e:
    _build(path, on_error="skip")
  assert str(e.value).startswith(str(path))


def _far_logprobs():
  """Policy log-probs and reference log-probs 1000 nats above and below them, `[2, 3]`."""
  lp = jnp.array([[-1.0, -2.0, -0.5], [-3.0, -1.5, -0.1]])
  ref = lp + jnp.array([[1000.0, -1000.0, 0.3], [-1000.0, 1000.0, -0.2]])
  return lp, ref


def test_grpo_kl_is_finite_for_any_log_ratio_by_default():
  """configs/grpo.py's loss (k3, β 0.04): a log-ratio of ±1000 gives a finite loss and gradient."""
  cfg = grpo_config.get_config().loss
  lp, ref = _far_logprobs()
  mask, adv = jnp.ones_like(lp, bool), jnp.array([1.0, -1.0])

  def loss(lp):
    return grpo.policy_loss(lp, jax.lax.stop_gradient(lp), adv, mask, eps_low=cfg.eps_low,
                            eps_high=cfg.eps_high, dual_clip=cfg.dual_clip,
                            aggregation=cfg.aggregation,
                            max_completion_length=cfg.max_completion_length, ref_logp_bt=ref,
                            beta=cfg.beta, kl_estimator=cfg.kl_estimator,
                            kl_clamp=cfg.kl_clamp)[0]

  value, grad = jax.value_and_grad(loss)(lp)
  assert cfg.kl_estimator == "k3" and np.isfinite(float(value)) and float(value) > 0
  assert np.isfinite(np.asarray(grad)).all()


def test_ppo_kl_penalty_is_finite_for_any_log_ratio_by_default(monkeypatch):
  """configs/ppo.py's clamp reaches the per-token penalty PPO builds from a rollout (values and
  reference stubbed: reference log-probs 1000 nats from the policy's), with k3, the estimator
  that overflows (k1 and k2 stay finite unclamped)."""
  config = ppo_config.get_config("smoke")
  config.loss.kl_estimator = "k3"
  lp, ref = _far_logprobs()
  n, t = lp.shape
  prompt = [5, 6]
  width = len(prompt) + t
  ref_rows = np.zeros((n, width - 1), np.float32)
  ref_rows[:, len(prompt) - 1:len(prompt) - 1 + t] = ref
  monkeypatch.setattr(ppo, "_rollout_scores", lambda trainer, rows, temperature, with_ref: (
      jnp.zeros((n, width - 1)), jnp.asarray(ref_rows)))
  rollout = types.SimpleNamespace(prompts=[prompt], prompt_index_b=[0] * n, lengths_b=[t] * n,
                                  tokens_bt=np.full((n, t), 7), policy_logprobs_bt=np.asarray(lp))
  batch, metrics = ppo.make_batch_for(config, trainer=None)(width, 0)(
      rollout, np.array([1.0, 0.0]), {}, rollout_index=5)
  assert np.isfinite(batch["advantages"]).all() and np.isfinite(batch["returns"]).all()
  assert np.isfinite(metrics["kl"]) and np.isfinite(metrics["kl_seq"])
