"""Attention sinks: where each query's attention goes, per layer and head, and what happens to
perplexity when a sliding window cuts the first tokens off (StreamingLLM), on any decoder.

Per (layer, head), averaged over queries t >= 1 of `n` sequences of `seq_len` tokens
(`head_stats`):
- `first`: attention on the sequence's first token, A[t, 0];
- `gu_alpha`: Gu et al.'s importance of the first token, alpha_1 = (1/T) sum_{t>=0} A[t, 0]
  (their metric counts query 0 too, whose weight on itself is 1);
- `sink_column`: the mass on the learned sink logit (gpt-oss `attention_sinks`), 1 - sum_k A[t, k];
- `self`: A[t, t]; `local`: sum of A[t, k] over the `local` previous keys t-local <= k < t, k > 0;
- `entropy`: -sum_k A[t, k] ln A[t, k] (nats; the sink column excluded).
`sink_rate(eps)` is Gu et al.'s Sink_1^eps: the share of (layer, head) pairs with alpha_1 > eps.
`argmax_histogram`: per layer, the share of (query, head) whose most-attended key is the first
token, punctuation, a newline, the query itself, or another token (llm_exploration's census).

`streaming_table`: sliding-window perplexity of one model under attention-access variants that
change only the mask (same weights, same positions): dense; window W only; k sink tokens + W;
dense in the first N layers and window-only elsewhere (llm_exploration's hybrid). Windows of
`context` tokens advance by `context - W`, so every scored token past the first window has at
least W tokens of context and the variants differ there; this ablates access, not length
extrapolation (positions stay inside the model's context). `streaming_decode` decodes one long
stream through StreamingLLM's rolling sink + window cache (`lm.streaming`), which does go beyond
the context.
"""

from __future__ import annotations

import dataclasses
import logging
import string
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import corpus, scoring
from lm.config import ModelConfig

log = logging.getLogger(__name__)

EPSILONS = (0.1, 0.3, 0.5, 0.8)
ARGMAX_KINDS = ("first", "punctuation", "newline", "self", "other")


@dataclasses.dataclass
class HeadStats:
  """`[layers, heads]` arrays of the module docstring's measures, plus the argmax census."""

  first: np.ndarray
  gu_alpha: np.ndarray
  sink_column: np.ndarray
  self_: np.ndarray
  local: np.ndarray
  entropy: np.ndarray
  argmax: np.ndarray  # [layers, len(ARGMAX_KINDS)] shares
  local_window: int

  def sink_rate(self, eps: float) -> float:
    return float((self.gu_alpha > eps).mean())

  def rows(self) -> list[dict]:
    """One row per (layer, head), for `mass.csv`."""
    n_layers, n_heads = self.first.shape
    return [{"layer": i, "head": h, "first": self.first[i, h], "gu_alpha": self.gu_alpha[i, h],
             "sink_column": self.sink_column[i, h], "self": self.self_[i, h],
             f"local{self.local_window}": self.local[i, h], "entropy": self.entropy[i, h]}
            for i in range(n_layers) for h in range(n_heads)]


@nnx.jit
def _maps(model, tokens_bs):
  """`[L, B, N, S, S]` attention weights of every layer."""
  maps = model.attention_maps(tokens_bs)
  return jnp.stack([maps[i] for i in sorted(maps)])


def token_kinds(tokenizer_decode, tokens_bs: np.ndarray) -> np.ndarray:
  """`[B, S]` codes into ARGMAX_KINDS[1:3] (punctuation 1, newline 2) or other (4)."""
  punct = set(string.punctuation) | {"“", "”", "‘", "’", "—", "–", "…"}
  cache: dict[int, int] = {}
  out = np.full(tokens_bs.shape, 4, np.int32)
  for idx, tok in np.ndenumerate(tokens_bs):
    t = int(tok)
    if t not in cache:
      text = tokenizer_decode([t])
      if "\n" in text:
        cache[t] = 2
      elif text.strip() and all(c in punct for c in text.strip()):
        cache[t] = 1
      else:
        cache[t] = 4
    out[idx] = cache[t]
  return out


def head_stats(model, sequences: np.ndarray, tokenizer_decode=None, *, local: int = 4,
               batch_size: int = 4) -> HeadStats:
  """Attention statistics of `sequences` `[n, T]` (unpadded, all real tokens)."""
  sequences = np.asarray(sequences, np.int32)
  n, t = sequences.shape
  cfg: ModelConfig = model.cfg
  sums = {k: np.zeros((cfg.n_layers, cfg.n_heads)) for k in
          ("first", "gu", "col", "self", "local", "entropy")}
  census = np.zeros((cfg.n_layers, len(ARGMAX_KINDS)))
  kinds = (token_kinds(tokenizer_decode, sequences) if tokenizer_decode is not None
           else np.full(sequences.shape, 4, np.int32))
  q = np.arange(t)
  local_mask = ((q[:, None] - q[None, :]) >= 1) & ((q[:, None] - q[None, :]) <= local) & (
      q[None, :] > 0)
  for start in range(0, n, batch_size):
    chunk = sequences[start:start + batch_size]
    pad = batch_size - len(chunk)
    batch = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)]) if pad else chunk
    a = np.asarray(_maps(model, jnp.asarray(batch)), np.float64)[:, :len(chunk)]  # [L,b,N,T,T]
    rest = a[..., 1:, :]  # queries t >= 1
    sums["first"] += rest[..., 0].mean(axis=-1).sum(axis=1)
    sums["gu"] += a[..., 0].mean(axis=-1).sum(axis=1)
    sums["col"] += (1.0 - rest.sum(axis=-1)).mean(axis=-1).sum(axis=1)
    sums["self"] += np.diagonal(a, axis1=-2, axis2=-1)[..., 1:].mean(axis=-1).sum(axis=1)
    sums["local"] += (a * local_mask).sum(axis=-1)[..., 1:].mean(axis=-1).sum(axis=1)
    ent = -(np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)).sum(axis=-1)
    sums["entropy"] += ent[..., 1:].mean(axis=-1).sum(axis=1)
    top = rest.argmax(axis=-1)  # [L, b, N, T-1] key index per query
    k_chunk = kinds[start:start + len(chunk)]
    kind = np.take_along_axis(np.broadcast_to(k_chunk[None, :, None, :], top.shape[:3] + (t,)),
                              top, axis=-1)
    kind = np.where(top == 0, 0, np.where(top == q[None, None, None, 1:], 3, kind))
    for code in range(len(ARGMAX_KINDS)):
      census[:, code] += (kind == code).sum(axis=(1, 2, 3))
  census /= census.sum(axis=1, keepdims=True)
  return HeadStats(first=sums["first"] / n, gu_alpha=sums["gu"] / n, sink_column=sums["col"] / n,
                   self_=sums["self"] / n, local=sums["local"] / n, entropy=sums["entropy"] / n,
                   argmax=census, local_window=local)


def example_map(model, tokens: Sequence[int], layers: Sequence[int]) -> np.ndarray:
  """`[len(layers), heads, T, T]` attention weights of one sequence, for heatmaps."""
  maps = model.attention_maps(jnp.asarray([list(tokens)], jnp.int32), layers=layers)
  return np.stack([np.asarray(maps[i][0]) for i in layers])


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
    out += [("dense", w, {"dense": True}), (f"window {w}", w, {})]
    out += [(f"{k} sink{'s' if k > 1 else ''} + window {w}", w, {"sinks": k}) for k in sinks]
    if dense_first:
      out.append((f"dense first {dense_first} layers + window {w}", w,
                  {"dense_first": dense_first}))
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
      row = {"variant": name, "window": w, "sinks": kw.get("sinks", 0)}
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
  """(model, tokenizer, label, prefix): a pretraining run directory (its last checkpoint; prefix
  = its sink token when it was trained with one), or any name `lm.hub.load` resolves (hub id, HF
  directory, .gguf, offline alias)."""
  from pathlib import Path

  from lm import hub, pretrain

  if (Path(spec) / "corpus_manifest.json").exists():
    model, tok, prefix = pretrain.load_run(spec)
    return model, tok, Path(spec).name, prefix
  model, tok = hub.load(spec)
  return model, tok, Path(spec).name.lower(), []


def _plots(stats: HeadStats, example: np.ndarray, example_layers, label: str, out_dir) -> list[str]:
  from lm.run import pyplot, save_figure

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
  (`lm.streaming`) for each sink count, next to the dense model (sliding windows of the model's
  context, at most the stream, advancing by half of it) and to dense windows of the cache's size
  recomputed every quarter of it (StreamingLLM's "sliding window with re-computation")."""
  from lm import streaming

  if not d.get("n_tokens"):
    return []
  ids = corpus.encode_text(tokenizer, _stream_text(d.stream))[:int(d.n_tokens)]
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

  from lm.run import markdown_table

  a, s = config.analysis, config.streaming
  summary, report = {}, ["# Attention sinks\n",
                         f"Head statistics: {a.n_sequences} sequences of {a.seq_len} tokens from "
                         f"{a.source} (first tokens of consecutive chunks, no BOS added); local "
                         f"window {a.local}. Sink rate = share of (layer, head) with Gu alpha_1 > "
                         "eps.\n"]
  for spec in config.models:
    model, tok, label, prefix = load_model(spec)
    out = run_dir.path / "sinks" / label
    out.mkdir(parents=True, exist_ok=True)
    ids = corpus.encode_text(tok, _stream_text(a.source)[:400_000])
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
    context = min(int(s.context), model.cfg.max_seq_len)
    windows = [w for w in s.windows if w < context]
    streams = {name: corpus.encode_text(tok, _stream_text(name))[:int(s.n_tokens)]
               for name in s.streams}
    table = streaming_table(model, streams, windows=windows, sinks=list(s.sinks),
                            dense_first=int(s.dense_first), context=context,
                            batch_size=int(s.batch_size), prefix=prefix) if windows else []
    decode_rows = streaming_decode(model, tok, config.stream_decode, prefix)
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
  from lm.run import pyplot, save_figure

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
