"""The front door stays true: the README stays short, every link in it and in docs/ resolves, the
docs index links every page, every test a page names exists, and each number the README and docs
restate from a run or a benchmark equals what that run's files hold (a number edited by hand, or a
rerun not carried into the text, fails here)."""

import json
import re

import pytest

from tests_helpers import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_TEST_REF = re.compile(r"tests/([\w/]+\.py)::(\w+)")  # a `[param]` suffix is not captured


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


def test_every_named_test_exists():
  """A page's `tests/<file>.py::<name>` names a file that defines `def <name>`: no dangling test."""
  refs = {(page, f, name) for page in PAGES for f, name in _TEST_REF.findall(page.read_text())}
  assert refs, "no test references found: has the pattern drifted from the pages?"
  missing = []
  for page, f, name in sorted(refs):
    path = REPO / "tests" / f
    if not path.is_file() or not re.search(rf"^\s*def {name}\(", path.read_text(), re.M):
      missing.append(f"{page.relative_to(REPO)}: tests/{f}::{name}")
  assert not missing, f"pages name tests that do not exist: {missing}"


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
def _pretrain_char():
  text = (DOCS / "pretrain_char_cpu/report.md").read_text()
  wall, tps, gflops = re.search(r"^Wall (\d+) s;.*steady ([\d,]+) tokens/s = ([\d.]+) GFLOP/s",
                                text, re.M).groups()
  val = re.search(r"^\| ours \([^)]*\) \| ([\d.]+) \|$", text, re.M)[1]
  return [f"validation **{val} nats/char**", f"in {wall} s on 2 CPU cores ({tps} characters/s, "
          f"{gflops} GFLOP/s"]


def _report_table(path, first_column):
  """The markdown table of a run report whose header starts with `first_column`."""
  text = (DOCS / path).read_text()
  return [re.search(rf"^\| {first_column} \|.*?(?=\n\n|\Z)", text, re.M | re.S)[0]]


def _table_rows(path):
  """Every row of every markdown table in a docs file, as lists of cells."""
  return [[c.strip() for c in line.strip().strip("|").split(" | ")]
          for line in (DOCS / path).read_text().splitlines()
          if line.startswith("| ") and not line.startswith("|---")]


def _align_eval():
  rows = _table_rows("align_eval/report.md")
  summary = next(r for r in rows if r[0] == "lora-dpo" and len(r) == 13)
  own = next(r for r in rows if r[2] == "policy's own samples (T=1.0)")
  words = {}
  for r in rows:
    if r[0] == "all":
      words.setdefault(r[1], r[3])  # the first "all" rows: the plain prompts
  comply = {r[0]: r[2] for r in rows if len(r) == 8 and r[1] == "24" and r[0] != "model"}
  hack = {r[0]: float(r[2]) for r in rows if r[1] == "lora-dpo: implicit reward (beta=0.1)"}
  ref_ppl = next(r[1] for r in rows if r[0] == "reference" and len(r) == 13)
  return [f"KL on the policy's own samples {own[6]} nats/token exact (k3 {own[10]}, k1 {own[8]})",
          f"on the reference's own samples {summary[3]}",
          f"WikiText-2 perplexity {ref_ppl} → {summary[1]}",
          f"mean length {words['reference']} → {words['lora-dpo']} words",
          f"50-word compliance {comply['reference']} → {comply['lora-dpo']}",
          f"(Δ {hack['filler']:+.4g}, {hack['keywords']:+.4g})",
          f"(Δ {hack['reorder']:.4g}, {hack['padding']:.4g})".replace("-", "−")]


def _sae_lm():
  rows = _table_rows("sae_lm_cpu/report.md")
  r2 = [r[2] for r in rows if len(r) == 3 and r[0] == "0"]
  ev = [r[1] for r in rows if len(r) == 2 and r[0].startswith("HuggingFaceTB")][1]
  dead = re.search(r"dead latents \*\*(\d+)\*\*", (DOCS / "sae_lm_cpu/report.md").read_text())[1]
  return [f"global mean {r2[0]} / {r2[1]} (lr 3e-4 / 1e-3), explained variance about the "
          f"per-dimension mean {ev}, {dead} dead latents"]


CLAIMS = [
    ("docs/studies/sae.md", _sae_lm),
    ("README.md", lambda: [f"R² {_sae_lm()[0].split()[2]} on held-out tokens"]),
    ("docs/studies/align_eval.md", _align_eval),
    ("docs/studies/decode_sweep.md", lambda: _report_table("decode_sweep/report.md", "strategy")),
    ("docs/studies/pretraining_and_sinks.md", _pretrain_char),
    ("README.md", lambda: [
        "greedy batch 1 {greedy_b1:.2f}, batch 8 {greedy_b8:.2f}, beam 4 {beam4_b1:.2f}".format(
            **_json("benchmarks/decode.json")["ratio"])]),
    ("docs/benchmarks/README.md", _decode_cases),
    ("README.md", lambda: [f"**no**: {H200_MFU:.1%}"]),
    ("docs/benchmarks/README.md", lambda: [f"{H200_MFU:.1%} at best from the script's own rows"]),
    ("README.md", lambda: [f"{VERIFIER['verifier']['exact_match']:.3f} exact match vs majority "
                           f"vote {VERIFIER['majority']['exact_match']:.3f}"]),
    ("docs/algorithms/verifier.md", _verifier_rows),
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
    ("docs/algorithms/sft.md", lambda: [
        f"held-out response perplexity {SFT['perplexity'][0]:.2f} → {SFT['perplexity'][1]:.2f}",
        f"{SFT['wall_s']} s wall"]),
    ("README.md", lambda: [
        f"| {DPO['wall_s']} s | held-out reward accuracy {DPO['rewards/accuracy'][0]:.2f} → "
        f"{DPO['rewards/accuracy'][1]:.2f}"]),
    ("README.md", lambda: [f"| {RM['wall_s']} s | held-out accuracy {RM['accuracy'][1]:.3f}",
                           f"held-out accuracy {RM['accuracy'][1]:.3f} on 96 training pairs"]),
    ("docs/algorithms/dpo.md", lambda: [
        f"held-out reward accuracy {DPO['rewards/accuracy'][0]:.2f} → "
        f"{DPO['rewards/accuracy'][1]:.2f} on 64 pairs, held-out DPO loss {DPO['loss'][0]:.4f} → "
        f"{DPO['loss'][1]:.4f}, margin 0 → {DPO['rewards/margin'][1]:+.3f}; "
        f"{DPO['wall_s']} s wall"]),
    ("docs/algorithms/reward.md", lambda: [
        f"held-out accuracy {RM['accuracy'][0]:.3f} → {RM['accuracy'][1]:.3f} on 64 pairs "
        f"({RM['wall_s']} s wall), but the BT loss goes {RM['loss'][0]:.3f} → "
        f"{RM['loss'][1]:.3f}"]),
]


@pytest.mark.parametrize("page,texts", CLAIMS, ids=[f"{p}#{i}" for i, (p, _) in enumerate(CLAIMS)])
def test_restated_numbers_equal_their_artifacts(page, texts):
  text = " ".join((REPO / page).read_text().split())  # a claim may wrap across lines
  for want in texts():
    assert " ".join(want.split()) in text, f"{page} should say {want!r} (from its artifact)"


# --- knob tables against the configs they describe -------------------------------------------------

_KNOB_PAGES = {"README": "sft", "sft": "sft", "reward": "reward", "dpo": "dpo", "online": "grpo",
               "grpo": "grpo", "ppo": "ppo", "verifier": "verifier"}
_KNOB_ROW = re.compile(r"^\| (`[\w.]+`(?:, `[\w.]+`)*) \| ([^|]+) \|", re.M)


def _literal(text):
  import ast

  text = text.strip().strip("`")
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word such as sigmoid, or a description: compared as text


@pytest.mark.parametrize("page,config", sorted(_KNOB_PAGES.items()))
def test_knob_tables_name_real_fields_with_their_defaults(page, config):
  """Each `| \\`a.b\\` | default |` row of an algorithm page names fields of the config it describes,
  and where the default cell lists one plain value per field, those are the config's defaults."""
  import importlib

  cfg = importlib.import_module(f"configs.{config}").get_config(None)
  text = (DOCS / "algorithms" / f"{page}.md").read_text()
  sections = re.findall(r"^## [\w ]*[Kk]nobs[^\n]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
  rows = _KNOB_ROW.findall("".join(sections))
  assert rows, f"no knob table on algorithms/{page}.md"
  wrong = []
  for names, defaults in rows:
    names = [n.strip("` ") for n in names.split(",")]
    # one plain value per field; a cell that explains (parentheses) or refers to a field does not
    values = defaults.split(",") if not re.search(r"[(×]|`\w+\.\w", defaults) else []
    for i, name in enumerate(names):
      node = cfg
      for part in name.split("."):
        if part not in node:
          wrong.append(f"{name}: not a field of configs/{config}.py")
          break
        node = node[part]
      else:
        if len(values) == len(names):
          want = _literal(values[i])
          have = node.to_dict() if hasattr(node, "to_dict") else node
          if want != have and str(want) != str(have):
            wrong.append(f"{name}: page says {values[i].strip()}, config has {have!r}")
  assert not wrong, wrong


def test_recipe_times_equal_their_reports_wall_time():
  """A README recipe row whose result links a run report states the run's wall time (the report's
  `Wall N s`, else its `status.json`), in seconds or in minutes rounded as written."""
  rows = re.findall(r"^\| `[^`]+` \| [^|]+ \| ([^|]+) \| [^|]*\((?:\[report\]|\[[^\]]+\])\("
                    r"(docs/[\w/]+/report\.md)\)\) \|$", (REPO / "README.md").read_text(), re.M)
  checked = 0
  for cell, report in rows:
    wall = re.search(r"^Wall (\d+) s;", (REPO / report).read_text(), re.M)
    status = REPO / report.replace("report.md", "status.json")
    if wall is not None:
      wall = int(wall[1])
    elif status.exists() and "wall_s" in json.loads(status.read_text()):
      wall = round(json.loads(status.read_text())["wall_s"])  # what launch.py timed
    else:
      continue  # a run that recorded no wall time
    if m := re.fullmatch(r"(\d+) s(?: \+ .*)?", cell.strip()):
      assert int(m[1]) == wall, (report, cell)
    elif m := re.fullmatch(r"([\d.]+) min", cell.strip()):
      digits = len(m[1].partition(".")[2])
      assert float(m[1]) == round(wall / 60, digits), (report, cell, wall)
    else:
      raise AssertionError(f"{report}: the README says {cell.strip()!r}; say its wall time, "
                           f"{wall} s")
    checked += 1
  assert checked >= 7, rows


def test_every_docs_run_records_its_provenance_or_is_marked_as_older():
  """A run directory in docs/ holds provenance.json and config.json, or the index names it among
  the runs made before provenance was recorded (and a rerun that adds it takes it off that list)."""
  index = " ".join((DOCS / "README.md").read_text().split())
  marked = set(re.findall(r"`(\w+)`", index.partition("Made before provenance was recorded")[2]))
  runs = {p.parent.relative_to(DOCS).parts[0] for p in DOCS.glob("*/report.md")}
  missing = sorted(r for r in runs - marked
                   if not ((DOCS / r / "provenance.json").exists()
                           and (DOCS / r / "config.json").exists()))
  assert not missing, f"runs in docs/ without provenance.json or config.json, unmarked: {missing}"
  stale = sorted(r for r in marked & runs if (DOCS / r / "provenance.json").exists())
  assert not stale, f"marked as older but they hold provenance.json now: {stale}"
  assert marked <= runs, marked - runs


# Numbers a page derived by hand from its run's files, each with how (found verbatim in none).
_PPO_WINDOWS = "a 10-rollout window's mean of metrics.jsonl, not in the report's trends"
DERIVED = {("algorithms/ppo.md", "-6.9"): "z of rollouts 91-100 against 11-20, from metrics.jsonl",
           **{("algorithms/ppo.md", n): _PPO_WINDOWS for n in ("0.152", "0.303", "0.391")}}


def _sources(page):
  """The run or benchmark directories under docs/ a page links into: where its numbers come from."""
  dirs = {"benchmarks"} if page.parent.name == "benchmarks" else set()
  for target in _LINK.findall(page.read_text()):
    if re.match(r"^[a-z]+:", target) or target.startswith("#"):
      continue
    path = (page.parent / target.split("#")[0]).resolve()
    if path.is_relative_to(DOCS.resolve()):
      parts = path.relative_to(DOCS.resolve()).parts
      if len(parts) > 1 and parts[0] not in ("studies", "algorithms", "guide"):
        dirs.add(parts[0])
  return dirs


@pytest.mark.parametrize("page", [*sorted(DOCS.glob("studies/*.md")),
                                  *sorted(DOCS.glob("algorithms/*.md")),
                                  DOCS / "benchmarks/README.md"], ids=lambda p: p.name)
def test_every_decimal_in_a_results_table_is_in_the_runs_the_page_links(page):
  """Each decimal number in a results table of a page (knob tables apart: they are checked against
  the configs) equals, at the precision written, a number in the files of the runs or benchmarks
  the page links to (a share may be written as a percent), or is listed in DERIVED."""
  import bisect

  name = page.relative_to(DOCS).as_posix()
  text = "\n".join(p.read_text(errors="ignore") for d in _sources(page)
                   for p in (DOCS / d).rglob("*")
                   if p.is_file() and p.suffix in (".md", ".json", ".jsonl", ".csv", ".log"))
  values = sorted({float(t) for t in
                   re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text.replace(",", ""))})

  def found(x, decimals):
    for y, tol in ((x, 0.5 * 10 ** -decimals), (x / 100, 0.005 * 10 ** -decimals)):
      i = bisect.bisect_left(values, y - tol - 1e-12)
      if i < len(values) and values[i] <= y + tol + 1e-12:
        return True
    return False

  body = re.sub(r"^## [\w ]*[Kk]nobs[^\n]*\n.*?(?=^## |\Z)", "", page.read_text(),
                flags=re.M | re.S)
  rows = [line for line in body.splitlines() if line.startswith("| ") and line[:4] != "|---"]
  missing = [n for line in rows
             for n in re.findall(r"(?<![\w.])-?\d[\d,]*\.\d+(?![\w.])", line.replace("−", "-"))
             if (name, n) not in DERIVED and not found(float(n.replace(",", "")),
                                                       len(n.split(".")[1]))]
  assert not missing, f"{name}: table numbers in none of {sorted(_sources(page))}: {missing}"
