"""One compiled decoding loop: left-padded prompts, a static KV cache, `lax.while_loop` over steps.

Prefill runs the model's one forward over the padded prompt batch with a cache; each step feeds
the chosen token back. Per-row `done` flags stop rows on EOS ids, stop-token sequences, the seeds'
repeated-n-gram rule, or max_new_tokens; the loop exits once every row is done. The whole loop
(prefill included) is one jitted program, compiled once per (shapes, Sampler, stop rules).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decode.sampling import GREEDY, Sampler, SamplingParams
from lm import inputs
from lm.model import KVCache
from lm.scoring import left_pad_rows, token_logprobs

FINISH_REASONS = ("length", "eos", "stop", "repeat")
PROMPT_MULTIPLE = 16  # prompts are left-padded to a multiple of this: fewer distinct programs


@dataclasses.dataclass(frozen=True)
class StopRules:
  """Static stop rules. `stop_sequences`: token-id tuples; `repeat_ngram_block`/`repeat_threshold`:
  stop a row when its last n-gram of that size occurs more than `repeat_threshold` times in the
  generated tokens (the seeds' rule; 0 = off)."""

  stop_sequences: tuple[tuple[int, ...], ...] = ()
  repeat_ngram_block: int = 0
  repeat_threshold: int = 0


@dataclasses.dataclass
class GenerateOutput:
  """Generated ids and log-probs, `[B, T]` (pad / 0 after a row finishes).

  logprobs_bt: log p(token) under the model's raw distribution (temperature 1, no filters).
  sample_logprobs_bt: log p(token) under the distribution actually sampled from.
  policy_logprobs_bt: log p(token) under softmax(logits / T) over the full vocabulary, before
    top-k / top-p / min-p: what RL trainers (TRL, tunix) score as the policy's log-prob.
  """

  tokens_bt: np.ndarray
  logprobs_bt: np.ndarray
  sample_logprobs_bt: np.ndarray
  policy_logprobs_bt: np.ndarray
  lengths_b: np.ndarray
  finish_b: np.ndarray  # index into FINISH_REASONS

  def sequences(self) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(self.tokens_bt, self.lengths_b)]

  def finish_reasons(self) -> list[str]:
    return [FINISH_REASONS[i] for i in self.finish_b]

  def texts(self, tokenizer, stop_strings: Sequence[str] = (), *, strip: bool = False
            ) -> list[str]:
    """Decoded texts without special tokens, cut at the first stop string (and stripped)."""
    out = []
    for seq in self.sequences():
      text = tokenizer.decode(seq, skip_special_tokens=True)
      cuts = [text.find(s) for s in stop_strings if s and s in text]
      text = text[:min(cuts)] if cuts else text
      out.append(text.strip() if strip else text)
    return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = PROMPT_MULTIPLE, *,
             max_new_tokens: int = 0, max_seq_len: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """`[B, P]` tokens and mask, left-padded; P rounded up to `multiple` to reuse compilations.
  With `max_seq_len`, the padded prompt plus `max_new_tokens` must fit in it."""
  tokens, mask, width = left_pad_rows(prompts, len(prompts), multiple, pad_id)
  if max_seq_len is not None and width + max_new_tokens > max_seq_len:
    raise inputs.InputError(
        f"prompt ({width} padded tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
        f"max_seq_len {max_seq_len}; shorten the prompt or max_new_tokens.")
  return tokens, mask


def check_decode_inputs(cfg, prompts, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int
                        ) -> list[list[int]]:
  """Prompts as int lists after the host-side checks every decoding entry runs (`lm.inputs`)."""
  prompts = inputs.token_rows(prompts, vocab_size=cfg.vocab_size, max_len=cfg.max_seq_len,
                              reserve=max_new_tokens, what="prompts")
  inputs.token_ids(eos_ids, vocab_size=cfg.vocab_size, what="eos_ids")
  inputs.token_ids([pad_id], vocab_size=cfg.vocab_size, what="pad_id")
  return prompts


def stop_token_sequences(tokenizer, stop_strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """Token-id sequences a stop string may appear as (after a space, a newline, or at a start).

  Used inside the loop to stop rows early; `GenerateOutput.texts` cuts the text exactly.
  """
  seqs = set()
  for s in stop_strings:
    for prefix in ("", " ", "\n", "\n\n"):
      ids = tokenizer.encode(prefix + s, add_special_tokens=False)
      pre = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
      if ids[:len(pre)] == pre and len(ids) > len(pre):
        seqs.add(tuple(ids[len(pre):]))
  return tuple(sorted(seqs))


def _last_ngram_count(gen_bt, n_gen, n: int):
  """Occurrences of each row's last n-gram among its first `n_gen` generated tokens: `[B]`."""
  b, t = gen_bt.shape
  last = jnp.take(gen_bt, jnp.clip(n_gen - n + jnp.arange(n), 0, t - 1), axis=1)  # [B, n]
  starts = jnp.arange(t)
  match = (starts + n <= n_gen)[None, :]
  for k in range(n):
    tok = jnp.take(gen_bt, jnp.clip(starts + k, 0, t - 1), axis=1)
    match = match & (tok == last[:, k:k + 1])
  return jnp.where(n_gen >= n, match.sum(axis=1), 0)


def _ends_with(gen_bt, n_gen, seq: tuple[int, ...]):
  """Rows whose first `n_gen` generated tokens end with `seq`: `[B]` bool."""
  t = gen_bt.shape[1]
  idx = jnp.clip(n_gen - len(seq) + jnp.arange(len(seq)), 0, t - 1)
  tail = jnp.take(gen_bt, idx, axis=1)
  return (n_gen >= len(seq)) & jnp.all(tail == jnp.asarray(seq)[None, :], axis=1)


def prefill(model, tokens_bp, mask_bp, max_len: int, repeats: int = 1):
  """(last-position logits `[B*repeats, V]`, cache) after one forward over the left-padded
  prompts. Rows that continue the same prompt (samples, beams) share it: each prompt is run
  once and its cache row repeated, prompt-major. The output head runs on the last position
  alone."""
  b = tokens_bp.shape[0]
  cache = KVCache.init(model.cfg, b, max_len)
  h_bpd, cache = model.hidden_states(tokens_bp, attn_mask=mask_bp, cache=cache)
  logits_bv = model.logits(h_bpd[:, -1:])[:, 0]
  if repeats == 1:
    return logits_bv, cache
  return jnp.repeat(logits_bv, repeats, axis=0), cache.take_rows(jnp.repeat(jnp.arange(b), repeats))


class _LoopState(NamedTuple):
  """The decoding loop's carry, one field per piece (read by name, not position)."""

  step: jax.Array  # tokens generated so far, scalar int32
  last_bv: jax.Array  # logits that choose the next token
  cache: KVCache
  done_b: jax.Array
  finish_b: jax.Array  # index into FINISH_REASONS; "length" until another reason stops the row
  hist_bt: jax.Array  # prompt then generated ids, [B, P + max_new_tokens]
  hvalid_bt: jax.Array  # real (not padding, not after done) positions of hist_bt
  seen_bv: jax.Array | None  # tokens each row has seen, for the repetition penalty only
  lp_bt: jax.Array
  slp_bt: jax.Array
  plp_bt: jax.Array
  key: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampler", "stop",
                                             "pad_id", "num_samples"))
def _generate(graphdef, state, tokens_bp, mask_bp, eos_ids, params: SamplingParams, key, *,
              max_new_tokens: int, sampler: Sampler, stop: StopRules, pad_id: int,
              num_samples: int = 1):
  model = nnx.merge(graphdef, state)
  p = tokens_bp.shape[1]
  total = p + max_new_tokens
  last_bv, cache = prefill(model, tokens_bp, mask_bp, total, num_samples)
  tokens_bp = jnp.repeat(tokens_bp, num_samples, axis=0)
  mask_bp = jnp.repeat(mask_bp, num_samples, axis=0)
  b = tokens_bp.shape[0]
  history_bt = jnp.full((b, total), pad_id, jnp.int32).at[:, :p].set(tokens_bp)
  hvalid_bt = jnp.zeros((b, total), bool).at[:, :p].set(mask_bp.astype(bool))
  vocab = last_bv.shape[-1]
  seen_bv = None
  if sampler.repetition_penalty != 1.0:
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, p))
    seen_bv = jnp.zeros((b, vocab), bool).at[rows, tokens_bp].max(mask_bp.astype(bool))

  def body(carry: _LoopState) -> _LoopState:
    step, last_bv, done_b, seen = carry.step, carry.last_bv, carry.done_b, carry.seen_bv
    key, sub = jax.random.split(carry.key)
    processed = sampler.process(last_bv, params, seen, carry.hist_bt, carry.hvalid_bt, p + step)
    tok_b = sampler.choose(processed, sub)
    lp_b = token_logprobs(last_bv[:, None], tok_b[:, None])[:, 0]
    slp_b = token_logprobs(processed[:, None], tok_b[:, None])[:, 0]
    if sampler.greedy:
      plp_b = lp_b
    elif sampler.temperature_only:  # `processed` is already logits / T
      plp_b = slp_b
    else:
      plp_b = token_logprobs(last_bv[:, None] / params.temperature[:, None, None],
                             tok_b[:, None])[:, 0]
    tok_b = jnp.where(done_b, pad_id, tok_b)
    hist = carry.hist_bt.at[:, p + step].set(tok_b)
    hvalid = carry.hvalid_bt.at[:, p + step].set(~done_b)
    lp_bt = carry.lp_bt.at[:, step].set(jnp.where(done_b, 0.0, lp_b))
    slp_bt = carry.slp_bt.at[:, step].set(jnp.where(done_b, 0.0, slp_b))
    plp_bt = carry.plp_bt.at[:, step].set(jnp.where(done_b, 0.0, plp_b))
    if seen is not None:
      seen = seen.at[jnp.arange(b), tok_b].max(~done_b)
    gen = jax.lax.dynamic_slice_in_dim(hist, p, max_new_tokens, axis=1)
    n_gen = step + 1
    reason = jnp.zeros((b,), jnp.int32)
    is_eos = jnp.any(tok_b[:, None] == eos_ids[None, :], axis=-1)
    reason = jnp.where(is_eos, 1, reason)
    for seq in stop.stop_sequences:
      reason = jnp.where((reason == 0) & _ends_with(gen, n_gen, seq), 2, reason)
    if stop.repeat_ngram_block:
      repeated = _last_ngram_count(gen, n_gen, stop.repeat_ngram_block) > stop.repeat_threshold
      reason = jnp.where((reason == 0) & repeated, 3, reason)
    newly = ~done_b & (reason > 0)
    finish_b = jnp.where(newly, reason, carry.finish_b)
    logits, cache = model(tok_b[:, None], attn_mask=(~done_b)[:, None], cache=carry.cache)
    return _LoopState(step=step + 1, last_bv=logits[:, -1], cache=cache, done_b=done_b | newly,
                      finish_b=finish_b, hist_bt=hist, hvalid_bt=hvalid, seen_bv=seen, lp_bt=lp_bt,
                      slp_bt=slp_bt, plp_bt=plp_bt, key=key)

  def cond(carry: _LoopState):
    return (carry.step < max_new_tokens) & ~jnp.all(carry.done_b)

  per_step = lambda: jnp.zeros((b, max_new_tokens), jnp.float32)
  init = _LoopState(step=jnp.zeros((), jnp.int32), last_bv=last_bv, cache=cache,
                    done_b=jnp.zeros((b,), bool), finish_b=jnp.zeros((b,), jnp.int32),
                    hist_bt=history_bt, hvalid_bt=hvalid_bt, seen_bv=seen_bv, lp_bt=per_step(),
                    slp_bt=per_step(), plp_bt=per_step(), key=key)
  out = jax.lax.while_loop(cond, body, init)
  return (out.hist_bt[:, p:], out.lp_bt, out.slp_bt, out.plp_bt, out.hvalid_bt[:, p:].sum(axis=1),
          out.finish_b)


def compile_count() -> int:
  """How many programs the decoding loop has compiled in this process."""
  return _generate._cache_size()


def compile_generate(model, n_prompts: int, prompt_len: int, *, max_new_tokens: int,
                     eos_ids: Sequence[int], pad_id: int, mesh: jax.sharding.Mesh,
                     sampler: Sampler = GREEDY, num_samples: int = 1,
                     stop: StopRules = StopRules()):
  """`generate`'s decoding loop compiled ahead of time for `n_prompts` prompts of up to
  `prompt_len` tokens (left-padded as `generate` pads them) on `model`, whose arrays may be
  ShapeDtypeStructs with shardings (`launch.py --compile_only`); prompts and sampling values are
  replicated over `mesh`. Returns jax's `Compiled` (memory_analysis, cost_analysis)."""
  from lm.train.aot import replicated_spec

  width = left_pad([[pad_id] * prompt_len], pad_id, max_new_tokens=max_new_tokens,
                   max_seq_len=model.cfg.max_seq_len)[0].shape[1]
  spec = lambda shape, dtype: replicated_spec(jax.ShapeDtypeStruct(shape, dtype), mesh)
  rows = n_prompts * num_samples
  params = jax.tree.map(lambda x: replicated_spec(x, mesh), sampler.params(rows))
  key = replicated_spec(jax.eval_shape(lambda: jax.random.key(0)), mesh)
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    return _generate.lower(
        graphdef, state, spec((n_prompts, width), jnp.int32), spec((n_prompts, width), jnp.int32),
        spec((max(len(eos_ids), 1),), jnp.int32), params, key, max_new_tokens=max_new_tokens,
        sampler=sampler.structure(), stop=stop, pad_id=pad_id, num_samples=num_samples).compile()


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_ids: Sequence[int], pad_id: int, sampler: Sampler = GREEDY, seed: int = 0,
             num_samples: int = 1, row_params: Mapping[str, Sequence[float]] | None = None,
             stop: StopRules = StopRules()) -> GenerateOutput:
  """Decode token-id prompts in one compiled loop.

  num_samples: samples per prompt; rows come out prompt-major (prompt i's samples at
  i*num_samples ...). row_params: per-row overrides of the Sampler's values, one per output row.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
  prompts = check_decode_inputs(model.cfg, prompts, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                pad_id=pad_id)
  tokens, mask = left_pad(prompts, pad_id, max_new_tokens=max_new_tokens,
                         max_seq_len=model.cfg.max_seq_len)
  sampler = sampler.with_overrides(row_params)
  params = sampler.params(len(prompts) * num_samples, row_params)
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  graphdef, state = nnx.split(model)
  out = _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), eos, params,
                  jax.random.key(seed), max_new_tokens=max_new_tokens,
                  sampler=sampler.structure(), stop=stop, pad_id=pad_id, num_samples=num_samples)
  toks, lp, slp, plp, lengths, finish = (np.asarray(x) for x in out)
  return GenerateOutput(toks, lp, slp, plp, lengths.astype(np.int32), finish)
