"""DPO's shared-prompt layout ([prompt | chosen | rejected] packed into rows) gives the same
log-probs, loss and gradients as scoring chosen and rejected as two full rows."""

import jax
import numpy as np
import pytest
from flax import nnx

from align import losses
from align.losses import shared_prompt
from configs import dpo as dpo_config
from lm import lora
from align.losses.dpo import pair_logprobs
from lm import config as lm_config
from lm.model import Transformer

CFG = dpo_config.get_config("smoke").loss
CFG.update(beta=0.1, variant="sigmoid", label_smoothing=0.0)


def _pairs(rng, s=16):
  """Pairs with different prompt / reply lengths, right padding, and one pair whose rows differ
  inside the prompt (only the common prefix is shared)."""
  spec = [(5, 7, 4), (3, 13, 11), (8, 2, 8), (6, 9, 10)]  # prompt, chosen, rejected lengths
  b = len(spec)
  out = {"tokens": np.zeros((b, 2, s), np.int32), "attn_mask": np.zeros((b, 2, s), np.int32),
         "loss_mask": np.zeros((b, 2, s), np.float32)}
  for i, (p, c, r) in enumerate(spec):
    prompt = rng.integers(1, 256, p)
    for j, n in enumerate((c, r)):
      out["tokens"][i, j, :p + n] = np.concatenate([prompt, rng.integers(1, 256, n)])
      out["attn_mask"][i, j, :p + n] = 1
      out["loss_mask"][i, j, p:p + n] = 1
  out["tokens"][3, 1, 4] += 1  # pair 3: the rows differ at token 4 of the 6-token prompt
  return out


def _model():
  model = Transformer(lm_config.preset("tiny"), rngs=nnx.Rngs(0))
  lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0), rngs=nnx.Rngs(1))
  for path, v in nnx.state(model, nnx.LoRAParam).flat_state():
    if path[-1] == "lora_b":  # policy != reference
      v.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), v.get_value().shape))
  return model


def _loss_and_grads(model, batch):
  graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

  def f(p):
    return losses.get("dpo")(nnx.merge(graphdef, p, rest), batch, CFG)

  (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
  return loss, metrics, grads


def test_shared_prompt_layout_equals_two_rows_per_pair():
  batch = _pairs(np.random.default_rng(0))
  rows, width = shared_prompt.plan_shared_layout([batch], width=48)
  shared = shared_prompt.share_prompts(batch, rows=rows, width=width)
  assert rows * width < batch["tokens"].size  # fewer positions than 2 rows per pair
  model = _model()
  lp, n = pair_logprobs(model, batch)
  lp_s, n_s = pair_logprobs(model, shared)
  np.testing.assert_array_equal(np.asarray(n_s), np.asarray(n))
  np.testing.assert_allclose(np.asarray(lp_s), np.asarray(lp), rtol=1e-5)

  loss, metrics, grads = _loss_and_grads(model, batch)
  loss_s, metrics_s, grads_s = _loss_and_grads(model, shared)
  assert float(loss_s) == pytest.approx(float(loss), rel=1e-5)
  for k in metrics:
    assert float(metrics_s[k]) == pytest.approx(float(metrics[k]), rel=1e-4, abs=1e-6), k
  for g, g_s in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_s)):
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(g), rtol=1e-4, atol=1e-6)


def test_shared_prompt_groups_are_self_contained_micro_batches():
  batch = _pairs(np.random.default_rng(1))
  rows, width = shared_prompt.plan_shared_layout([batch], groups=2, width_multiple=8)
  shared = shared_prompt.share_prompts(batch, rows=rows, width=width, groups=2)
  model = _model()
  lp = np.asarray(pair_logprobs(model, batch)[0])
  for g in range(2):
    half = {k: v.reshape((2, v.shape[0] // 2) + v.shape[1:])[g] for k, v in shared.items()}
    np.testing.assert_allclose(np.asarray(pair_logprobs(model, half)[0]), lp[2 * g:2 * g + 2],
                               rtol=1e-5)


def test_shared_prompt_layout_overflow_names_the_fix():
  batch = _pairs(np.random.default_rng(2))
  rows, width = shared_prompt.plan_shared_layout([batch], width_multiple=8)
  with pytest.raises(shared_prompt.LayoutOverflowError, match="plan_shared_layout"):
    shared_prompt.share_prompts(batch, rows=rows - 1, width=width)
  with pytest.raises(ValueError, match="share_prompt_width"):
    shared_prompt.plan_shared_layout([batch], width=16)
  rows2, _ = shared_prompt.plan_shared_layout([batch], multiple=4)
  assert rows2 % 4 == 0 and rows2 >= rows
