"""Shared-prompt layouts: a prompt stored once, its continuations as branches after it.

DPO: each preference pair as one [prompt | chosen | rejected] segment (below). GRPO: each group as
one [prompt | completion 1 | ... | completion G] segment (`group_segment`, built by
`align.losses.rollout_batches.shared_rollout_batch`). Both are scored by `layout_token_logprobs`: a
token sees the earlier tokens of its own segment that are prompt (branch 0) or in its own branch,
with positions restarting after the prompt in every branch, so every log-prob equals the one of
the branch's own [prompt | continuation] row.

A batch of B pairs (`[B, 2, S]` arrays) becomes rows R x width W: tokens, positions (restarting
after the prompt for the rejected branch), pair_ids (1.. per pair; 0 = pad), branch (0 prompt,
1 chosen, 2 rejected), prev (the row index whose hidden state predicts this token), loss_mask and
attn_mask `[R, W]`, and pair_mask float32 [B]. `plan_shared_layout` picks one R x W for all the
batches of a run (one compile); `align.losses.dpo` scores it.
"""

from __future__ import annotations

import functools
import itertools
import logging

import jax.numpy as jnp
import numpy as np

from lm.scoring import selected_token_logprobs

log = logging.getLogger(__name__)


def layout_attention(segment_rw, branch_rw):
  """`[R, W, W]` keys each query may see (the model adds causality): same segment (ids > 0), and
  the key is prompt (branch 0) or in the query's branch."""
  same = (segment_rw[:, :, None] == segment_rw[:, None, :]) & (segment_rw[:, None, :] > 0)
  visible = (branch_rw[:, None, :] == 0) | (branch_rw[:, :, None] == branch_rw[:, None, :])
  return same & visible


def layout_token_logprobs(model, tokens_rw, positions_rw, segment_rw, branch_rw, prev_rw,
                          select_rw, *, temperature: float = 1.0):
  """log p(token at w) from the hidden state at `prev[w]`, at the `select_rw` positions (0
  elsewhere), `[R, W]` float32, at the temperature (`lm.scoring.selected_token_logprobs`)."""
  h_rwd, _ = model.hidden_states(tokens_rw, positions_rw, layout_attention(segment_rw, branch_rw))
  h_prev = jnp.take_along_axis(h_rwd, prev_rw[..., None], axis=1)
  return selected_token_logprobs(model, h_prev, tokens_rw, select_rw, temperature=temperature)


def group_segment(prompt, completions) -> dict:
  """One group as [prompt | completion 1 | ... | completion G] (numpy arrays): tokens, positions
  (each completion continues at len(prompt)), branch (0 prompt, k for completion k), prev (the
  index whose hidden state predicts each token: the prompt's last for a completion's first) and
  seq (k - 1 on completion k's tokens, -1 on the prompt)."""
  p = len(prompt)
  if p == 0:
    raise ValueError("a shared-prompt group needs a prompt of at least one token.")
  tokens, positions, branch, prev, seq = [np.asarray(prompt)], [np.arange(p)], [np.zeros(p)], \
      [np.maximum(np.arange(p) - 1, 0)], [np.full(p, -1)]
  start = p
  for k, c in enumerate(completions):
    n = len(c)
    tokens.append(np.asarray(c))
    positions.append(p + np.arange(n))
    branch.append(np.full(n, k + 1))
    idx = start + np.arange(n) - 1
    if n:
      idx[0] = p - 1
    prev.append(idx)
    seq.append(np.full(n, k))
    start += n
  cat = lambda xs: np.concatenate(xs).astype(np.int32)
  return {"tokens": cat(tokens), "positions": cat(positions), "branch": cat(branch),
          "prev": cat(prev), "seq": cat(seq)}

class LayoutOverflowError(ValueError):
  """A batch's shared-prompt segments do not fit the planned rows x width."""


def _shared_segment(tokens_2s: np.ndarray, attn_2s: np.ndarray, loss_2s: np.ndarray) -> dict:
  """One pair as [prompt | chosen reply | rejected reply]: the prompt is the common prefix of
  both rows before either's first loss token, stored once."""
  lc, lr = (int(n) for n in attn_2s.sum(-1))
  first = [int(np.argmax(loss_2s[j, :n] > 0)) if (loss_2s[j, :n] > 0).any() else n
           for j, n in ((0, lc), (1, lr))]
  p = min(first)
  differ = np.flatnonzero(tokens_2s[0, :p] != tokens_2s[1, :p])
  p = int(differ[0]) if differ.size else p
  idx_c, idx_r = np.arange(lc), np.arange(p, lr)
  # hidden state predicting each token: the one before it in its own branch; the rejected reply's
  # first token is predicted from the prompt's last (p - 1); without a prompt it is no target.
  prev_r = lc + np.arange(lr - p) - 1
  if lr > p:
    prev_r[0] = p - 1 if p else lc
  return {
      "tokens": np.concatenate([tokens_2s[0, :lc], tokens_2s[1, p:lr]]),
      "positions": np.concatenate([idx_c, idx_r]),
      "branch": np.concatenate([np.zeros(p), np.ones(lc - p), np.full(lr - p, 2)]),
      "prev": np.concatenate([np.maximum(idx_c - 1, 0), prev_r]),
      "loss_mask": np.concatenate([loss_2s[0, :lc], loss_2s[1, p:lr]]),
  }


def _first_fit_decreasing(lengths: list[int], rows: int, width: int) -> list[tuple[int, int]]:
  """(row, offset) per length; LayoutOverflowError when they do not fit `rows` x `width`."""
  free = [width] * rows
  place = [(0, 0)] * len(lengths)
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    row = next((r for r in range(rows) if free[r] >= lengths[i]), None)
    if row is None:
      raise LayoutOverflowError(
          f"shared-prompt segments of lengths {sorted(lengths, reverse=True)} do not fit "
          f"{rows} rows x {width} tokens; plan the layout with plan_shared_layout over these "
          "batches (or raise data.share_prompt_width)")
    place[i] = (row, width - free[row])
    free[row] -= lengths[i]
  return place


def _segments_by_group(batch: dict, groups: int) -> list[list[dict]]:
  """`_shared_segment` of every pair, split into `groups` consecutive groups of B / groups."""
  b = batch["tokens"].shape[0]
  if b % groups:
    raise ValueError(f"{b} pairs must split into grad_accum={groups} groups")
  per = b // groups
  return [[_shared_segment(batch["tokens"][i], batch["attn_mask"][i], batch["loss_mask"][i])
           for i in range(g * per, (g + 1) * per)] for g in range(groups)]


def share_prompts(batch: dict, *, rows: int, width: int, groups: int = 1) -> dict:
  """A preference batch (`[B, 2, S]` arrays) in the shared-prompt layout (module docstring).

  Chosen and rejected share their prompt's tokens, so the forward runs P + C + R positions per
  pair instead of 2 (P + max(C, R)); log-probs are identical (same visible context and RoPE
  positions). `groups` (the gradient-accumulation count) packs each consecutive B / groups
  pairs into their own R / groups rows, with pair ids local to the group, so splitting every
  array along its first axis gives self-contained micro-batches. `ref_logps` passes through.
  """
  b = batch["tokens"].shape[0]
  if rows % groups:
    raise ValueError(f"{rows} rows must split into grad_accum={groups} groups")
  out = {k: np.zeros((rows, width), np.int32) for k in ("tokens", "positions", "pair_ids",
                                                       "branch", "prev")}
  out["loss_mask"] = np.zeros((rows, width), np.float32)
  rows_per = rows // groups
  for g, segs in enumerate(_segments_by_group(batch, groups)):
    place = _first_fit_decreasing([len(s["tokens"]) for s in segs], rows_per, width)
    for j, (seg, (row, off)) in enumerate(zip(segs, place)):
      r, sl = g * rows_per + row, slice(off, off + len(seg["tokens"]))
      for k in ("tokens", "positions", "branch", "loss_mask"):
        out[k][r, sl] = seg[k]
      out["prev"][r, sl] = seg["prev"] + off
      out["pair_ids"][r, sl] = j + 1
  out["attn_mask"] = (out["pair_ids"] > 0).astype(np.int32)
  out["pair_mask"] = np.ones((b,), np.float32)
  if "ref_logps" in batch:
    out["ref_logps"] = batch["ref_logps"]
  return out


def plan_shared_layout(batches, *, groups: int = 1, multiple: int = 1, width: int = 0,
                       width_multiple: int = 64) -> tuple[int, int]:
  """(rows, width) that every batch in `batches` fits in the shared-prompt layout: width (0 =
  the longest segment rounded up to `width_multiple`) and the most rows first-fit-decreasing
  needs for any group, times `groups`, rounded up to `multiple` (the data-parallel size)."""
  lengths = [[len(seg["tokens"]) for seg in segs]
             for batch in batches for segs in _segments_by_group(batch, groups)]
  if not lengths:
    raise ValueError("plan_shared_layout needs at least one batch")
  longest = max(max(ls) for ls in lengths)
  width = width or -(-longest // width_multiple) * width_multiple
  if longest > width:
    raise ValueError(f"data.share_prompt_width={width} is shorter than the longest pair "
                     f"({longest} tokens as prompt + chosen + rejected); raise it or set 0")
  rows_per = 1
  for ls in lengths:
    while True:
      try:
        _first_fit_decreasing(ls, rows_per, width)
        break
      except LayoutOverflowError:
        rows_per += 1
  rows_per = -(-rows_per // multiple) * multiple
  return rows_per * groups, width


def arrange(config, train_ds, eval_batches, n_shards: int):
  """The train dataset and eval batches mapped onto the layout, each with one static rows x width
  planned over the batches it will yield (one compile each); returns them and the layout."""
  groups = int(config.train.grad_accum)
  plan = functools.partial(plan_shared_layout, multiple=n_shards,
                           width=config.data.share_prompt_width)
  rows, width = plan(itertools.islice(iter(train_ds), config.train.steps), groups=groups)
  train_ds = train_ds.map(functools.partial(share_prompts, rows=rows, width=width, groups=groups))
  layout = {"rows": rows, "width": width, "pairs": config.data.batch_size}
  if eval_batches is not None:
    e_rows, e_width = plan(eval_batches())
    layout["eval"] = {"rows": e_rows, "width": e_width}
    plain = eval_batches
    eval_batches = lambda: (share_prompts(b, rows=e_rows, width=e_width) for b in plain())
  log.info("shared-prompt layout %s", layout)
  return train_ds, eval_batches, layout
