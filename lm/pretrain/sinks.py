"""Attention sinks: where each query's attention goes, per layer and head, and what happens to
perplexity when a sliding window cuts the first tokens off (StreamingLLM), on any decoder.

Head statistics (`lm.pretrain.sink_stats`): per layer and head, the attention on the first token,
Gu et al.'s alpha_1 and sink rate, the sink column, self, local, entropy and the argmax census.

`streaming_table`: sliding-window perplexity of one model under attention-access variants that
change only the mask (same weights, same positions): dense; window W only; k sink tokens + W;
dense in the first N layers and window-only elsewhere (llm_exploration's hybrid). Windows of
`context` tokens advance by `context - W`, so every scored token past the first window has at
least W tokens of context and the variants differ there; this ablates access, not length
extrapolation (positions stay inside the model's context). `streaming_decode` decodes one long
stream through StreamingLLM's rolling sink + window cache (`lm.pretrain.streaming`), which does go beyond
the context.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from lm import scoring
from lm.config import ModelConfig
from lm.hub import runs, vocab
from lm.pretrain import corpus
from lm.pretrain.sink_stats import ARGMAX_KINDS, EPSILONS, HeadStats, example_map, head_stats
from lm.progress import Progress

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# StreamingLLM-style perplexity table


def variant_config(cfg: ModelConfig, window: int | None, sinks: int = 0, dense_first: int = 0,
                   dense: bool = False) -> ModelConfig:
  """`cfg` with every layer after the first `dense_first` attending to `window` keys plus the
  first `sinks` positions (`dense`: every layer full)."""
  if dense or window is None:
    return cfg.replace(layer_types=("full",) * cfg.n_layers, sliding_window=None, sink_tokens=0)
  types = ("full",) * dense_first + ("sliding",) * (cfg.n_layers - dense_first)
  return cfg.replace(layer_types=types, sliding_window=window, sink_tokens=sinks)


def variants(windows: Sequence[int], sinks: Sequence[int], dense_first: int
             ) -> list[tuple[str, int | None, dict]]:
  """(name, window, variant_config kwargs) per window: dense (scored on the same tokens), window
  only, each sink count, and the dense-first hybrid."""
  out = []
  for w in windows:
    out += [("dense", w, {"dense": True, "sinks": 0}), (f"window {w}", w, {"sinks": 0})]
    out += [(f"{k} sink{'s' if k > 1 else ''} + window {w}", w, {"sinks": k}) for k in sinks]
    if dense_first:
      out.append((f"dense first {dense_first} layers + window {w}", w,
                  {"dense_first": dense_first, "sinks": 0}))
  return out


def streaming_table(model, streams: dict[str, Sequence[int]], *, windows: Sequence[int],
                    sinks: Sequence[int] = (1, 2, 4, 8), dense_first: int = 2,
                    context: int = 1024, batch_size: int = 4, prefix: Sequence[int] = ()
                    ) -> list[dict]:
  """Rows {variant, window, sinks, <stream>: perplexity, ...}; see the module docstring. The
  model's config is swapped per variant and restored after. `prefix` (a sink token) starts every
  context window and counts among its positions."""
  base = model.cfg
  rows = []
  try:
    for name, w, kw in variants(windows, sinks, dense_first):
      model.cfg = variant_config(base, w, **kw)
      row = {"variant": name, "window": w, "sinks": kw["sinks"]}
      for stream_name, ids in streams.items():
        span = context - len(prefix)
        res = scoring.perplexity(model, ids, window=span, stride=span - w, batch_size=batch_size,
                                 prefix=prefix)
        row[stream_name] = res.perplexity
        row[f"{stream_name}_tokens"] = res.n_tokens
      log.info("%s: %s", name, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
      rows.append(row)
  finally:
    model.cfg = base
  return rows



# ---------------------------------------------------------------------------------------------
# The `sinks` task


def token_text(tokenizer, prefix: Sequence[int] = ()):
  """`ids -> text` for the census; a model's sink token (outside the tokenizer) reads "<sink>"."""
  return lambda ids: "<sink>" if list(ids) == list(prefix[:1]) else tokenizer.decode(ids)


def _stream_text(name: str) -> str:
  from lm import data

  if name.startswith("wikitext-2-"):
    return data.load_wikitext(name.removeprefix("wikitext-2-"))
  if name == "tinyshakespeare":
    text = corpus.load_documents(["tinyshakespeare"])[0].text
    return text[int(len(text) * 0.9):]  # the validation tail of lm.corpus's "tail" split
  raise ValueError(f"sinks stream {name!r} is unknown; use wikitext-2-test, wikitext-2-valid or "
                   "tinyshakespeare.")


def load_model(spec: str):
  """(model, tokenizer, label, prefix) for any spec `lm.hub.load` reads: a pretraining run directory
  (its last checkpoint; prefix = its sink token when it was trained with one), hub id, HF
  directory, .gguf or offline alias."""
  from pathlib import Path

  from lm import hub

  model, tok = hub.load(spec)
  label = Path(spec).name if runs.is_pretrain_run(spec) else Path(spec).name.lower()
  return model, tok, label, list(getattr(tok, "prefix_ids", ()))


def _plots(stats: HeadStats, example: np.ndarray, example_layers, label: str, out_dir) -> list[str]:
  from lm.train.rundir import pyplot, save_figure

  plt = pyplot()
  files = []
  n_layers, n_heads = stats.first.shape
  fig, ax = plt.subplots(figsize=(7, 3.5))
  for h in range(n_heads):
    ax.scatter(np.arange(n_layers), stats.first[:, h], s=8, color="gray", alpha=0.5)
  ax.bar(np.arange(n_layers), stats.first.mean(axis=1), alpha=0.6, label="mean over heads")
  ax.set_xlabel("layer")
  ax.set_ylabel("attention on the first token")
  ax.set_title(f"{label}: attention mass on position 0 (queries t >= 1)")
  ax.legend()
  files.append(save_figure(fig, out_dir / "first_token_mass.png").name)

  fig, ax = plt.subplots(figsize=(6, 4))
  im = ax.imshow(stats.gu_alpha.T, aspect="auto", vmin=0, vmax=1, cmap="viridis")
  ax.set_xlabel("layer")
  ax.set_ylabel("head")
  ax.set_title(f"{label}: Gu alpha_1 per head")
  fig.colorbar(im, ax=ax)
  files.append(save_figure(fig, out_dir / "gu_alpha_heads.png").name)

  fig, ax = plt.subplots(figsize=(7, 3.5))
  bottom = np.zeros(n_layers)
  for code, kind in enumerate(ARGMAX_KINDS):
    ax.bar(np.arange(n_layers), stats.argmax[:, code], bottom=bottom, label=kind)
    bottom += stats.argmax[:, code]
  ax.set_xlabel("layer")
  ax.set_ylabel("share of (query, head)")
  ax.set_title(f"{label}: most-attended key")
  ax.legend(fontsize=7, ncol=5, loc="lower center")
  files.append(save_figure(fig, out_dir / "argmax_keys.png").name)

  fig, axes = plt.subplots(1, len(example_layers), figsize=(3.2 * len(example_layers), 3.3))
  for ax, layer, m in zip(np.atleast_1d(axes), example_layers, example):
    ax.imshow(m.mean(axis=0) ** 0.5, cmap="magma", vmin=0, vmax=1)
    ax.set_title(f"layer {layer} (head mean, sqrt)", fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
  files.append(save_figure(fig, out_dir / "attention_heatmaps.png").name)
  return files


def streaming_decode(model, tokenizer, d, prefix: Sequence[int] = ()) -> list[dict]:
  """Perplexity of one long stream decoded token by token through the rolling cache
  (`lm.pretrain.streaming`) for each sink count, next to the dense model (sliding windows of the model's
  context, at most the stream, advancing by half of it) and to dense windows of the cache's size
  recomputed every quarter of it (StreamingLLM's "sliding window with re-computation")."""
  from lm.pretrain import streaming

  if not d.n_tokens:
    return []
  ids = vocab.encode_text(tokenizer, _stream_text(d.stream))[:int(d.n_tokens)]
  prefix = list(prefix)
  ctx = min(len(ids), model.cfg.max_seq_len - len(prefix))
  dense = scoring.perplexity(model, ids, window=ctx, stride=max(ctx // 2, 1),
                             prefix=prefix).perplexity
  rows = [{"cache": f"dense (context {ctx}, stride {max(ctx // 2, 1)})", "tokens": len(ids),
           "perplexity": dense, "vs dense": 1.0}]
  cache = int(d.window) + max(int(k) for k in d.sinks)
  if cache < ctx:  # StreamingLLM's oracle: recompute over the last `cache` tokens
    stride = max(cache // 4, 1)
    ppl = scoring.perplexity(model, ids, window=cache, stride=stride, prefix=prefix).perplexity
    rows.append({"cache": f"dense recomputed over the last {cache} (stride {stride})",
                 "tokens": len(ids), "perplexity": ppl, "vs dense": ppl / dense})
  for k in d.sinks:
    ppl = streaming.streaming_perplexity(model, prefix + ids, window=int(d.window),
                                         sinks=int(k), skip=len(prefix))
    rows.append({"cache": f"{k} sinks + window {d.window}", "tokens": len(ids),
                 "perplexity": ppl, "vs dense": ppl / dense})
    log.info("streaming %s: %.3f (dense %.3f)", rows[-1]["cache"], ppl, dense)
  return rows


def run(config, run_dir, mesh=None) -> dict:
  import csv

  from lm.train.rundir import markdown_table

  a, s = config.analysis, config.streaming
  summary, report = {}, ["# Attention sinks\n",
                         f"Head statistics: {a.n_sequences} sequences of {a.seq_len} tokens from "
                         f"{a.source} (first tokens of consecutive chunks, no BOS added); local "
                         f"window {a.local}. Sink rate = share of (layer, head) with Gu alpha_1 > "
                         "eps.\n"]
  # per model: head statistics, perplexity under the access variants, streaming decoding
  progress = Progress(3 * len(config.models), "sinks", "phase", logger=log)
  for spec in config.models:
    model, tok, label, prefix = load_model(spec)
    out = run_dir.path / "sinks" / label
    out.mkdir(parents=True, exist_ok=True)
    ids = vocab.encode_text(tok, _stream_text(a.source)[:400_000])
    n = a.seq_len - len(prefix)
    seqs = np.array([prefix + ids[i * n:(i + 1) * n] for i in range(a.n_sequences)])
    if seqs.shape != (a.n_sequences, a.seq_len):
      raise ValueError(f"{a.source} gives fewer than {a.n_sequences} x {a.seq_len} tokens.")
    stats = head_stats(model, seqs, token_text(tok, prefix), local=int(a.local))
    with open(out / "mass.csv", "w", newline="") as fh:
      w = csv.DictWriter(fh, fieldnames=list(stats.rows()[0]))
      w.writeheader()
      w.writerows(stats.rows())
    rates = {str(e): stats.sink_rate(e) for e in EPSILONS}
    n_layers = model.cfg.n_layers
    layers = sorted({0, 1, n_layers // 2, n_layers - 1})
    example = example_map(model, seqs[0], layers)
    plots = _plots(stats, example, layers, label, out)
    progress.update(1, done=f"{label} head statistics")
    context = min(int(s.context), model.cfg.max_seq_len)
    windows = [w for w in s.windows if w < context]
    streams = {name: vocab.encode_text(tok, _stream_text(name))[:int(s.n_tokens)]
               for name in s.streams}
    table = streaming_table(model, streams, windows=windows, sinks=list(s.sinks),
                            dense_first=int(s.dense_first), context=context,
                            batch_size=int(s.batch_size), prefix=prefix) if windows else []
    progress.update(1, done=f"{label} perplexity under access variants")
    decode_rows = streaming_decode(model, tok, config.stream_decode, prefix)
    progress.update(1, done=f"{label} streaming decoding")
    result = {"sink_rate": rates, "first_by_layer": stats.first.mean(axis=1),
              "argmax_by_layer": dict(zip(ARGMAX_KINDS, stats.argmax.T)),
              "mean": {"first": float(stats.first.mean()), "self": float(stats.self_.mean()),
                       "local": float(stats.local.mean()), "entropy": float(stats.entropy.mean()),
                       "sink_column": float(stats.sink_column.mean())},
              "streaming": table, "context": context, "streaming_decode": decode_rows}
    run_dir.write_json(f"sinks/{label}/sink_rate.json", result)
    summary[label] = result
    report += [
        f"## {label}\n",
        f"{n_layers} layers x {model.cfg.n_heads} heads. Sink rate: " +
        ", ".join(f"eps {e}: {r:.1%}" for e, r in rates.items()) + ". Means over heads and "
        f"layers: first token {result['mean']['first']:.3f}, self {result['mean']['self']:.3f}, "
        f"local {result['mean']['local']:.3f}, entropy {result['mean']['entropy']:.2f} nats"
        + (f", sink column {result['mean']['sink_column']:.3f}" if model.cfg.attention_sinks
           else "") + ".\n",
        markdown_table([{"layer": i, "first": stats.first[i].mean(),
                         "gu_alpha": stats.gu_alpha[i].mean(), "self": stats.self_[i].mean(),
                         f"local{a.local}": stats.local[i].mean(),
                         "entropy": stats.entropy[i].mean(),
                         **{f"argmax {k}": stats.argmax[i, c] for c, k in enumerate(ARGMAX_KINDS)}}
                        for i in range(n_layers)]),
        (f"\n### Perplexity under attention-access variants (context {context}, windows "
         f"advance by context - W; {', '.join(f'{k}: {len(v):,} tokens' for k, v in streams.items())})\n\n"
         + markdown_table([{k: v for k, v in r.items() if not k.endswith("_tokens")}
                           for r in table], floatfmt=".2f") if table else ""),
        (f"\n### Rolling sink + window KV cache (StreamingLLM decoding, positions re-indexed in "
         f"the cache) over {config.stream_decode.n_tokens:,} tokens of "
         f"{config.stream_decode.stream}\n\n" + markdown_table(decode_rows, floatfmt=".2f")
         if decode_rows else ""),
        *[f"\n![{p}](sinks/{label}/{p})\n" for p in plots],
    ]
  progress.close()
  curves = _training_curves(config.models)
  if curves:
    report += ["## Sink rate (eps 0.3) over pretraining steps\n",
               f"![sink rate](plots/{_plot_curves(curves, run_dir)})\n"]
    summary["sink_rate_over_steps"] = curves
  run_dir.write_json("summary.json", summary)
  run_dir.write_report("\n".join(report))
  return {}


def _training_curves(specs) -> dict[str, list]:
  """{run name: [(step, sink rate)]} from the `eval/sink_rate` of `pretrain` run directories."""
  import json
  from pathlib import Path

  out = {}
  for spec in specs:
    path = Path(spec) / "metrics.jsonl"
    if not path.exists():
      continue
    pts = [(r["step"], r["eval/sink_rate"]) for r in map(json.loads, path.read_text().splitlines())
           if r.get("eval/sink_rate") is not None]
    if pts:
      out[Path(spec).name] = pts
  return out


def _plot_curves(curves: dict[str, list], run_dir) -> str:
  from lm.train.rundir import pyplot, save_figure

  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, pts in curves.items():
    ax.plot(*zip(*pts), "o-", label=name)
  ax.set_xlabel("training step")
  ax.set_ylabel("sink rate (alpha_1 > 0.3)")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  save_figure(fig, run_dir.plots / "sink_rate_over_steps.png")
  return "sink_rate_over_steps.png"
