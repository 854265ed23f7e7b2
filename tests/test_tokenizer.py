"""The torch-free GGUF tokenizer equals transformers' GGUF tokenizer on real text, chats and specials."""

import gzip
import json

import pytest

from lm import hub

from lm.hub import tokenizer


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
  """Built from the file's metadata here, never read back from the tokenizer cache."""
  from lm.hub import weights

  return tokenizer.from_gguf_metadata(tokenizer.gguf_metadata(weights.open_gguf(smollm2_gguf)))


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
  pytest.importorskip("torch", reason="transformers' GGUF tokenizer imports torch (parity extra)")
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent),
                                                    gguf_file=smollm2_gguf.name)


def _jsonl(path):
  with gzip.open(path, "rt", encoding="utf-8") as fh:
    return [json.loads(line) for line in fh if line.strip()]


def _real_lines(data) -> dict[str, list[str]]:
  """Non-empty lines of WikiText-2, AlpacaEval instructions and whole hh-rlhf dialogues."""
  with gzip.open(data / "wikitext-2/wiki.valid.tokens.gz", "rt", encoding="utf-8") as fh:
    wiki = [line for line in fh.read().split("\n") if line.strip()][:600]
  with gzip.open(data / "alpaca-eval/outputs.json.gz", "rt", encoding="utf-8") as fh:
    alpaca = [r["instruction"] for r in json.load(fh)][:300]
  hh = [r[k] for r in _jsonl(data / "hh-rlhf/helpful-base-test.jsonl.gz")[:150]
        for k in ("chosen", "rejected")]
  return {"wikitext": wiki, "alpaca_eval": alpaca, "hh_rlhf": hh}


@pytest.mark.parity
@pytest.mark.real_weights
def test_ids_and_decodes_equal_transformers_on_real_text(ours, reference, shared_data):
  sources = _real_lines(shared_data)
  n = 0
  for name, lines in sources.items():
    for i, line in enumerate(lines):
      ids = ours(line)["input_ids"]
      assert ids == reference(line)["input_ids"], (name, i, line[:80])
      for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
            ids, skip_special_tokens=skip), (name, i)
      assert ours.decode(ids) == line, (name, i)  # byte-level BPE round-trips exactly
      n += 1
  assert n >= 1000
  assert any(any(ord(c) > 127 for c in line) for line in sources["wikitext"])  # non-ASCII covered


@pytest.mark.parity
@pytest.mark.real_weights
@pytest.mark.parametrize("system", [None, "You are a terse assistant. Réponds en français."])
def test_chat_template_equals_transformers(ours, reference, system):
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": "Name three rivers in 日本."},
      {"role": "assistant", "content": "Shinano, Tone, Ishikari."},
      {"role": "user", "content": "And one in Wales?"}]
  for gen in (False, True):
    text = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert text == reference.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert ours(text)["input_ids"] == reference(text)["input_ids"]
  assert hub.encode_chat(ours, "Hi", system) == hub.encode_chat(reference, "Hi", system)
  prompt = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert ("named SmolLM" in prompt) == (system is None)  # the template's default system turn


@pytest.mark.parity
@pytest.mark.real_weights
def test_special_tokens_equal_transformers(ours, reference):
  for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
               "pad_token_id", "unk_token_id", "all_special_tokens", "all_special_ids"):
    assert getattr(ours, attr) == getattr(reference, attr), attr
  assert len(ours) == len(reference) == 49152
  assert hub.stop_ids(ours) == hub.stop_ids(reference)
  text = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><repo_name>x<|im_end|>"
  ids = ours(text)["input_ids"]
  assert ids == reference(text)["input_ids"]
  assert ours.convert_tokens_to_ids("<|im_end|>") in ids  # specials stay whole, never split
  assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
  assert ours.get_vocab() == reference.get_vocab()


@pytest.mark.subprocess
@pytest.mark.real_weights
@pytest.mark.parametrize("cache", ["off", "kept"])
def test_tokenizer_builds_without_torch(smollm2_gguf, tmp_path, cache):
  """No torch module is imported while the GGUF tokenizer is built (no cache) or read back from
  the tokenizer cache, and used."""
  import os
  import subprocess
  import sys

  code = ("import sys; sys.modules['torch'] = None\n"
          "from lm import hub\n"
          f"tok = hub.load_tokenizer({str(smollm2_gguf)!r})\n"
          "assert hub.encode_chat(tok, 'hi')[-4:] == tok('<|im_start|>assistant\\n')['input_ids']\n"
          "print('ok')")
  env = dict(os.environ, POSTLAB_CACHE="off" if cache == "off" else str(tmp_path))
  for _ in range(1 if cache == "off" else 2):  # kept: the second process reads what the first kept
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=str(tokenizer.__file__).rsplit("/lm/", 1)[0], env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
  assert len(list(tmp_path.glob("tokenizers/*/tokenizer.json"))) == (cache == "kept")


@pytest.mark.real_weights
def test_cached_tokenizer_equals_the_one_built_from_the_file(ours, smollm2_gguf, shared_data,
                                                             tmp_path, monkeypatch):
  """The tokenizer read back from the cache encodes, decodes, templates chats and names its
  specials as the one built from the GGUF; a rewritten file gets a new entry, and
  POSTLAB_CACHE=off keeps nothing."""
  import os
  import shutil

  monkeypatch.setenv("POSTLAB_CACHE", str(tmp_path / "cache"))
  first = tokenizer.from_gguf(smollm2_gguf)  # built, then kept
  entries = list((tmp_path / "cache/tokenizers").iterdir())
  assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
  kept = tokenizer.from_gguf(smollm2_gguf)  # read back
  for tok in (first, kept):
    for lines in _real_lines(shared_data).values():
      for line in lines[:100]:
        ids = ours(line)["input_ids"]
        assert tok(line)["input_ids"] == ids, line[:80]
        assert tok.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == ours.apply_chat_template(
        chat, add_generation_prompt=True)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token",
                 "add_eos_token", "all_special_tokens"):
      assert getattr(tok, name) == getattr(ours, name), name
    assert tok.get_vocab() == ours.get_vocab()
  copy = tmp_path / "copy.gguf"
  shutil.copy(smollm2_gguf, copy)
  tokenizer.from_gguf(copy)
  os.utime(copy, ns=(0, 0))  # the same path rewritten: another entry, never the stale one
  tokenizer.from_gguf(copy)
  assert len(list((tmp_path / "cache/tokenizers").iterdir())) == 3
  monkeypatch.setenv("POSTLAB_CACHE", "off")
  assert tokenizer.from_gguf(copy).get_vocab() == ours.get_vocab()
  assert len(list((tmp_path / "cache/tokenizers").iterdir())) == 3


def test_unsupported_tokenizer_type_names_the_field_and_fix():
  with pytest.raises(tokenizer.TokenizerError, match=r"tokenizer\.ggml\.model='llama'.*tokenizer\.json"):
    tokenizer.from_gguf_metadata({"model": "llama", "tokens": ["<unk>"]})
  with pytest.raises(tokenizer.TokenizerError, match="tokenizer.ggml.merges"):
    tokenizer.from_gguf_metadata({"model": "gpt2", "tokens": ["a"]})
  with pytest.raises(tokenizer.TokenizerError, match=r"merges\[0\]='a c'"):
    tokenizer.from_gguf_metadata({"model": "gpt2", "tokens": ["a", "b", "ab"], "merges": ["a c"]})
  with pytest.raises(tokenizer.TokenizerError, match="eos_token_id=7 is outside"):
    tokenizer.from_gguf_metadata({"model": "gpt2", "tokens": ["a", "b", "ab"], "merges": ["a b"],
                                  "eos_id": 7})


def _write_tokenizer_gguf(path, meta, pre, n_tokens=8000):
  """A tensor-less GGUF holding SmolLM2's first `n_tokens` tokens (and the merges among them)."""
  gguf = pytest.importorskip("gguf")
  tokens = list(meta["tokens"][:n_tokens])
  known = set(tokens)
  merges = [m for m in meta["merges"] if {*m.split(" "), m.replace(" ", "")} <= known]
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_context_length(2048)
  w.add_embedding_length(64)
  w.add_block_count(1)
  w.add_feed_forward_length(128)
  w.add_head_count(4)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types([int(t) for t in meta["token_type"][:n_tokens]])
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_add_bos_token(True)
  w.add_chat_template(meta["chat_template"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parity
@pytest.mark.real_weights
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "some-future-type"])
def test_split_regex_and_bos_follow_the_file_as_transformers_does(tmp_path, smollm2_gguf, pre):
  """Each `tokenizer.ggml.pre` splits text as transformers' GGUF loader splits it; add_bos holds."""
  pytest.importorskip("torch", reason="transformers' GGUF tokenizer imports torch (parity extra)")
  from transformers import AutoTokenizer

  from lm.hub import weights

  path = tmp_path / f"{pre}.gguf"
  _write_tokenizer_gguf(path, tokenizer.gguf_metadata(weights.open_gguf(smollm2_gguf)), pre)
  ours = tokenizer.from_gguf(path)
  ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  for text in ["Hello world 12345678 it's I'LL  \n\n  x", "héllo 日本語 ✓ 3.14159\r\n\tfoo",
               "<|im_start|>user\nhi<|im_end|>", "   leading spaces and 2024-12-02"]:
    assert (ours.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
            == ref.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)), text
    ids = ours(text)["input_ids"]
    assert ids == ref(text)["input_ids"] and ids[0] == 1, text
    assert ours.decode(ids) == ref.decode(ids)
