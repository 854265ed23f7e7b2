"""Pretraining: parameter count and loss at initialisation of `modern-253m`, the FLOP formula,
packed documents = each document alone, sink + window masks, and SIGKILL + resume = uninterrupted."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm
from configs import pretrain as pretrain_config
from lm import hub
from lm.hub import runs, vocab
from lm.pretrain import corpus
from lm.pretrain import task as pretrain
from lm.train import flops
from lm.train.checkpoint import Checkpointer
from tests_helpers import killed_at_step, run_task, scrambled

LOSS = pretrain_config.get_config("smoke").loss  # per-document attention, no z-loss


def test_modern_253m_parameter_count():
  cfg = lm.preset("modern-253m")
  assert cfg.n_params == 252_815_360
  abstract = nnx.eval_shape(lambda: lm.Transformer(cfg, rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 252_815_360
  # the matmul parameters (no norm scales) behind 6N
  assert flops.matmul_params(cfg) == 252_815_360 - (2 * 12 + 1) * 1024


@pytest.mark.usefixtures("xla_default_level")
def test_modern_253m_loss_at_init_is_predicted():
  """ln V + s^2 d / 2 = 11.030 for V 50257, d 1024, s 0.02; measured on random tokens."""
  cfg = lm.preset("modern-253m")
  predicted = pretrain.init_loss_prediction(cfg)
  assert abs(predicted - (math.log(50257) + 0.0004 * 1024 / 2)) < 1e-12
  model = lm.Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  b, s = 4, 256
  tokens = rng.integers(0, cfg.vocab_size, (b, s + 1)).astype(np.int32)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": np.ones((b, s), np.int32), "global_keys": np.zeros((b, s), np.int32),
           "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
           "loss_mask": np.ones((b, s), np.int32)}
  loss, _ = nnx.jit(lambda m, b: pretrain.lm_loss(m, b, LOSS))(model, batch)
  assert abs(float(loss) - predicted) < 0.05, (float(loss), predicted)


def test_flops_reproduce_nanogpt_estimate_mfu_on_gpt2_124m():
  """nanoGPT's estimate_mfu for GPT-2 124M (N = 123,653,376 without position embeddings, L 12,
  H 12, Q 64, T 1024): 6N + 12LHQT = 855,166,464 FLOPs/token, and at 12 x 1024 tokens per
  iteration in 1 s on an A100 (312 TFLOP/s) an MFU of 3.368%."""
  fpt = flops.nanogpt_flops_per_token(123_653_376, 12, 12, 64, 1024)
  assert fpt == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024 == 855_166_464
  mfu = fpt * 1024 * 12 / 1.0 / 312e12
  assert abs(mfu - 0.0336804) < 1e-7
  # the config-based count in nanoGPT's convention: 6 * every parameter + 12LHQT
  cfg = lm.preset("modern-253m")
  assert flops.flops_per_token(cfg, 1024, "nanogpt").total == (
      6 * 252_815_360 + 12 * 12 * 16 * 64 * 1024)


@pytest.mark.parametrize("window", [None, 1, 5, 16, 40])
def test_causal_keys_per_query_counts_the_mask(window):
  """The "causal" convention's mean keys per query = the mean row sum of the model's mask."""
  t = 16
  i = np.arange(t)
  mask = i[None, :] <= i[:, None]
  if window is not None:
    mask &= (i[:, None] - i[None, :]) < window
  assert flops.keys_per_query(t, window, "causal") == pytest.approx(mask.sum() / t)


def _docs_stream(lengths, vocab=64, seed=0):
  rng = np.random.default_rng(seed)
  toks = np.concatenate([rng.integers(1, vocab, n) for n in lengths]).astype(np.int32)
  doc = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
  return toks, doc


def test_windows_mark_documents():
  toks, doc = _docs_stream([3, 4, 10])
  w = corpus.Windows(toks, doc, seq_len=8)
  row = w[0]  # stream 0..8: doc0 = 0..2, doc1 = 3..6, doc2 from 7
  np.testing.assert_array_equal(row["tokens"], toks[:8])
  np.testing.assert_array_equal(row["targets"], toks[1:9])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 2, 3, 0])
  np.testing.assert_array_equal(row["loss_mask"], [1, 1, 0, 1, 1, 1, 0, 1])
  sink = corpus.Windows(toks, doc, seq_len=8, sink_token=63)[0]
  np.testing.assert_array_equal(sink["tokens"], [63, *toks[:7]])
  np.testing.assert_array_equal(sink["positions"], [0, 1, 2, 3, 1, 2, 3, 4])
  np.testing.assert_array_equal(sink["global_keys"], [1, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(sink["loss_mask"], [0, 1, 1, 0, 1, 1, 1, 0])


def test_packed_documents_equal_each_document_alone():
  """One row packing three documents gives the same per-token losses and the same gradient of
  the summed loss as running each document alone (float32)."""
  cfg = lm.preset("tiny").replace(vocab_size=64)
  model = scrambled(lm.Transformer(cfg, rngs=nnx.Rngs(0)), 0)
  lengths = [5, 9, 7]
  toks, doc = _docs_stream(lengths, vocab=64)
  packed = {k: v[None] for k, v in corpus.Windows(toks, doc, seq_len=20)[0].items()}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def nll_sum(p, batch):
    return pretrain.lm_loss(nnx.merge(graphdef, p, rest), batch, LOSS)[1]["nll_sum"]

  grad_fn = jax.jit(jax.value_and_grad(nll_sum))
  value, grads = grad_fn(params, packed)
  total, total_grads = 0.0, jax.tree.map(jnp.zeros_like, params)
  start = 0
  for n in lengths:
    end = min(start + n, 21)
    d = toks[start:end]
    single = {"tokens": d[:-1][None], "targets": d[1:][None],
              "segment_ids": np.ones((1, len(d) - 1), np.int32),
              "global_keys": np.zeros((1, len(d) - 1), np.int32),
              "positions": np.arange(len(d) - 1, dtype=np.int32)[None],
              "loss_mask": np.ones((1, len(d) - 1), np.int32)}
    v, g = grad_fn(params, single)
    total += float(v)
    total_grads = jax.tree.map(jnp.add, total_grads, g)
    start = end
  assert abs(float(value) - total) <= 1e-5 * abs(total)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(total_grads), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _tokens(b=2, s=24, vocab=256, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, s)), jnp.int32)


def test_sink_window_with_a_window_covering_the_sequence_is_dense_bit_for_bit():
  dense_cfg = lm.preset("tiny")
  tokens = _tokens()
  dense = scrambled(lm.Transformer(dense_cfg, rngs=nnx.Rngs(0)), 0)
  for k in (0, 4):
    sw = lm.Transformer(dense_cfg.replace(sliding_window=24, sink_tokens=k), rngs=nnx.Rngs(0))
    nnx.update(sw, nnx.state(dense))
    np.testing.assert_array_equal(np.asarray(sw(tokens)[0]), np.asarray(dense(tokens)[0]))


def test_sink_window_equals_its_mask_written_out():
  """k sinks + window w on every layer = the dense model under the mask
  causal & (|i - j| < w | j < k); with left padding the sinks are each row's first real tokens."""
  cfg = lm.preset("tiny")
  w, k, s = 5, 2, 24
  tokens = _tokens(s=s)
  dense = scrambled(lm.Transformer(cfg, rngs=nnx.Rngs(0)), 0)
  sw = lm.Transformer(cfg.replace(sliding_window=w, sink_tokens=k), rngs=nnx.Rngs(0))
  nnx.update(sw, nnx.state(dense))
  i = np.arange(s)
  mask = ((i[:, None] - i[None, :]) < w) | (i[None, :] < k)
  want = dense(tokens, attn_mask=jnp.asarray(np.broadcast_to(mask, (2, s, s))))[0]
  np.testing.assert_allclose(np.asarray(sw(tokens)[0]), np.asarray(want), atol=1e-6)
  # left padding: row 1 starts 3 slots later; its sinks are its first real tokens
  pad = np.ones((2, s), np.int32)
  pad[1, :3] = 0
  got = np.asarray(sw(tokens * pad, attn_mask=jnp.asarray(pad))[0])
  alone = np.asarray(sw(tokens[1:, 3:])[0])
  np.testing.assert_allclose(got[1, 3:], alone[0], atol=1e-5)


def test_bigram_baseline_by_hand():
  train = np.array([0, 1, 0, 1, 1])
  val = np.array([0, 1, 1])
  out = corpus.bigram_nll(train, val, vocab_size=2, alphas=(1.0,))
  # counts: (0,1) x2, (1,0) x1, (1,1) x1; prev counts 0: 2, 1: 2
  p01, p11 = (2 + 1) / (2 + 2), (1 + 1) / (2 + 2)
  assert out["bigram"]["nll"] == pytest.approx(-(math.log(p01) + math.log(p11)) / 2)
  p1 = (3 + 1) / (5 + 2)
  assert out["unigram"]["nll"] == pytest.approx(-math.log(p1))


def test_store_splits_whole_documents_and_refuses_overlap(tmp_path):
  docs = [corpus.Document("a", f"document number {i} " * 3) for i in range(60)]
  docs.append(corpus.Document("a", docs[0].text))  # an exact duplicate shares its twin's split
  tok = vocab.CharTokenizer.fit("".join(d.text for d in docs) + "$")
  tok.eos_id = tok.encode("$")[0]
  store = corpus.build_store(tmp_path / "s", docs, tok, split="hash", val_fraction=0.2)
  m = store.manifest
  assert m["overlap_documents"] == 0
  assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 61
  assert 0 < m["splits"]["val"]["documents"] < 30
  toks, doc = store.split_stream("val")
  first = store.documents("val")[0]
  assert tok.decode(toks[:first["length"] - 1]) in {d.text for d in docs}
  assert toks[first["length"] - 1] == tok.eos_id
  with pytest.raises(ValueError, match="both train and val"):
    corpus.build_store(tmp_path / "t", [corpus.Document("a", "x", "train"),
                                        corpus.Document("a", "x", "val")], tok)


def test_packed_iterator_resumes_exactly():
  toks, doc = _docs_stream([50, 70, 30, 90])
  ds = corpus.packed_dataset(corpus.Windows(toks, doc, 16), batch_size=3, seed=4)
  it = iter(ds)
  first = [next(it) for _ in range(5)]
  state = json.loads(json.dumps(it.get_state()))
  rest = [next(it) for _ in range(6)]  # crosses an epoch (15 windows = 5 batches)
  resumed = iter(ds)
  resumed.set_state(state)
  for a, b in zip(rest, [next(resumed) for _ in range(6)]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, rest[1:6]))


def test_gpt2_tokenizer_is_openais():
  try:
    tok = vocab.gpt2_tokenizer()
  except FileNotFoundError as e:
    pytest.skip(f"GPT-2 BPE files not installed: {e}")
  assert tok.vocab_size == 50257 and tok.encode("Hello world") == [15496, 995]
  assert tok.encode("<|endoftext|>") != [50256]  # plain text, never the control id
  text = corpus.load_documents(["tinyshakespeare"])[0].text if corpus.lm_data.shared_file(
      "tinyshakespeare/input.txt.gz") else None
  if text is not None:
    ids = tok.encode(text)
    assert len(ids) == 338_025 and tok.decode(ids) == text


def _pretrain(workdir, store, resume=False, **overrides):
  return run_task("pretrain:smoke", workdir, {"corpus.store": str(store), "train.steps": 6,
                                              "train.checkpoint_every": 2, **overrides},
                  resume=resume)


def _final_params(workdir):
  with Checkpointer(Path(workdir) / "checkpoints") as ckpt:
    step = ckpt.latest_step
    path = Path(workdir) / "checkpoints" / str(step) / "model"
  import orbax.checkpoint as ocp

  return step, ocp.StandardCheckpointer().restore(path)


def test_killed_and_resumed_equals_uninterrupted(tmp_path, shared_data):
  """Steps [0, 6) = [0, 3) + killed (checkpoint 2 on disk, step 3 logged) + resume to 6: the same
  loss at every step and the same final parameters, bit for bit (the packed stream's iterator
  state is in the checkpoint; the resume drops the logged step 3 and trains it again)."""
  store = tmp_path / "store"
  _pretrain(tmp_path / "full", store)  # builds the store the others reuse
  with killed_at_step(3, tmp_path / "killed"):
    _pretrain(tmp_path / "killed", store)
  assert (tmp_path / "killed/checkpoints/2").is_dir()
  assert not (tmp_path / "killed/checkpoints/4").exists()
  _pretrain(tmp_path / "killed", store, resume=True)

  def losses(workdir):
    rows = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
      r = json.loads(line)
      rows.setdefault(r["step"], {}).update(
          {k: v for k, v in r.items() if k in ("train/loss", "train/grad_norm", "eval/loss")})
    return rows

  a, b = losses(tmp_path / "full"), losses(tmp_path / "killed")
  assert sorted(a) == sorted(b) == list(range(7))
  assert a == b
  (sa, pa), (sb, pb) = _final_params(tmp_path / "full"), _final_params(tmp_path / "killed")
  assert sa == sb == 6
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_array_equal(x, y)
  # the run loads back with its last checkpoint's weights (what the sinks and pipeline tasks use)
  model, _, _ = runs.load_run(tmp_path / "full")
  loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(pa), strict=True):
    np.testing.assert_array_equal(x, y)
  # and through the one loader (what the sinks task and align.train read): the same weights
  via_hub, tok = hub.load(str(tmp_path / "full"))
  assert isinstance(tok, vocab.CharTokenizer) and list(tok.prefix_ids) == []
  for x, y in zip(jax.tree.leaves(nnx.state(via_hub, nnx.Param)), jax.tree.leaves(loaded),
                  strict=True):
    np.testing.assert_array_equal(x, y)


def test_spike_guard_skips_steps_above_the_running_mean():
  """With spike_factor 0.5 every step after the warm-up counts as a spike: the parameters and
  the optimizer state stop moving and the step reports skipped = 1; before, they move."""
  from lm.train.trainer import Trainer

  toks, doc = _docs_stream([400], vocab=64)
  windows = corpus.Windows(toks, doc, 16)
  it = iter(corpus.packed_dataset(windows, batch_size=4, seed=0))
  cfg = pretrain_config.get_config("smoke").train
  cfg.update(steps=5, batch_size=4, lr=1e-2, seed=0, spike_factor=0.5, spike_warmup=2,
             warmup_steps=0, min_lr_ratio=0.0, grad_clip=0.0, weight_decay=0.0, b2=0.999,
             eval_every=0, checkpoint_every=0)
  trainer = Trainer(lm.Transformer(lm.preset("tiny").replace(vocab_size=64), rngs=nnx.Rngs(0)),
                    pretrain.lm_loss, LOSS, cfg)
  snapshots, skipped = [], []
  for _ in range(4):
    skipped.append(trainer.train_step(next(it))["skipped"])
    snapshots.append(jax.tree.map(np.array, trainer.params))
  assert skipped == [0.0, 0.0, 1.0, 1.0]
  moved = lambda a, b: any(not np.array_equal(x, y) for x, y in
                           zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(snapshots[0], snapshots[1])
  assert not moved(snapshots[1], snapshots[2]) and not moved(snapshots[2], snapshots[3])


def test_sink_variants_train_and_load(tmp_path, shared_data):
  """"zero" keeps the sink logits at 0 while the rest trains; "token" prepends one id past the
  corpus vocabulary, and the run loads back with that prefix."""
  store = tmp_path / "store"
  for sink in ("zero", "token"):
    work = tmp_path / sink
    run_task("pretrain:smoke", work, {"corpus.store": str(store), "model.sink": sink,
                                      "train.steps": 3})
    model, _, prefix = runs.load_run(work)
    stats = json.loads((work / "data_stats.json").read_text())
    assert "eval/sink_rate" in (work / "metrics.jsonl").read_text()
    if sink == "zero":
      assert prefix == [] and model.cfg.attention_sinks
      for block in model.layers:
        np.testing.assert_array_equal(np.asarray(block.attn.sinks[...]), 0.0)
    else:
      assert prefix == [65] and stats["sink_token"] == 65 and model.cfg.vocab_size == 66
      from lm.pretrain import sink_stats, sinks

      _, tok, _, prefix = sinks.load_model(str(work))
      assert prefix == [65] and list(tok.prefix_ids) == [65]
      seqs = np.array([prefix + tok.encode("To be, or not to be")])
      assert sink_stats.head_stats(model, seqs, sinks.token_text(tok, prefix)).first.shape == (2, 2)
