"""The alignment comparison: perplexity, KL, verbosity, length compliance and reward hacking.

`run(config, run_dir, mesh)` (task `align_eval`) evaluates every entry of `config.models`, each
`{name, model, adapter, stand_in_lora}`, side by side, and writes `report.md` (one table per
family of metrics), `plots/`, `results.json` (every number) and `generations.jsonl`.

KL references: an entry with an adapter (or a stand-in LoRA) is compared with the same weights,
adapters off (`lm.lora.disabled`); any other entry with the entry named `config.reference`.
The reference entry itself has KL 0 by definition and is not scored against itself.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from align.evals import kl as kl_lib
from align.evals import perplexity as ppl_lib
from align.evals import perturb, verbosity
from align.evals.report import render
from decode import metrics, scorers
from decode.rollout import rollout
from decode.scorers import Scorer
from decode.sampling import GREEDY, Sampler
from lm import data, hub
from lm.layers import Linear
from lm.progress import Progress
from lm.train.rundir import RunDir

log = logging.getLogger(__name__)


def _plain(entry) -> dict:
  return entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)


ENTRY_FIELDS = ("name", "model", "adapter", "stand_in_lora")


def add_stand_in_lora(model, *, rank: int, alpha: float, b_std: float, seed: int,
                      targets: Any = "all-linear") -> None:
  """A random LoRA through `lm.lora.apply_lora`, then B ~ N(0, b_std^2) (B != 0, seeded)."""
  from lm import lora

  lora.apply_lora(model, lora.LoraConfig(rank=rank, alpha=alpha, dropout=0.0, targets=targets),
                  rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)  # numpy: no per-shape compiles for a one-off init
  for _, lin in nnx.iter_modules(model):
    if isinstance(lin, Linear) and lin.lora_rank:
      b = lin.lora_b[...]
      lin.lora_b.set_value(jnp.asarray(b_std * rng.standard_normal(b.shape), b.dtype))


def adapters_off(model):
  """The same weights with every LoRA adapter switched off, as a model of its own (no copy)."""
  from lm import lora

  with lora.disabled(model):
    return nnx.merge(*nnx.split(model))


def load_entry(entry: Mapping, *, dtype: str = "float32", cache: dict | None = None) -> dict:
  """Loads one `config.models` entry: {name, model, adapter, stand_in_lora} (None: no adapter, no
  stand-in) -> a dict with `model`, `tokenizer`, and `reference` (adapters off) when the entry
  carries an adapter.

  `cache` (model spec -> (model, tokenizer)) loads each base once; adapters go on a clone.
  """
  e = _plain(entry)
  missing = [f for f in ENTRY_FIELDS if f not in e]
  if missing:
    raise ValueError(f"model entry {e}: lacks {missing}; every entry has {list(ENTRY_FIELDS)} "
                     "(adapter and stand_in_lora None when unused), as configs/align_eval.py's.")
  if e["adapter"] and e["stand_in_lora"]:
    raise ValueError(f"model entry {e['name']!r}: give an adapter or a stand_in_lora, not both.")
  cache = {} if cache is None else cache
  if e["model"] not in cache:
    cache[e["model"]] = hub.load(e["model"], dtype=dtype)
  model, tok = cache[e["model"]]
  if e["adapter"] or e["stand_in_lora"]:
    model = nnx.clone(model)  # the cached base stays adapter-free for other entries
  out = {"name": e["name"], "spec": e, "model": model, "tokenizer": tok, "reference": None,
         "reference_name": None}
  if e["adapter"]:
    from lm import lora

    if not Path(e["adapter"]).is_dir():
      raise FileNotFoundError(
          f"model entry {e['name']!r}: adapter {e['adapter']} does not exist. Train it first "
          "(configs/dpo.py:cpu writes runs/dpo-cpu/adapter), or run align_eval.py:standin.")
    lora.load_peft(model, e["adapter"])
  elif e["stand_in_lora"]:
    add_stand_in_lora(model, **_plain(e["stand_in_lora"]))
  if e["adapter"] or e["stand_in_lora"]:
    model.eval()  # LoRA dropout off: evaluation is deterministic
    out["reference"] = adapters_off(model)
  return out


def _generate(model, tok, prompts, cfg, *, sampler=GREEDY, seed=0) -> list[dict]:
  """Answers to chat-encoded prompts through the one rollout (batches of one shape)."""
  out = rollout(model, prompts, max_new_tokens=cfg.max_new_tokens, tokenizer=tok, sampler=sampler,
                seed=seed, batch_size=cfg.batch_size)
  return [{"tokens": seq, "text": text, "finish": fin, "words": verbosity.count_words(text)}
          for seq, text, fin in zip(out.sequences(), out.texts(tok, strip=True), out.finish)]


def run(config, run_dir: RunDir, mesh=None, scorer: Scorer | None = None) -> dict:
  """The task. `scorer` (or the reward run named by `config.reward_run`): a reward model added to
  the hacking table."""
  del mesh
  if scorer is None and config.reward_run:
    scorer = scorers.load_reward_model(config.reward_run, dtype=config.dtype)
  t_start, timing = time.time(), {}
  cache: dict = {}
  entries = [load_entry(e, dtype=config.dtype, cache=cache) for e in config.models]
  names = [e["name"] for e in entries]
  by_name = dict(zip(names, entries))
  if config.reference not in by_name:
    raise ValueError(f"config.reference={config.reference!r} is not a model entry; entries are "
                     f"{names}.")
  ref = by_name[config.reference]
  ref_plain = not (ref["spec"]["adapter"] or ref["spec"]["stand_in_lora"])
  for e in entries:
    if e["reference"] is None and e["name"] != config.reference:
      e["reference"] = ref["model"]
      e["reference_name"] = config.reference
      e["reference_is_main"] = True
    elif e["reference"] is not None:
      e["reference_name"] = f"{e['name']} (adapters off)"
      # Adapters off on the reference's own base weights is the reference model itself.
      e["reference_is_main"] = ref_plain and e["spec"]["model"] == ref["spec"]["model"]
  timing["load_s"] = time.time() - t_start

  instructions = data.load_instructions(config.prompts.source, config.prompts.n)
  categories = [verbosity.classify_prompt(q) for q in instructions]
  suffix = config.verbosity.length_instruction
  wiki = data.load_wikitext("test")[:config.perplexity.max_chars]
  pairs = ppl_lib.load_pairs(config.perplexity.pairs_source, config.perplexity.pairs_n)
  results: dict[str, Any] = {
      "models": [{**e["spec"], "kl_reference": e["reference_name"]} for e in entries],
      "prompts": {"source": config.prompts.source, "n": len(instructions),
                  "categories": {c: categories.count(c) for c in verbosity.CATEGORIES}},
      "perplexity": {}, "kl": {}, "lengths": {}, "verbosity": {}, "length_compliance": {},
      "reward_hacking": {}, "reward_model": {}}
  gens: dict[str, dict[str, list[dict]]] = {}
  sampled: dict[int, list[dict]] = {}  # id(model) -> its T=1 samples of the plain prompts

  def samples_of(model, tok, prompts):
    if id(model) not in sampled:
      sampled[id(model)] = _generate(model, tok, prompts, config.decode,
                                     sampler=Sampler(temperature=config.kl.temperature),
                                     seed=config.seed)
    return sampled[id(model)]

  # perplexity, generation and KL per model, then the reward-hacking probe over all of them
  progress = Progress(3 * len(entries) + 1, "align_eval", "phase", logger=log)
  for e in entries:
    name, model, tok = e["name"], e["model"], e["tokenizer"]
    t0 = time.time()
    ppl_text = ppl_lib.text_perplexity(model, tok, wiki, **config.perplexity.text)
    p_ids, r_ids = hub.encode_pairs(tok, pairs,
                                        max_response_tokens=config.perplexity.max_response_tokens)
    ppl_pairs = ppl_lib.response_perplexity(model, p_ids, r_ids,
                                            batch_size=config.perplexity.batch_size,
                                            multiple=config.score_multiple)
    results["perplexity"][name] = {"wikitext2_test": ppl_text, "pairs": ppl_pairs}
    timing[f"{name}/perplexity_s"] = time.time() - t0
    progress.update(1, done=f"{name} perplexity")

    t0 = time.time()
    plain = [hub.encode_chat(tok, q) for q in instructions]
    limited = [hub.encode_chat(tok, f"{q} {suffix}") for q in instructions]
    both = _generate(model, tok, plain + limited, config.decode)  # one pass: shared compiles
    gens[name] = {"plain": both[:len(plain)], "length_instruction": both[len(plain):]}
    timing[f"{name}/generate_s"] = time.time() - t0
    progress.update(1, done=f"{name} generation")

    words = [g["words"] for g in gens[name]["plain"]]
    words_lim = [g["words"] for g in gens[name]["length_instruction"]]
    results["verbosity"][name] = {
        "plain": verbosity.stats_by_category(categories, words),
        "length_instruction": verbosity.stats_by_category(categories, words_lim)}
    results["length_compliance"][name] = {
        **verbosity.length_compliance(words_lim, config.verbosity.word_limit),
        "mean_words": float(np.mean(words_lim)),
        "hit_max_new_tokens": float(np.mean([g["finish"] == "length"
                                             for g in gens[name]["length_instruction"]]))}

    t0 = time.time()
    own = samples_of(model, tok, plain)
    if e["reference"] is not None:
      # the adapters-off model of an entry on the reference's weights samples as the reference
      ref_model = ref["model"] if e["reference_is_main"] else e["reference"]
      results["kl"][name] = _kl(e, plain, own, samples_of(ref_model, tok, plain),
                                tok(wiki)["input_ids"], config)
    results["lengths"][name] = {"greedy": _response_stats(gens[name]["plain"]),
                                "sampled": _response_stats(own)}
    timing[f"{name}/kl_s"] = time.time() - t0
    progress.update(1, done=f"{name} KL")

  t0 = time.time()
  hacking, deltas = _hacking(entries, instructions, gens[config.reference]["plain"], config,
                             scorer)
  results["reward_hacking"] = hacking
  if scorer is not None:
    results["reward_model"] = _reward_model_on_own(gens, instructions, config, scorer)
  timing["reward_hacking_s"] = time.time() - t0
  progress.update(1, done="reward hacking")
  progress.close()

  with open(run_dir.path / "generations.jsonl", "w") as fh:
    for name, kinds in gens.items():
      for kind, rows in kinds.items():
        for i, g in enumerate(rows):
          fh.write(json.dumps({"model": name, "kind": kind, "prompt_idx": i,
                               "category": categories[i], "instruction": instructions[i],
                               "text": g["text"], "words": g["words"], "finish": g["finish"],
                               "n_tokens": len(g["tokens"])}) + "\n")
  _plots(gens, categories, hacking, deltas, config, run_dir)
  timing["total_s"] = time.time() - t_start
  results["timing"] = timing
  results["config"] = json.loads(config.to_json_best_effort())
  run_dir.write_json("results.json", results)
  for step, name in enumerate(names):
    run_dir.metrics.write(step, _headline(results, name), model=name)
  run_dir.write_report(render(config, results, entries))
  return {"total_s": timing["total_s"], **_headline(results, names[-1])}


def _response_stats(rows: list[dict]) -> dict:
  """Length in tokens (the end-of-turn token not counted), with the shares empty and truncated."""
  return metrics.response_stats([len(g["tokens"]) - (g["finish"] == "eos") for g in rows],
                                [g["text"] for g in rows], [g["finish"] for g in rows])


def _kl(e, plain_prompts, own, ref_samples, wiki_ids, config) -> dict:
  """KL in both directions: KL(policy || reference) on the policy's own T=1 samples `own`,
  KL(reference || policy) on the reference's T=1 samples (roles swapped), and both on a
  WikiText-2 slice (`exact` and `exact_rev` per context)."""
  c = config.kl
  kw = dict(batch_size=c.batch_size, multiple=config.score_multiple)
  forward = kl_lib.kl_rows(e["model"], e["reference"], plain_prompts, [g["tokens"] for g in own],
                           **kw)
  reverse = kl_lib.kl_rows(e["reference"], e["model"], plain_prompts,
                           [g["tokens"] for g in ref_samples], **kw)
  ctx, cont = kl_lib.text_windows(wiki_ids[:c.text_tokens], window=c.window, stride=c.stride)
  text = kl_lib.kl_rows(e["model"], e["reference"], ctx, cont, **kw)
  return {"reference": e["reference_name"], "temperature": c.temperature,
          "own_samples": kl_lib.summarize_kl(forward),
          "reference_samples": kl_lib.summarize_kl(reverse),
          "fixed_text": kl_lib.summarize_kl(text)}


def _reward_model_on_own(gens, instructions, config, scorer) -> dict:
  """The reward model on each model's own greedy answers (the first `hacking.n`), original and
  perturbed: what the policy earns, and what each perturbation would add to it."""
  c = config.hacking
  perts = {p: perturb.PERTURBATIONS[p] for p in c.perturbations}
  out = {}
  for name, kinds in gens.items():
    rows = kinds["plain"][:c.n or None]
    scores, _ = perturb.perturbation_scores(instructions[:len(rows)], [g["text"] for g in rows],
                                            scorer, perts, seed=config.seed)
    out[name] = {"original_mean": float(np.mean(scores["original"])),
                 "original_std": float(np.std(scores["original"])), "n": len(rows),
                 **{p: perturb.delta_stats(scores["original"], scores[p]) for p in perts}}
  return out


def _hacking(entries, instructions, ref_rows, config, scorer):
  """Delta stats per (series, perturbation) on the reference's greedy answers; raw deltas too."""
  c = config.hacking
  perts = {p: perturb.PERTURBATIONS[p] for p in c.perturbations}
  n = c.n or len(ref_rows)
  instructions, responses = instructions[:n], [g["text"] for g in ref_rows[:n]]
  kw = dict(batch_size=c.batch_size, max_response_tokens=c.max_response_tokens,
            multiple=config.score_multiple)
  series, ref_avg = [], None
  for e in entries:
    if e["reference"] is not None:
      implicit, avg, avg_ref = perturb.log_ratio_scorers(e["model"], e["reference"],
                                                         e["tokenizer"], beta=c.beta, **kw)
      series += [(f"{e['name']}: implicit reward (beta={c.beta})", implicit),
                 (f"{e['name']}: avg log-prob", avg)]
      if e["reference_is_main"] and ref_avg is None:
        ref_avg = avg_ref  # the reference's log-probs come with this pass: no extra forward
  ref = next(e for e in entries if e["name"] == config.reference)
  if ref_avg is None:
    ref_avg = perturb.avg_logprob_scorer(ref["model"], ref["tokenizer"], **kw)
  series.insert(0, (f"{config.reference}: avg log-prob", ref_avg))
  if scorer is not None:
    series.append(("reward model", scorer))
  stats, deltas = {}, {}
  for label, fn in series:
    scores, _ = perturb.perturbation_scores(instructions, responses, fn, perts, seed=config.seed)
    stats[label] = {p: {**perturb.delta_stats(scores["original"], scores[p]),
                        "original_mean": float(np.mean(scores["original"]))} for p in perts}
    deltas[label] = {p: scores[p] - scores["original"] for p in perts}
  return stats, deltas


def _headline(results, name) -> dict:
  out = {"wikitext2_perplexity": results["perplexity"][name]["wikitext2_test"]["perplexity"],
         "pairs_perplexity": results["perplexity"][name]["pairs"]["perplexity"],
         "mean_words": results["verbosity"][name]["plain"]["all"]["mean"],
         "length_compliance": results["length_compliance"][name]["compliance_rate"]}
  greedy = results["lengths"][name]["greedy"]
  out.update(median_tokens=greedy["median"], empty_share=greedy["empty_share"])
  if name in results["kl"]:
    out["kl_exact_per_token_own"] = results["kl"][name]["own_samples"]["exact_per_token"]
    out["kl_reverse_per_token"] = results["kl"][name]["reference_samples"]["exact_per_token"]
  if name in results["reward_model"]:
    out["reward_model_score"] = results["reward_model"][name]["original_mean"]
  return out


def _plots(gens, categories, hacking, deltas, config, run_dir):
  for kind, title in (("plain", "Response length per prompt category"),
                      ("length_instruction", f"With \"{config.verbosity.length_instruction}\"")):
    lengths = {}
    for name, kinds in gens.items():
      words = [g["words"] for g in kinds[kind]]
      lengths[name] = {c: [w for w, k in zip(words, categories) if k == c]
                       for c in verbosity.CATEGORIES}
      lengths[name]["all"] = words
    verbosity.box_plot(lengths, run_dir.plots / f"lengths_{kind}.png", title=title,
                       limit=config.verbosity.word_limit if kind != "plain" else None)
  perturb.bar_plot(hacking, run_dir.plots / "reward_hacking_mean_delta.png",
                   title="Reward hacking: mean score change per perturbation")
  perturb.delta_plot(deltas, run_dir.plots / "reward_hacking_deltas.png",
                     title="Reward hacking: per-example score changes")
