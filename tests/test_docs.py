"""The front door stays true: the README stays short, every link in it and in docs/ resolves, the
docs index links every page, and each number the README and docs restate from a run or a
benchmark equals what that run's files hold (a number edited by hand, or a rerun not carried into
the text, fails here)."""

import json
import re
from pathlib import Path

import pytest

from tests_helpers import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_short_and_starts_with_the_two_commands():
  text = (REPO / "README.md").read_text()
  assert len(text.splitlines()) <= 250
  assert text.index("make run") < text.index("make test") < 400
  assert "POSTLAB_DATA" in text[:text.index("## Install")]  # where the data is, before install


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_resolves(page):
  missing = []
  for target in _LINK.findall(page.read_text()):
    if re.match(r"^[a-z]+:", target) or target.startswith("#"):
      continue
    path = (page.parent / target.split("#")[0]).resolve()
    if not path.exists():
      missing.append(target)
  assert not missing, f"{page.relative_to(REPO)} links to missing files: {missing}"


def test_the_docs_index_links_every_page():
  index = DOCS / "README.md"
  linked = {(index.parent / t.split("#")[0]).resolve() for t in _LINK.findall(index.read_text())}
  pages = {p.resolve() for p in DOCS.rglob("*.md")} - {index.resolve()}
  assert not pages - linked, sorted(str(p.relative_to(REPO)) for p in pages - linked)


# --- numbers restated from artifacts -------------------------------------------------------------


def _json(path):
  return json.loads((DOCS / path).read_text())


def _report(path) -> dict:
  """A training report's wall time and its `| metric | start | end |` table."""
  text = (DOCS / path).read_text()
  rows = {m[0]: (float(m[1]), float(m[2])) for m in
          re.findall(r"^\| ([\w/]+) \| ([-\d.e+]+) \| ([-\d.e+]+) \|$", text, re.M)}
  return {"wall_s": int(re.search(r"^Wall (\d+) s;", text, re.M)[1]), **rows}


def _eval_series(path, key):
  rows = [json.loads(line) for line in (DOCS / path).read_text().splitlines() if line.strip()]
  return [r[key] for r in rows if key in r]


def _h200_rows():
  rows = [json.loads(line) for line in
          (DOCS / "benchmarks/pretrain_step_h200/bench.jsonl").read_text().splitlines()]
  return [r for r in rows if r["rounds"] == 10 and "ours" in r]  # the script's own rows


def _decode_cases():
  bench = _json("benchmarks/decode.json")
  labels = {"greedy_b1": "greedy, batch 1", "greedy_b8": "greedy, batch 8",
            "beam4_b1": "beam 4, batch 1", "top_p_b8": "top-p 0.9, batch 8",
            "top_p_b32": "top-p 0.9, 8 prompts × 4 samples (batch 32)"}
  return [f"| {labels[k]} | {c['ours_tokens_per_s']:.1f} | {c['hf_tokens_per_s']:.1f} | "
          f"{c['ratio']:.2f} |" for k, c in bench["cases"].items()]


def _verifier_rows():
  methods = _json("verifier_cpu/verifier_eval.json")["methods"]
  return [f"| {m['exact_match']:.3f} | [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] |"
          for m in methods.values()]


def _sink_rates() -> dict:
  return _json("sinks_smollm2_cpu/sinks/smollm2-135m-instruct/sink_rate.json")["sink_rate"]


def _dpo(family: str) -> dict:
  return _json("stability_cpu/results.json")[family]["lora-dpo"]


def _first_last(series):
  return series[0], series[-1]


SFT, DPO, RM = (_report(f"{n}_cpu/report.md") for n in ("sft", "dpo", "reward"))
VERIFIER = _json("verifier_cpu/verifier_eval.json")["methods"]
H200_MFU = max(r["ours"]["mfu"] for r in _h200_rows())

# (page, a function giving the texts that page must contain, computed from the artifacts)
CLAIMS = [
    ("README.md", lambda: [
        "greedy batch 1 {greedy_b1:.2f}, batch 8 {greedy_b8:.2f}, beam 4 {beam4_b1:.2f}".format(
            **_json("benchmarks/decode.json")["ratio"])]),
    ("docs/benchmarks/README.md", _decode_cases),
    ("README.md", lambda: [f"**no**: {H200_MFU:.1%}"]),
    ("docs/benchmarks/README.md", lambda: [f"{H200_MFU:.1%} at best from the script's own rows"]),
    ("README.md", lambda: [f"{VERIFIER['verifier']['exact_match']:.3f} exact match vs majority "
                           f"vote {VERIFIER['majority']['exact_match']:.3f}"]),
    ("docs/algorithms/online_rl.md", _verifier_rows),
    ("README.md", lambda: ["held-out greedy correctness {:.3f} → {:.3f}".format(*_first_last(
        _eval_series("grpo_cpu/metrics.jsonl", "eval/reward/arith_correct")))]),
    ("README.md", lambda: [f"{_sink_rates()['0.3']:.1%} of SmolLM2's heads are sinks at ε 0.3"]),
    ("docs/studies/pretraining_and_sinks.md", lambda: [
        "sink rate of " + " / ".join(f"{100 * v:.1f}" for v in _sink_rates().values()) + "% of"]),
    ("README.md", lambda: [f"KL {_dpo('kl')['own_samples']['exact_per_token']:.4f} nats/token"]),
    ("docs/studies/stability.md", lambda: [
        f"| LoRA-DPO | {_dpo('perplexity')['wikitext2_test']['perplexity']:.2f} | "
        f"{_dpo('kl')['own_samples']['exact_per_token']:.4f} |"]),
    ("README.md", lambda: [f"| {SFT['wall_s']} s | held-out perplexity {SFT['perplexity'][0]:.2f} "
                           f"→ {SFT['perplexity'][1]:.2f}"]),
    ("docs/algorithms/offline.md", lambda: [
        f"held-out response perplexity {SFT['perplexity'][0]:.2f} → {SFT['perplexity'][1]:.2f}",
        f"{SFT['wall_s']} s wall"]),
    ("README.md", lambda: [
        f"| {DPO['wall_s']} s | held-out reward accuracy {DPO['rewards/accuracy'][0]:.2f} → "
        f"{DPO['rewards/accuracy'][1]:.2f}"]),
    ("README.md", lambda: [f"| {RM['wall_s']} s | held-out accuracy {RM['accuracy'][1]:.3f}",
                           f"held-out accuracy {RM['accuracy'][1]:.3f} on 96 training pairs"]),
    ("docs/algorithms/offline.md", lambda: [
        f"held-out reward accuracy {DPO['rewards/accuracy'][0]:.2f} → "
        f"{DPO['rewards/accuracy'][1]:.2f} on 64 pairs, held-out DPO loss {DPO['loss'][0]:.4f} → "
        f"{DPO['loss'][1]:.4f}, margin 0 → {DPO['rewards/margin'][1]:+.3f}; {DPO['wall_s']} s wall",
        f"held-out accuracy {RM['accuracy'][0]:.3f} → {RM['accuracy'][1]:.3f} on 64 pairs "
        f"({RM['wall_s']} s wall), but the BT loss goes {RM['loss'][0]:.3f} → {RM['loss'][1]:.3f}"]),
]


@pytest.mark.parametrize("page,texts", CLAIMS, ids=[f"{p}#{i}" for i, (p, _) in enumerate(CLAIMS)])
def test_restated_numbers_equal_their_artifacts(page, texts):
  text = " ".join((REPO / page).read_text().split())  # a claim may wrap across lines
  for want in texts():
    assert " ".join(want.split()) in text, f"{page} should say {want!r} (from its artifact)"
