"""Direct Preference Optimisation and its variants over one stacked chosen/rejected forward.

With h = (log π(y_c|x) - log π(y_r|x)) - (log π_ref(y_c|x) - log π_ref(y_r|x)) (sums over response
tokens), the per-pair losses are:
  sigmoid  -(1-ε) log σ(βh) - ε log σ(-βh)          (Rafailov et al. 2023; ε>0 = conservative cDPO)
  robust   (-(1-ε) log σ(βh) + ε log σ(-βh)) / (1-2ε) (Chowdhury et al. 2024, unbiased under flips)
  hinge    max(0, 1 - βh)                           (SLiC-HF; Zhao et al. 2023)
  ipo      (h - 1/(2β))², with log-probs averaged per response token (Azar et al. 2023; as TRL)
The reference is the same weights with LoRA adapters switched off (no second copy), or log-probs
precomputed into the batch as `ref_logps` `[B, 2]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align.algorithm import Algorithm
from align.losses import register, shared_prompt
from align.losses.common import sequence_logprobs
from align.losses.shared_prompt import layout_token_logprobs
from lm import lora
from lm.scoring import reference_token_logprobs, score_rows
from lm.sharding import host_array
from lm.train import aot

VARIANTS = ("sigmoid", "robust", "hinge", "ipo")


def dpo_losses(policy_c, policy_r, ref_c, ref_r, *, beta: float, variant: str = "sigmoid",
               label_smoothing: float = 0.0):
  """Per-pair losses `[B]` from (summed or, for IPO, averaged) log-probs `[B]`."""
  h = (policy_c - policy_r) - (ref_c - ref_r)
  eps = label_smoothing
  if variant == "sigmoid":
    return -(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
  if variant == "robust":
    return (-(1 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (
        1 - 2 * eps)
  if variant == "hinge":
    return jax.nn.relu(1 - beta * h)
  if variant == "ipo":
    return (h - 1 / (2 * beta)) ** 2
  raise ValueError(f"dpo variant {variant!r} is unknown; choose one of {VARIANTS}")


REFERENCES = ("adapters_off", "precomputed")


def check_config(cfg) -> None:
  """Clear errors for bad β / variant / label smoothing / reference before anything compiles."""
  if cfg.reference not in REFERENCES:
    raise ValueError(f"loss.reference={cfg.reference!r} is unknown; choose one of {REFERENCES}.")
  if cfg.variant not in VARIANTS:
    raise ValueError(f"loss.variant={cfg.variant!r} is unknown; choose one of {VARIANTS}.")
  if not cfg.beta > 0:
    raise ValueError(f"loss.beta={cfg.beta} must be > 0 (the seeds use 0.1).")
  ls = cfg.label_smoothing
  if not 0 <= ls < 0.5:
    raise ValueError(f"loss.label_smoothing={ls} must be in [0, 0.5).")


def pair_logprobs(model, batch: dict):
  """Summed response log-probs and token counts of chosen and rejected, `[B, 2]` each, from a
  `[B, 2, S]` batch or one in the shared-prompt layout (`align.losses.shared_prompt.share_prompts`)."""
  if "pair_ids" in batch:
    return _shared_pair_logprobs(model, batch)
  tokens = batch["tokens"]
  b, two, s = tokens.shape
  flat = lambda x: x.reshape(b * two, s)
  lp, n = sequence_logprobs(model, flat(tokens), flat(batch["attn_mask"]), flat(batch["loss_mask"]))
  return lp.reshape(b, two), n.reshape(b, two)


def _shared_pair_logprobs(model, batch: dict):
  """`pair_logprobs` of the shared-prompt layout: a token sees the earlier tokens of its own pair
  that are prompt or in its own branch; each target is scored from the hidden state at `prev`."""
  pair_rw, branch_rw = batch["pair_ids"], batch["branch"]
  w_rw = batch["loss_mask"].astype(jnp.float32)
  lp_rw = layout_token_logprobs(model, batch["tokens"], batch["positions"], pair_rw, branch_rw,
                                batch["prev"], w_rw > 0)
  n = batch["pair_mask"].shape[0]
  # (pair, branch) -> row of [B, 2]; prompt and padding go to a dropped segment
  seg = jnp.where((pair_rw > 0) & (branch_rw > 0), (pair_rw - 1) * 2 + branch_rw - 1, 2 * n)
  total = lambda x: jax.ops.segment_sum(x.ravel(), seg.ravel(), num_segments=2 * n).reshape(n, 2)
  return total(lp_rw * w_rw), total(w_rw)


def reference_logprobs(model, batch: dict):
  """`ref_logps` from the batch when precomputed; else the same model with adapters off."""
  if "ref_logps" in batch:
    return batch["ref_logps"]
  if not lora.count_params(model, nnx.LoRAParam):
    raise ValueError(
        "DPO needs a reference: this model has no LoRA adapters to switch off. Set "
        "config.loss.reference='precomputed' (reference log-probs scored once before training) "
        "or train with LoRA (config.lora.rank > 0)."
    )
  with lora.disabled(model):
    ref, _ = pair_logprobs(model, batch)
  return jax.lax.stop_gradient(ref)


@register("dpo")
def dpo_loss(model, batch: dict, cfg):
  """batch: tokens/attn_mask/loss_mask `[B, 2, S]` (0 = chosen, 1 = rejected), optional
  ref_logps `[B, 2]`. cfg: beta, variant, label_smoothing."""
  policy, n_tok = pair_logprobs(model, batch)
  ref = reference_logprobs(model, batch)
  if cfg.variant == "ipo":
    per_tok = jnp.maximum(n_tok, 1.0)
    pol_x, ref_x = policy / per_tok, ref / per_tok
  else:
    pol_x, ref_x = policy, ref
  losses_b = dpo_losses(pol_x[:, 0], pol_x[:, 1], ref_x[:, 0], ref_x[:, 1], beta=cfg.beta,
                        variant=cfg.variant, label_smoothing=cfg.label_smoothing)
  loss = losses_b.mean()
  reward_c = cfg.beta * (policy[:, 0] - ref[:, 0])
  reward_r = cfg.beta * (policy[:, 1] - ref[:, 1])
  return loss, {
      "loss": loss,
      "rewards/chosen": reward_c.mean(),
      "rewards/rejected": reward_r.mean(),
      "rewards/margin": (reward_c - reward_r).mean(),
      "rewards/accuracy": (reward_c > reward_r).astype(jnp.float32).mean(),
      "logps/chosen": policy[:, 0].mean(),
      "logps/rejected": policy[:, 1].mean(),
  }


def precompute_reference(model, examples: list[dict], batch_size: int = 8) -> list[dict]:
  """Examples with `ref_logps` `[2]` added: the reference (adapters off, or the model as given
  when it has none) scored once through the one host loop (`lm.scoring.score_rows`), so training
  and eval skip the reference forward. Each branch is a (prompt, response) row: the response
  starts at its first loss-mask token, and its log-probs are summed with the loss-mask weights.
  A model of shapes alone (`launch.py --compile_only`) gives zeros: the field's shape."""
  if aot.is_abstract(model):
    return [dict(ex, ref_logps=np.zeros(2, np.float32)) for ex in examples]
  prompts, responses, weights = [], [], []
  for ex in examples:
    for branch in range(2):
      n = int(ex["attn_mask"][branch].sum())
      w = np.asarray(ex["loss_mask"][branch][:n], np.float64)
      first = int(np.argmax(w > 0)) if (w > 0).any() else n
      prompts.append(ex["tokens"][branch][:first].tolist())
      responses.append(ex["tokens"][branch][first:n].tolist())
      weights.append(w[first:n])
  graphdef, state = nnx.split(model)
  # under a multi-process mesh the scored rows come back sharded: gathered onto every process
  fn = lambda t, m, sel: {"lp": host_array(reference_token_logprobs(graphdef, (state,), t, m, sel))}
  rows = score_rows(fn, prompts, responses, batch_size=batch_size, desc="reference log-probs")
  sums = np.array([np.dot(r["lp"].astype(np.float64), w) for r, w in zip(rows, weights)])
  return [dict(ex, ref_logps=sums[2 * i:2 * i + 2].astype(np.float32))
          for i, ex in enumerate(examples)]


def _transform_train(config, model):
  if config.loss.reference == "precomputed":
    return lambda examples: precompute_reference(model, examples)
  return None


def _arrange(config, train_ds, eval_batches, mesh):
  if not config.data.share_prompt:
    return train_ds, eval_batches, {}
  n_shards = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
  train_ds, eval_batches, layout = shared_prompt.arrange(config, train_ds, eval_batches, n_shards)
  return train_ds, eval_batches, {"shared_prompt": layout}


ALGORITHM = Algorithm(
    name="dpo", loss=dpo_loss, data_kind="preference",
    plotted=("loss", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected"),
    check=lambda config: check_config(config.loss),
    transform_train=_transform_train,
    # the reference never changes: score the held-out pairs under it once, not at every eval
    prepare_eval=lambda config, model, examples: precompute_reference(
        model, examples, config.train.eval_batch_size),
    arrange=_arrange)
