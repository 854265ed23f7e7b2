"""One rollout: prompts -> completions with lengths, log-probs and finish reasons, in a typed batch.

The quickstart, the decoding sweep and the alignment evals generate through it, and online RL
will: the policy runs in eval mode (no LoRA dropout while sampling, whatever mode the caller's
model is in), prompts are decoded in batches of one static shape, and the end-of-turn and pad
ids come from the tokenizer by one rule.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from flax import nnx

from decode.engine import GenerateOutput, StopRules, generate
from decode.sampling import GREEDY, Sampler
from lm import hub


@dataclasses.dataclass
class Rollout(GenerateOutput):
  """Completions of `prompts`, prompt-major: prompt i's samples are rows i*n .. i*n + n - 1.

  Beside `GenerateOutput`'s rows (ids, lengths that count the end-of-turn token when one was
  emitted, raw and sampled log-probs, finish reasons):
  prompts: the prompts' ids; prompt_index_b: `[N]` the prompt each row answers.
  """

  prompts: list[list[int]]
  prompt_index_b: np.ndarray

  @property
  def finish(self) -> list[str]:
    """Per row, one of `decode.engine.FINISH_REASONS`."""
    return self.finish_reasons()


def pad_id_of(tokenizer) -> int:
  """The id padding prompts: the tokenizer's pad token, else its EOS (SmolLM2: both 2)."""
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  if pad is None:
    raise ValueError("the tokenizer has neither a pad nor an EOS token; pass pad_id=.")
  return int(pad)


def rollout(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, tokenizer=None,
            eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
            sampler: Sampler = GREEDY, num_samples: int = 1, seed: int = 0,
            stop: StopRules = StopRules(), batch_size: int | None = None) -> Rollout:
  """Decode `num_samples` completions per prompt with `model` in eval mode.

  eos_ids / pad_id default to the tokenizer's (`lm.hub.stop_ids`, `pad_id_of`). Prompts go in
  batches of `batch_size` (all at once by default); with several batches the last is filled with
  repeats of its last prompt, so every batch shares one compiled program. Batch k (starting at
  prompt i) samples with seed `seed + i`.
  """
  if eos_ids is None or pad_id is None:
    if tokenizer is None:
      raise ValueError("pass a tokenizer, or eos_ids and pad_id.")
    eos_ids = hub.stop_ids(tokenizer) if eos_ids is None else eos_ids
    pad_id = pad_id_of(tokenizer) if pad_id is None else pad_id
  prompts = [list(p) for p in prompts]
  graphdef, state = nnx.split(model)
  policy = nnx.merge(graphdef, state)  # shares the arrays; the caller's model keeps its mode
  policy.eval()
  bs = min(batch_size or len(prompts), len(prompts))
  parts, index = [], []
  for i in range(0, len(prompts), bs):
    chunk = prompts[i:i + bs]
    filled = chunk + [chunk[-1]] * (bs - len(chunk)) if len(prompts) > bs else chunk
    out = generate(policy, filled, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                   sampler=sampler, seed=seed + i, num_samples=num_samples, stop=stop)
    keep = len(chunk) * num_samples
    parts.append([x[:keep] for x in (out.tokens_bt, out.lengths_b, out.logprobs_bt,
                                     out.sample_logprobs_bt, out.policy_logprobs_bt, out.finish_b)])
    index.append(np.repeat(np.arange(i, i + len(chunk)), num_samples))
  tokens, lengths, lps, slps, plps, finish = (np.concatenate(x) for x in zip(*parts))
  return Rollout(tokens_bt=tokens, logprobs_bt=lps, sample_logprobs_bt=slps, policy_logprobs_bt=plps,
                 lengths_b=lengths.astype(np.int32), finish_b=finish, prompts=prompts,
                 prompt_index_b=np.concatenate(index))
