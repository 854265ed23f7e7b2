"""The one scoring primitive (`token_logprobs`), the one reference scorer, exact token KL, and
sliding-window perplexity."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import heads, inputs, lora
from lm.progress import Progress


def token_logprobs(logits_bsv: jax.Array, targets_bs: jax.Array, temperature: float = 1.0
                   ) -> jax.Array:
  """log p(target) under softmax(logits / temperature), `[B, S]` float32.

  The only place logits become per-token log-probs: DPO, GRPO, PPO, perplexity and KL call it.
  """
  logits = logits_bsv.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  picked = jnp.take_along_axis(logits, targets_bs[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def selected_token_logprobs(model, h_bsd: jax.Array, targets_bs: jax.Array, select_bs: jax.Array,
                            *, chunk: int = 64, temperature: float = 1.0) -> jax.Array:
  """`token_logprobs` of `targets_bs` at the `select_bs` positions (0 elsewhere), `[B, S]` float32,
  from final hidden states `h_bsd` through `model.logits`, never materialising `[B, S, V]`.

  Each row's selected positions are first moved to its front (a stable per-row sort, so the
  batch axis and its sharding stay put); the output head then runs `chunk` positions at a time
  and skips chunks where no row has a selected position, so unselected positions (prompts,
  padding) cost nothing wherever they sit. Each chunk's logits are recomputed in the backward
  pass instead of being kept, so memory holds one `[B, chunk, V]` block.
  """
  b, s = targets_bs.shape
  order_bs = jnp.argsort(jnp.logical_not(select_bs).astype(jnp.int32), axis=1, stable=True)
  by_order = lambda x: jnp.take_along_axis(x, order_bs.reshape(order_bs.shape + (1,) * (x.ndim - 2)),
                                           axis=1)
  h_bsd, targets_bs, select_bs = by_order(h_bsd), by_order(targets_bs), by_order(select_bs)
  n = -(-s // chunk)
  pad = n * chunk - s
  if pad:
    h_bsd = jnp.pad(h_bsd, ((0, 0), (0, pad), (0, 0)))
    targets_bs = jnp.pad(targets_bs, ((0, 0), (0, pad)))
    select_bs = jnp.pad(select_bs, ((0, 0), (0, pad)))
  blocks = lambda x: jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def scored(h_bcd, t_bc, sel_bc):
    return jnp.where(sel_bc, token_logprobs(model.logits(h_bcd), t_bc, temperature), 0.0)

  def skipped(h_bcd, t_bc, sel_bc):
    del h_bcd, sel_bc
    return jnp.zeros(t_bc.shape, jnp.float32)

  def one(args):
    h_bcd, t_bc, sel_bc = args
    return jax.lax.cond(sel_bc.any(), scored, skipped, h_bcd, t_bc, sel_bc)

  out = jax.lax.map(one, (blocks(h_bsd), blocks(targets_bs.astype(jnp.int32)),
                          blocks(select_bs.astype(bool))))
  out_bs = jnp.moveaxis(out, 0, 1).reshape(b, n * chunk)[:, :s]
  return jnp.take_along_axis(out_bs, jnp.argsort(order_bs, axis=1), axis=1)  # original order


def token_kl(logits_p_bsv: jax.Array, logits_q_bsv: jax.Array) -> jax.Array:
  """Exact KL(p || q) in nats between the next-token distributions at every position, `[B, S]`.

  Full-vocabulary sum_v p_v (log p_v - log q_v) from both logits' log_softmax (float32); p is
  usually the policy, q the reference. The sample estimators (k1, k3) use `token_logprobs`.
  """
  logp = jax.nn.log_softmax(logits_p_bsv.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(logits_q_bsv.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  # where, not multiply: p = 0 against log q = -inf (a masked vocab entry) would be nan.
  return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def sample_kl_estimators(logp: jax.Array, logq: jax.Array, clamp: float | None = None
                         ) -> dict[str, jax.Array]:
  """Schulman's estimators of KL(p || q) at tokens sampled from p, from their log-probs under p
  (policy) and q (reference): k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r with
  r = q/p. k1 is unbiased but can be negative, k3 unbiased and >= 0, k2 biased with low
  variance. `clamp` bounds log r to [-clamp, clamp] first (k3's exp overflows on rare tokens)."""
  log_r = logq - logp
  if clamp is not None:
    log_r = jnp.clip(log_r, -clamp, clamp)
  return {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": jnp.expm1(log_r) - log_r}


def next_token_logprobs(model, tokens_bs: jax.Array, attn_mask=None, positions_bs=None,
                        select_bs: jax.Array | None = None, temperature: float = 1.0) -> jax.Array:
  """log p(tokens[:, t+1] | tokens[:, :t+1]) for t < S-1: `[B, S-1]` float32, one forward, under
  softmax(logits / temperature) (RL scores a rollout at its sampling temperature).

  With `select_bs` (`[B, S]`, e.g. a loss mask) only the targets it marks are scored (0
  elsewhere): the output head runs on the chunks of positions that hold them
  (`selected_token_logprobs`), so long prompts cost no `[S, V]` logits.
  """
  if select_bs is None:
    logits, _ = model(tokens_bs, positions_bs=positions_bs, attn_mask=attn_mask)
    return token_logprobs(logits[:, :-1], tokens_bs[:, 1:], temperature)
  h_bsd, _ = model.hidden_states(tokens_bs, positions_bs, attn_mask)
  return selected_token_logprobs(model, h_bsd[:, :-1], tokens_bs[:, 1:], select_bs[:, 1:] > 0,
                                 temperature=temperature)


@functools.partial(jax.jit, static_argnums=0, static_argnames="temperature")
def reference_token_logprobs(graphdef, states: tuple, tokens_bs, mask_bs, select_bs, *,
                             temperature: float = 1.0) -> jax.Array:
  """`next_token_logprobs` `[B, S-1]` float32 of the `select_bs` targets under the reference: the
  decoder of `nnx.merge(graphdef, *states)` (`heads.backbone`) in eval mode with its LoRA adapters
  off (the model as given when it has none). DPO's precomputed reference and the KL of GRPO's
  reward and PPO's penalty all score through it; the caller's model keeps its mode."""
  model = heads.backbone(nnx.merge(graphdef, *states))
  model.eval()
  with lora.disabled(model):
    return next_token_logprobs(model, tokens_bs, mask_bs, select_bs=select_bs,
                               temperature=temperature)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  nll_sum: float
  n_tokens: int
  n_windows: int
  window: int
  stride: int

  @property
  def mean_nll(self) -> float:
    return self.nll_sum / max(self.n_tokens, 1)

  @property
  def perplexity(self) -> float:
    return math.exp(self.mean_nll)


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, end, n_scored) per window, HF's "perplexity of fixed-length models" recipe.

  Each window scores only its last `end - prev_end` tokens, so every token is scored once with up
  to `window - stride` tokens of context; the first token of the text is never scored.
  """
  if window < 2 or not 0 < stride <= window:
    raise ValueError(f"need window >= 2 and 0 < stride <= window; got window={window} "
                     f"stride={stride}.")
  out, prev_end = [], 0
  for begin in range(0, n_tokens, stride):
    end = min(begin + window, n_tokens)
    out.append((begin, end, end - prev_end))
    prev_end = end
    if end == n_tokens:
      break
  return out


def perplexity(model, token_ids: Sequence[int], *, window: int, stride: int,
               batch_size: int = 4, prefix: Sequence[int] = ()) -> PerplexityResult:
  """Sliding-window perplexity of one long token stream (static shapes: one compile). `prefix`
  (e.g. a model's sink token) starts every window, outside the `window` tokens of text."""
  inputs.token_array(np.asarray(token_ids), vocab_size=model.cfg.vocab_size, what="token_ids")
  prefix = [int(t) for t in prefix]
  if window + len(prefix) > model.cfg.max_seq_len:
    raise inputs.InputError(f"window={window} (+ a prefix of {len(prefix)}) is more than the "
                            f"model's max_seq_len {model.cfg.max_seq_len}; use a smaller window.")
  ids = np.asarray(token_ids, np.int32).tolist()
  spans = sliding_windows(len(ids), window, stride)
  # Each window is a (context, scored tokens) row; a window's first token is never scored.
  firsts = [b + max(e - b - n, 1) for b, e, n in spans]
  contexts = [prefix + ids[b:f] for (b, _, _), f in zip(spans, firsts)]
  scored = [ids[f:e] for (_, e, _), f in zip(spans, firsts)]
  graphdef, state = nnx.split(model)
  fn = lambda t, m, _: {"lp": _next_token_logprobs_jit(graphdef, state, t, m)}
  rows = score_rows(fn, contexts, scored, batch_size=batch_size, multiple=window + len(prefix),
                    desc="perplexity")
  nll_sum = -float(sum(np.sum(r["lp"], dtype=np.float64) for r in rows))
  return PerplexityResult(nll_sum, sum(map(len, scored)), len(spans), window, stride)


def left_pad_rows(rows: Sequence[Sequence[int]], batch_size: int, multiple: int, pad_id: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, int]:
  """(tokens, mask, width): rows left-padded with `pad_id` into `[batch_size, width]`, width
  rounded up to `multiple` so batches share compilations; unused rows are all padding."""
  width = -(-max(len(r) for r in rows) // multiple) * multiple
  tokens = np.full((batch_size, width), pad_id, np.int32)
  mask = np.zeros((batch_size, width), np.int32)
  for j, r in enumerate(rows):
    tokens[j, width - len(r):] = r
    mask[j, width - len(r):] = 1
  return tokens, mask, width


def _tail_mask(lengths: Sequence[int], batch_size: int, width: int) -> np.ndarray:
  """`[batch_size, width]` int32, 1 on the last `lengths[j]` positions of row j."""
  out = np.zeros((batch_size, width), np.int32)
  for j, n in enumerate(lengths):
    if n:
      out[j, width - n:] = 1
  return out


def score_rows(fn, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
               batch_size: int = 8, multiple: int = 32, desc: str = "scoring"
               ) -> list[dict[str, np.ndarray]]:
  """The one host scoring loop: every (prompt, continuation) row through `fn`, in input order.

  Rows are sorted by length (batches share widths: fewer compiles, less padding), left-padded
  into `[batch_size, W]` (W rounded up to `multiple`; a last batch is filled with empty rows),
  and `fn(tokens_bw, mask_bw, continuation_bw) -> {name: [B, W-1]}` scores the next-token
  positions (`continuation_bw` marks the continuation tokens, for `next_token_logprobs`'
  `select_bs`); each row gets the `len(continuation)` positions that predict its continuation.
  """
  if len(prompts) != len(continuations):
    raise inputs.InputError(f"{len(prompts)} prompts but {len(continuations)} continuations; "
                            "pass one continuation per prompt.")
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(continuations[i]))
  out: list = [None] * len(order)
  batches = range(0, len(order), batch_size)
  progress = Progress(len(batches), desc, "batch", enabled=len(batches) > 1)
  for start in batches:
    idx = order[start:start + batch_size]
    rows = [list(prompts[i]) + list(continuations[i]) for i in idx]
    tokens, mask, width = left_pad_rows(rows, batch_size, multiple)
    tail = _tail_mask([len(continuations[i]) for i in idx], batch_size, width)
    scored = {k: np.asarray(v) for k, v in fn(tokens, mask, tail).items()}
    for j, i in enumerate(idx):
      n = len(continuations[i])
      out[i] = {k: v[j, width - 1 - n:] if n else np.zeros((0,), v.dtype) for k, v in scored.items()}
    progress.update(1)
  progress.close()
  return out


@functools.partial(jax.jit, static_argnums=0)
def _next_token_logprobs_jit(graphdef, state, tokens_bs, mask_bs):
  return next_token_logprobs(nnx.merge(graphdef, state), tokens_bs, mask_bs)


def response_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      *, batch_size: int = 8, multiple: int = 32) -> list[np.ndarray]:
  """Per-token log-probs of each response given its prompt (`score_rows`; one forward a batch)."""
  cfg = model.cfg
  prompts = inputs.token_rows(prompts, vocab_size=cfg.vocab_size, what="prompts")
  if len(responses) != len(prompts):
    raise inputs.InputError(f"{len(prompts)} prompts but {len(responses)} responses; pass one "
                            "response per prompt.")
  for i, (p, r) in enumerate(zip(prompts, responses)):
    inputs.token_array(np.asarray(r, np.int64), vocab_size=cfg.vocab_size, what=f"responses[{i}]")
    if len(p) + len(r) > cfg.max_seq_len:
      raise inputs.InputError(
          f"prompts[{i}] has {len(p)} tokens plus {len(r)} response tokens, more than the model's "
          f"max_seq_len {cfg.max_seq_len}. Shorten it (keep its last tokens) or the response.")
  graphdef, state = nnx.split(model)
  fn = lambda t, m, _: {"lp": _next_token_logprobs_jit(graphdef, state, t, m)}
  return [r["lp"] for r in score_rows(fn, prompts, responses, batch_size=batch_size,
                                      multiple=multiple)]
