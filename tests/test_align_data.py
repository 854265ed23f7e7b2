"""align.data: normalisation of every source format, tokenisation masks, truncation, packing,
checkpointable grain iterators. Hand-written fixtures in tests/fixtures/align/."""

import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from align import data as D
from align import encoding
from align import records as rec
from configs import train_base
from lm.data import batching

FIX = Path(__file__).resolve().parent / "fixtures" / "align"
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
  return smollm2_tokenizer


def _user(text):
  return {"role": "user", "content": text}


def _assistant(text):
  return {"role": "assistant", "content": text}


def test_hh_rlhf_split_at_last_assistant_turn():
  rows = rec.load_records(str(FIX / "hh_rlhf.jsonl"))
  assert rec.normalize_preference(rows[0], 0) == {
      "prompt": [_user("What is 2+2?"), _assistant("4."), _user("And times 3?")],
      "chosen": "12, since 4 x 3 = 12.", "rejected": "7"}
  # two Assistant turns in a row become one message, so roles still alternate
  assert rec.normalize_preference(rows[1], 1, "hh_rlhf")["prompt"] == [
      _user("Tell me a joke."), _assistant("Why?\n\nFine, here is one."), _user("Go on.")]
  with pytest.raises(rec.MalformedRowError, match=r"row 2: field 'chosen/rejected'"):
    rec.normalize_preference(rows[2], 2)


def test_orca_ultrafeedback_triple_formats():
  orca = rec.load_records(str(FIX / "orca_dpo_pairs.jsonl"))
  assert rec.normalize_preference(orca[0], 0) == {
      "prompt": [{"role": "system", "content": "You are a careful assistant."},
                 _user("Name a prime number.")], "chosen": "2 is prime.", "rejected": "4"}
  assert rec.normalize_preference(orca[1], 1) == {
      "prompt": [_user("Capital of France?")], "chosen": "Paris", "rejected": "Lyon"}
  (uf,) = rec.load_records(str(FIX / "ultrafeedback.jsonl"))
  assert rec.normalize_preference(uf, 0) == {
      "prompt": [_user("Say hi"), _assistant("Hi!"), _user("Louder")],
      "chosen": "HI!", "rejected": "hi"}
  bad = copy.deepcopy(uf)
  bad["rejected"][0]["content"] = "Say bye"
  with pytest.raises(rec.MalformedRowError, match="row 5: field 'chosen/rejected'"):
    rec.normalize_preference(bad, 5)
  (triple,) = rec.load_records(str(FIX / "triples.jsonl"))
  assert rec.normalize_preference(triple, 0, "triple") == {
      "prompt": [_user("Is the sky blue?")], "chosen": "Yes, on a clear day.", "rejected": "No."}


def test_sft_formats():
  alpaca = rec.load_records(str(FIX / "alpaca.json"))
  assert [rec.normalize_sft(r, i) for i, r in enumerate(alpaca)] == [
      {"prompt": [_user("Add the numbers.\n\n2 and 3")], "response": "5"},
      {"prompt": [_user("Say something kind.")], "response": "You are doing well."}]
  chat = rec.load_records(str(FIX / "sft_chat.jsonl"))
  assert [rec.normalize_sft(r, i) for i, r in enumerate(chat)] == [
      {"prompt": [{"role": "system", "content": "Be brief."}, _user("Hi")], "response": "Hello."},
      {"prompt": [_user("Count to three.")], "response": "1, 2, 3"},
      {"prompt": [_user("Name a colour.")], "response": "Blue"}]
  hh = rec.load_records(str(FIX / "hh_rlhf.jsonl"))
  assert rec.normalize_sft(hh[0], 0) == {
      "prompt": [_user("What is 2+2?"), _assistant("4."), _user("And times 3?")],
      "response": "12, since 4 x 3 = 12."}


@pytest.mark.parametrize("row, kind, field", [
    ({"question": "q", "chosen": "a"}, "preference", "chosen/rejected"),
    ({"question": "q", "chosen": "  ", "rejected": "b"}, "preference", "chosen"),
    ({"question": 3, "chosen": "a", "rejected": "b"}, "preference", "question"),
    ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "preference",
     "chosen"),
    ({"instruction": "do", "input": "", "output": ""}, "sft", "output"),
    ({"messages": [_user("hi")]}, "sft", "messages"),
    ({"text": "no schema"}, "sft", "<row>"),
    ("not an object", "preference", "<row>"),
])
def test_malformed_rows_name_index_and_field(row, kind, field):
  rows = [{"prompt": "ok", "chosen": "a", "rejected": "b", "response": "c"}] * 3 + [row]
  with pytest.raises(rec.MalformedRowError) as err:
    rec.normalize_rows(rows, kind=kind)
  assert (err.value.index, err.value.field) == (3, field)
  assert f"row 3: field '{field}'" in str(err.value)
  records, stats = rec.normalize_rows(rows, kind=kind, on_error="skip")
  assert len(records) == 3
  assert (stats["n_malformed"], stats["malformed_indices"]) == (1, [3])


def test_real_hh_rlhf_all_rows_normalise_or_are_counted(shared_data):
  rows = rec.load_records("hh-rlhf")
  records, stats = rec.normalize_rows(rows, kind="preference", on_error="skip")
  assert len(rows) == 2312 and len(records) + stats["n_malformed"] == 2312
  # 4 empty chosen replies, 5 pairs whose dialogues differ before the last Assistant turn
  assert stats["malformed_indices"] == [86, 516, 925, 1103, 1254, 1688, 1950, 1952, 2036]
  assert stats["malformed_problems"] == {
      "chosen: empty final Assistant reply": 4,
      "chosen/rejected: dialogues differ before the last Assistant turn": 5}
  for r in records:
    roles = [m["role"] for m in r["prompt"]]
    assert roles[-1] == "user" and all(a != b for a, b in zip(roles, roles[1:]))


def test_load_records_files_and_offline_fallback(tmp_path, monkeypatch, shared_data):
  path = tmp_path / "pairs.jsonl.gz"
  with gzip.open(path, "wt") as fh:
    fh.write("\n".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"})
                       for i in range(5)))
  assert [r["prompt"] for r in rec.load_records(str(path), n=2)] == ["p0", "p1"]
  monkeypatch.setattr(rec, "_hub_worth_trying", lambda: False)
  assert len(rec.load_records("Anthropic/hh-rlhf", split="test")) == 2312
  with pytest.raises(rec.DatasetUnavailableError, match="Intel/orca_dpo_pairs"):
    rec.load_records("Intel/orca_dpo_pairs")
  with pytest.raises(FileNotFoundError):
    rec.load_records(str(tmp_path / "missing.jsonl"))


@pytest.mark.real_weights
def test_sft_loss_mask_is_exactly_the_response(tok):
  record = {"prompt": [_user("What is 2+2?"), _assistant("4."), _user("And times 3?")],
            "response": "12."}
  (ex,), stats = encoding.encode_sft([record], tok, max_length=256)
  tokens, loss = ex["tokens"], ex["loss_mask"]
  prompt_text = tok.apply_chat_template(record["prompt"], tokenize=False,
                                        add_generation_prompt=True)
  assert tok.decode(tokens[loss == 1]) == "12." + IM_END
  assert tok.decode(tokens[loss == 0]) == prompt_text
  assert loss[0] == 0 and np.all(np.diff(loss) >= 0)  # prompt zeros, then response ones
  full = tok.apply_chat_template(record["prompt"] + [_assistant("12.")], tokenize=False)
  assert tokens.tolist() == tok(full.rstrip(), add_special_tokens=False)["input_ids"]
  assert stats["n_prompt_truncated"] == stats["n_response_truncated"] == 0


@pytest.mark.real_weights
def test_preference_pair_shares_prompt(tok):
  record = {"prompt": [_user("Capital of France?")], "chosen": "Paris.",
            "rejected": "Lyon, I think."}
  (ex,), _ = encoding.encode_preference([record], tok, max_length=128)
  tokens, attn, loss = ex["tokens"], ex["attn_mask"], ex["loss_mask"]
  assert tokens.shape == attn.shape == loss.shape and tokens.shape[0] == 2
  n_prompt = int(np.argmax(loss[0] == 1))
  assert n_prompt == int(np.argmax(loss[1] == 1))
  np.testing.assert_array_equal(tokens[0, :n_prompt], tokens[1, :n_prompt])
  assert tok.decode(tokens[0][loss[0] == 1]) == "Paris." + IM_END
  assert tok.decode(tokens[1][loss[1] == 1]) == "Lyon, I think." + IM_END
  assert np.all(loss <= attn) and attn[1].sum() == attn.shape[1]  # rejected is the longer one


@pytest.mark.real_weights
def test_truncation_keeps_response_end_of_prompt_and_drop_counts(tok):
  record = {"prompt": [_user("word " * 40)], "response": "The answer is short."}
  (full,), _ = encoding.encode_sft([record], tok, max_length=512)
  n_resp = int(full["loss_mask"].sum())
  n_prompt = len(full["tokens"]) - n_resp
  (cut,), stats = encoding.encode_sft([record], tok, max_length=n_resp + 5)
  np.testing.assert_array_equal(cut["tokens"], full["tokens"][n_prompt - 5:])
  assert cut["loss_mask"].sum() == n_resp and stats["n_prompt_truncated"] == 1
  (capped,), _ = encoding.encode_sft([record], tok, max_length=512, max_prompt_length=7)
  np.testing.assert_array_equal(capped["tokens"], full["tokens"][n_prompt - 7:])
  # the response alone is too long: one prompt token stays, the response's end goes
  (short,), stats = encoding.encode_sft([record], tok, max_length=4)
  np.testing.assert_array_equal(short["tokens"], full["tokens"][n_prompt - 1:n_prompt + 3])
  assert short["loss_mask"].tolist() == [0, 1, 1, 1] and stats["n_response_truncated"] == 1
  small = {"prompt": [_user("hi")], "response": "yo"}
  (kept,), _ = encoding.encode_sft([small], tok, max_length=512)
  examples, stats = encoding.encode_sft([record, small] * 2, tok, max_length=len(kept["tokens"]),
                                 truncation="drop")
  assert len(examples) == 2 and len(full["tokens"]) > len(kept["tokens"])
  assert (stats["n_dropped_too_long"], stats["dropped_indices"]) == (2, [0, 2])


@pytest.mark.real_weights
def test_no_chat_template_plain_format(tok):
  plain = copy.deepcopy(tok)
  plain.chat_template = None
  record = {"prompt": [{"role": "system", "content": "Be kind."}, _user("Hi")], "response": "Hello"}
  (ex,), _ = encoding.encode_sft([record], plain, max_length=64)
  prompt_text = plain.decode(ex["tokens"][ex["loss_mask"] == 0])
  assert prompt_text == "System: Be kind.\nUser: Hi\nAssistant: "
  assert plain.decode(ex["tokens"][ex["loss_mask"] == 1]) == "Hello" + plain.eos_token


def test_sequence_length_and_padding():
  examples = [{"tokens": np.ones(n, np.int32), "attn_mask": np.ones(n, np.int32),
               "loss_mask": np.ones(n, np.float32)} for n in (5, 70)]
  assert batching.sequence_length(examples, 512) == 512
  assert batching.sequence_length(examples, 512, multiple=64) == 128
  assert batching.sequence_length(examples, 100, multiple=64) == 100
  padded = batching.pad_examples(examples, 128)
  assert padded[0]["tokens"].shape == (128,) and padded[0]["attn_mask"].sum() == 5
  assert padded[0]["tokens"].dtype == np.int32 and padded[0]["loss_mask"].dtype == np.float32


def _toy_examples(lengths, seq_len, n_prompt=3):
  """Example i: tokens 100*i + [1..L], prompt = its first n_prompt tokens, padded to seq_len."""
  out = []
  for i, n in enumerate(lengths):
    loss = np.array([0.0] * n_prompt + [1.0] * (n - n_prompt), np.float32)
    out.append({"tokens": (100 * i + np.arange(1, n + 1)).astype(np.int32),
                "attn_mask": np.ones(n, np.int32), "loss_mask": loss})
  return batching.pad_examples(out, seq_len)


def test_packing_segments_positions_and_loss():
  examples = _toy_examples([10, 8, 5, 7], seq_len=16)
  ds = batching.make_dataset(examples, batch_size=2, seed=0, shuffle=False, num_epochs=1, pack=True,
                      num_packing_bins=2)
  (batch,) = list(ds)
  # first fit over 2 bins of 16: 10 -> bin 0, 8 -> bin 1, 5 -> bin 0, 7 -> bin 1
  assert batch["segment_ids"].tolist() == [[1] * 10 + [2] * 5 + [0], [1] * 8 + [2] * 7 + [0]]
  assert batch["positions"].tolist() == [list(range(10)) + list(range(5)) + [0],
                                         list(range(8)) + list(range(7)) + [0]]
  np.testing.assert_array_equal(batch["attn_mask"], batch["segment_ids"] > 0)
  by_first_token = {int(ex["tokens"][0]): ex for ex in examples}
  for row in range(2):
    for seg in (1, 2):
      sel = batch["segment_ids"][row] == seg
      ex = by_first_token[int(batch["tokens"][row][sel][0])]
      n = int(ex["attn_mask"].sum())
      np.testing.assert_array_equal(batch["tokens"][row][sel], ex["tokens"][:n])
      np.testing.assert_array_equal(batch["loss_mask"][row][sel], ex["loss_mask"][:n])
      assert batch["loss_mask"][row][sel][0] == 0


def _take(it, k):
  return [next(it) for _ in range(k)]


@pytest.mark.parametrize("pack", [False, True])
def test_iterator_state_round_trips_through_json(pack):
  examples = _toy_examples([4, 9, 6, 12, 5, 7, 3, 8, 10, 6], seq_len=16)
  make = lambda: batching.make_dataset(examples, batch_size=3, seed=7, pack=pack)  # noqa: E731
  it = iter(make())
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)  # crosses the epoch boundary
  resumed = iter(make())
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 5)):
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


def test_order_is_deterministic_by_seed():
  examples = _toy_examples(range(4, 12), seq_len=16)

  def first_tokens(seed, k=4):
    it = iter(batching.make_dataset(examples, batch_size=4, seed=seed))
    return np.concatenate([b["tokens"][:, 0] for b in _take(it, k)]).tolist()

  a = first_tokens(1)
  assert a == first_tokens(1) and a != first_tokens(2)
  # each epoch is a permutation of the examples
  assert sorted(a[:8]) == sorted(a[8:]) == [100 * i + 1 for i in range(8)]
  assert a[:8] != a[8:]  # each epoch reshuffled


def test_split_holdout_and_eval_batches():
  records = list(range(20))
  train, held = rec.split_holdout(records, 5, seed=3)
  assert len(held) == 5 and sorted(train + held) == records and train == sorted(train)
  assert (train, held) == rec.split_holdout(records, 5, seed=3)
  assert held != rec.split_holdout(records, 5, seed=4)[1]
  with pytest.raises(ValueError):
    rec.split_holdout(records, 20, seed=0)
  batches = list(batching.eval_batches(_toy_examples([4, 5, 6], seq_len=8), batch_size=2))
  assert [b["tokens"].shape for b in batches] == [(2, 8), (2, 8)]
  assert batches[1]["attn_mask"].any(-1).tolist() == [True, False]


@pytest.mark.real_weights
def test_build_preference_and_packed_sft(tok):
  cfg = train_base.data_config()
  cfg.source, cfg.on_error, cfg.n_eval, cfg.batch_size = str(FIX / "hh_rlhf.jsonl"), "skip", 1, 1
  cfg.max_length, cfg.pad_multiple = 256, 64
  with pytest.raises(rec.MalformedRowError, match="row 2"):
    D.build(_with(cfg, on_error="fail"), tok, "preference")
  train_ds, evals, stats = D.build(cfg, tok, "preference")
  assert stats["normalize"]["malformed_indices"] == [2]
  assert (stats["n_train"], stats["n_eval"]) == (1, 1)
  batch, seq_len = next(iter(train_ds)), stats["seq_len"]
  longest = max(batch["attn_mask"].sum(-1).max(), evals[0]["attn_mask"].sum(-1).max())
  assert seq_len % 64 == 0 and longest <= seq_len < longest + 64
  assert batch["tokens"].shape == (1, 2, seq_len) and batch["tokens"].dtype == np.int32
  assert evals[0]["loss_mask"].shape == (2, seq_len)
  packed_ds, _, stats = D.build(_with(cfg, pack=True, n_eval=0, batch_size=2, max_length=128),
                                tok, "sft")
  batch = next(iter(packed_ds))
  assert batch["segment_ids"].shape == (2, 128) and stats["seq_len"] == 128


def _with(cfg, **overrides):
  out = cfg.copy_and_resolve_references()
  for k, v in overrides.items():
    out[k] = v
  return out
