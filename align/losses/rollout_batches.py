"""The training rows of a `decode.rollout.Rollout` for the policy-gradient losses (GRPO, PPO).

`rollout_batch`: one right-padded row per completion, [prompt | completion | pad], with the
rollout's log-probs placed where `next_token_logprobs` scores each completion token.
`shared_rollout_batch`: GRPO's shared-prompt layout, one row per group (its prompt once, then its G
completions as branches), sized by `shared_layout`. `kept_completions` says which completions stay
in the loss (truncated ones and zero-variance groups may leave it; rows keep their place).
"""

from __future__ import annotations

import numpy as np

from align.losses import shared_prompt


def rollout_batch(rollout, advantages_n, *, width: int | None = None, pad_id: int = 0,
                  mask_truncated: bool = False, mask_zero_std: bool = False,
                  rewards_n=None, group_size: int | None = None) -> dict[str, np.ndarray]:
  """The training batch of a `decode.rollout.Rollout`: rows [prompt | completion | pad] `[N, S]`
  with attn_mask, loss_mask (the completion's tokens through `lengths_b`, so an EOS equal to the
  pad id stays in), advantages `[N]`, and old_logps `[N, S-1]` = the rollout's
  `policy_logprobs_bt` placed where `next_token_logprobs` scores each completion token.

  mask_truncated: completions that hit max_new_tokens leave the loss (TRL's
  mask_truncated_completions). mask_zero_std: groups whose rewards are all equal leave it too
  (needs rewards_n and group_size); rows keep their place so the batch shape never changes.
  """
  lengths = np.asarray(rollout.lengths_b)
  prompts = [rollout.prompts[i] for i in rollout.prompt_index_b]
  need = max(len(p) + n for p, n in zip(prompts, lengths))
  width = need if width is None else width
  if need > width:
    raise ValueError(f"rollout rows need {need} positions; width={width} is too small.")
  n_rows = len(prompts)
  tokens = np.full((n_rows, width), pad_id, np.int32)
  attn = np.zeros((n_rows, width), np.int32)
  loss = np.zeros((n_rows, width), np.int32)
  old = np.zeros((n_rows, width - 1), np.float32)
  keep = kept_completions(rollout, mask_truncated, mask_zero_std, rewards_n, group_size)
  for i, (p, n) in enumerate(zip(prompts, lengths)):
    lp = len(p)
    tokens[i, :lp] = p
    tokens[i, lp:lp + n] = rollout.tokens_bt[i, :n]
    attn[i, :lp + n] = 1
    loss[i, lp:lp + n] = keep[i]
    old[i, lp - 1:lp - 1 + n] = rollout.policy_logprobs_bt[i, :n]
  return {"tokens": tokens, "attn_mask": attn, "loss_mask": loss,
          "advantages": np.asarray(advantages_n, np.float32), "old_logps": old}


def kept_completions(rollout, mask_truncated: bool = False, mask_zero_std: bool = False,
                     rewards_n=None, group_size: int | None = None) -> np.ndarray:
  """`[N]` bool: which completions stay in the loss (`rollout_batch`'s mask_truncated /
  mask_zero_std)."""
  keep = np.ones(len(rollout.lengths_b), bool)
  if mask_truncated:
    keep &= np.asarray(rollout.finish_reasons()) != "length"
  if mask_zero_std:
    if rewards_n is None or not group_size:
      raise ValueError("mask_zero_std needs the rewards and the group size.")
    r = np.asarray(rewards_n).reshape(-1, group_size)
    keep &= np.repeat(~np.all(r == r[:, :1], axis=1), group_size)
  return keep


def shared_layout(n_groups: int, group_size: int, longest_prompt: int, max_new_tokens: int, *,
                  groups: int = 1, multiple: int = 1, width_multiple: int = 8) -> tuple[int, int]:
  """(rows, width) of `shared_rollout_batch`: one row per group, each accumulation micro-batch's
  rows padded to `multiple` (the batch shards), width = prompt + G x max_new_tokens rounded up."""
  if n_groups % groups:
    raise ValueError(f"rollout.prompts_per_step={n_groups} must be a multiple of "
                     f"train.grad_accum={groups} for rollout.share_prompt (one row per group); "
                     "change one, or set rollout.share_prompt=False.")
  per = -(-(n_groups // groups) // multiple) * multiple
  need = longest_prompt + group_size * max_new_tokens
  return per * groups, -(-need // width_multiple) * width_multiple


def shared_rollout_batch(rollout, advantages_n, *, rows: int, width: int, group_size: int,
                         groups: int = 1, pad_id: int = 0, mask_truncated: bool = False,
                         mask_zero_std: bool = False, rewards_n=None) -> dict[str, np.ndarray]:
  """`rollout_batch` in the shared-prompt layout: each group's prompt once, then its G
  completions as branches (`shared_prompt.group_segment`), one group per row; the
  rows of micro-batch k (of `groups`) hold its consecutive groups, then empty rows.

  Per-token arrays are `[rows, width]` and aligned with the tokens (a token is scored from the
  hidden state at `prev`): loss_mask, advantages (the sequence's), old_logps (the rollout's),
  seq_weight (loss mask / the sequence's kept token count: the per-sequence token mean). seq_count
  `[rows]` is G on a group's row and 0 on an empty one (a masked completion still counts, as its
  row does in `rollout_batch`).
  """
  n = len(rollout.lengths_b)
  if n % group_size or (n // group_size) % groups:
    raise ValueError(f"{n} completions do not form groups of {group_size} that split into "
                     f"{groups} micro-batches.")
  n_groups, per_micro = n // group_size, rows // groups
  if n_groups // groups > per_micro:
    raise ValueError(f"{n_groups} groups do not fit {rows} rows in {groups} micro-batches.")
  keep = kept_completions(rollout, mask_truncated, mask_zero_std, rewards_n, group_size)
  adv = np.asarray(advantages_n, np.float32)
  out = {k: np.zeros((rows, width), np.int32)
         for k in ("tokens", "positions", "segment_ids", "branch", "prev", "loss_mask")}
  out["tokens"][:] = pad_id
  for k in ("advantages", "old_logps", "seq_weight"):
    out[k] = np.zeros((rows, width), np.float32)
  out["seq_count"] = np.zeros((rows,), np.float32)
  for g in range(n_groups):
    members = range(g * group_size, (g + 1) * group_size)
    lengths = [int(rollout.lengths_b[i]) for i in members]
    seg = shared_prompt.group_segment(
        rollout.prompts[rollout.prompt_index_b[members[0]]],
        [rollout.tokens_bt[i, :l] for i, l in zip(members, lengths)])
    if len(seg["tokens"]) > width:
      raise ValueError(f"group {g} needs {len(seg['tokens'])} positions; width={width} is too "
                       "small.")
    row = (g // (n_groups // groups)) * per_micro + g % (n_groups // groups)
    sl = slice(0, len(seg["tokens"]))
    for k in ("tokens", "positions", "branch", "prev"):
      out[k][row, sl] = seg[k]
    out["segment_ids"][row, sl] = 1
    out["seq_count"][row] = group_size
    on = seg["seq"] >= 0
    idx = np.asarray(list(members))[seg["seq"][on]]  # the completion of each completion token
    pos = np.flatnonzero(on)
    kept = keep[idx]
    out["loss_mask"][row, pos] = kept
    out["advantages"][row, pos] = adv[idx]
    step = np.concatenate([np.arange(l) for l in lengths])  # token index within its completion
    out["old_logps"][row, pos] = rollout.policy_logprobs_bt[idx, step]
    counts = np.array([l if keep[i] else 0 for i, l in zip(members, lengths)])
    out["seq_weight"][row, pos] = kept / np.maximum(counts[seg["seq"][on]], 1)
  return out
