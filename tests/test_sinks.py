"""Attention-sink statistics follow their formulas on the model's own attention maps, batches do
not leak into each other, and the streaming variants only change the mask."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm
from lm.pretrain import sink_stats, sinks
from tests_helpers import run_task, scrambled


def _model(**kw):
  return scrambled(lm.Transformer(lm.preset("tiny", **kw), rngs=nnx.Rngs(0)), 0)


def _seqs(n=3, t=10, seed=0):
  return np.random.default_rng(seed).integers(1, 256, (n, t)).astype(np.int32)


def test_head_stats_follow_their_formulas():
  model = _model(attention_sinks=True)
  seqs = _seqs()
  stats = sink_stats.head_stats(model, seqs, local=2, batch_size=2)  # the last batch is padded
  a = np.stack([np.asarray(m) for _, m in sorted(model.attention_maps(jnp.asarray(seqs)).items())
                ]).astype(np.float64)  # [L, n, N, T, T]
  t = seqs.shape[1]
  np.testing.assert_allclose(stats.first, a[..., 1:, 0].mean(axis=(1, 3)), atol=1e-6)
  np.testing.assert_allclose(stats.gu_alpha, a[..., :, 0].mean(axis=(1, 3)), atol=1e-6)
  self_ = np.stack([a[..., i, i] for i in range(1, t)], axis=-1).mean(axis=(1, 3))
  np.testing.assert_allclose(stats.self_, self_, atol=1e-6)
  local = np.stack([a[..., i, max(1, i - 2):i].sum(axis=-1) for i in range(1, t)],
                   axis=-1).mean(axis=(1, 3))
  np.testing.assert_allclose(stats.local, local, atol=1e-6)
  col = (1 - a[..., 1:, :].sum(axis=-1)).mean(axis=(1, 3))
  np.testing.assert_allclose(stats.sink_column, col, atol=1e-6)
  assert (col > 0.01).all()  # the sinks are live
  ent = -(a * np.log(np.maximum(a, 1e-300)))[..., 1:, :].sum(axis=-1).mean(axis=(1, 3))
  np.testing.assert_allclose(stats.entropy, ent, atol=1e-5)
  assert stats.sink_rate(0.0) == 1.0 and stats.sink_rate(1.0) == 0.0
  assert stats.sink_rate(0.3) == pytest.approx((stats.gu_alpha > 0.3).mean())
  np.testing.assert_allclose(stats.argmax.sum(axis=1), 1.0)


def test_argmax_census_names_the_key():
  """Token kinds from their text; the census counts the first token and the query itself apart."""
  text = {1: "a", 2: ",", 3: "\n", 4: "word"}
  kinds = sink_stats.token_kinds(lambda ids: "".join(text[i] for i in ids), np.array([[1, 2, 3, 4]]))
  np.testing.assert_array_equal(kinds, [[4, 1, 2, 4]])
  # a model whose every query attends to the first token: a sliding window of 1 + 1 sink token
  model = _model(sliding_window=1, sink_tokens=1)
  seqs = _seqs(n=2, t=6)
  stats = sink_stats.head_stats(model, seqs)
  # each query t >= 1 sees exactly {0, t}: the argmax is "first" or "self", never another key
  assert np.allclose(stats.argmax[:, 0] + stats.argmax[:, 3], 1.0)
  np.testing.assert_allclose(stats.first + stats.self_, 1.0, atol=1e-6)


def test_streaming_variants_change_only_the_mask():
  model = _model()
  base = model.cfg
  ids = _seqs(n=1, t=300)[0].tolist()
  rows = sinks.streaming_table(model, {"s": ids}, windows=[16, 62], sinks=[1, 4], dense_first=1,
                               context=64, batch_size=2)
  assert model.cfg == base
  by = {(r["variant"], r["window"]): r["s"] for r in rows}
  # contexts of 64 advancing by 2: the last scored token is predicted from slot 62, which window
  # 62 + 1 sink sees whole (dense); without the sink it misses key 0
  assert by[("1 sink + window 62", 62)] == by[("dense", 62)]
  assert by[("window 62", 62)] != by[("dense", 62)]
  assert by[("window 16", 16)] != by[("dense", 16)]
  assert by[("1 sink + window 16", 16)] != by[("window 16", 16)]
  cfg = sinks.variant_config(base, 16, sinks=4, dense_first=1)
  assert cfg.layer_types == ("full", "sliding") and cfg.sink_tokens == 4
  assert sinks.variant_config(base, 16, dense=True).layer_types == ("full", "full")


@pytest.mark.real_weights
def test_sinks_smoke_run_on_smollm2(tmp_path, shared_data, smollm2_gguf):
  work = tmp_path / "sinks"
  run_task("sinks:smoke", work)
  out = work / "sinks/smollm2-135m-instruct"
  for name in ("mass.csv", "sink_rate.json", "first_token_mass.png", "gu_alpha_heads.png",
               "argmax_keys.png", "attention_heatmaps.png"):
    assert (out / name).exists(), name
  result = json.loads((out / "sink_rate.json").read_text())
  assert result["sink_rate"]["0.3"] > 0.3  # SmolLM2 has sinks
  table = {row["variant"]: row["wikitext-2-test"] for row in result["streaming"]}
  assert table["window 32"] > 1.5 * table["dense"]  # window only loses the sink
  assert table["1 sink + window 32"] < table["window 32"]
  assert "Perplexity under attention-access variants" in (work / "report.md").read_text()
  # the rolling cache: 4 sinks keep the stream near dense; window only does not
  dec = {r["cache"]: r["vs dense"] for r in result["streaming_decode"]}
  assert dec["4 sinks + window 32"] < 0.5 * dec["0 sinks + window 32"]
