"""The package layering in pyproject.toml's import-linter contracts holds, and each contract can fail:
an upward import, a cycle or a config importing library code added to the real import graph breaks
the contract that forbids it."""

import copy

import pytest

from tests_helpers import REPO

importlinter = pytest.importorskip("importlinter")
grimp = pytest.importorskip("grimp")

from importlinter.application.use_cases import read_user_options  # noqa: E402
from importlinter.configuration import configure  # noqa: E402
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract  # noqa: E402
from importlinter.contracts.forbidden import ForbiddenContract  # noqa: E402
from importlinter.contracts.independence import IndependenceContract  # noqa: E402
from importlinter.contracts.layers import LayersContract  # noqa: E402

_TYPES = {c.type_name: c for c in (LayersContract, IndependenceContract, ForbiddenContract,
                                   AcyclicSiblingsContract)}


@pytest.fixture(scope="module")
def contracts():
  configure()
  options = read_user_options(str(REPO / "pyproject.toml"))
  return options, {c["id"]: c for c in options.contracts_options}


@pytest.fixture(scope="module")
def graph(contracts):
  options, _ = contracts
  return grimp.build_graph(*options.session_options["root_packages"], cache_dir=None)


def _kept(contracts, graph, contract_id: str) -> bool:
  options, by_id = contracts
  c = by_id[contract_id]
  contract = _TYPES[c["type"]](name=c["name"], session_options=options.session_options,
                               contract_options=c)
  return contract.check(copy.deepcopy(graph), verbose=False).kept


def test_every_contract_is_kept(contracts, graph):
  broken = [i for i in contracts[1] if not _kept(contracts, graph, i)]
  assert not broken, f"broken import contracts: {broken}; run `lint-imports` for the imports"


@pytest.mark.parametrize("importer, imported, contract_id", [
    ("lm.model", "lm.hub.loader", "lm-floors"),          # the model reaching up into loading
    ("lm.train.trainer", "lm.pretrain.task", "lm-floors"),  # infrastructure importing a task
    ("lm.scoring", "decode.engine", "pillars"),           # lm importing a pillar above it
    ("decode.engine", "align.train", "pillars"),
    ("sae.train", "decode.engine", "sae-independent"),
    ("sae.train", "align.train", "sae-align-independent"),
    ("configs.dpo", "align.data", "configs"),
    ("lm.hub.names", "lm.hub.vocab", "acyclic"),          # vocab imports names: a cycle
    ("lm.pretrain.corpus", "lm.pretrain.task", "acyclic"),
    ("decode.scorers", "torch", "torch-free"),              # torch is the tests' reference only
])
def test_an_added_wrong_import_breaks_its_contract(contracts, graph, importer, imported,
                                                   contract_id):
  assert _kept(contracts, graph, contract_id)
  wrong = copy.deepcopy(graph)
  wrong.add_import(importer=importer, imported=imported, line_number=1, line_contents="import x")
  assert not _kept(contracts, wrong, contract_id)


def test_lm_top_level_stays_small():
  """`lm/` keeps the model itself: at most 13 modules at its top level, the rest in sub-packages."""
  top = sorted(p.name for p in (REPO / "lm").glob("*.py"))
  assert len(top) <= 13, top
  for pkg in (p for p in (REPO / "lm").iterdir() if p.is_dir() and p.name != "__pycache__"):
    doc = (pkg / "__init__.py").read_text()
    assert doc.startswith('"""') and len(doc.split('"""')[1]) > 80, f"{pkg} needs a docstring"


@pytest.mark.subprocess
def test_configs_import_no_library_code():
  """Reading and building a config imports ml_collections alone (no jax, grain or postlab library
  code), so a config can be read, printed and checked anywhere."""
  import subprocess
  import sys

  code = ("import sys, importlib, pkgutil, configs\n"
          "for m in pkgutil.iter_modules(configs.__path__):\n"
          "  mod = importlib.import_module('configs.' + m.name)\n"
          "  if hasattr(mod, 'get_config'): mod.get_config()\n"
          "heavy = [m for m in ('jax', 'grain', 'lm', 'align', 'decode', 'sae') if m in sys.modules]\n"
          "assert not heavy, heavy")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.subprocess
def test_no_library_path_imports_torch_even_where_it_is_installed(tmp_path):
  """Every module of lm, decode, align and sae imported and a run directory's metrics written
  (tensorboardX imports torch whenever it can): torch, which the parity extra installs beside the
  library, is never imported. import-linter sees only our own import statements; this sees what
  third-party libraries import on our behalf."""
  import importlib.util
  import os
  import subprocess
  import sys

  if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed here: nothing could import it")
  code = ("import sys, importlib, pkgutil, pathlib\n"
          "for pkg in ('lm', 'decode', 'align', 'sae'):\n"
          "  for m in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + '.'):\n"
          "    importlib.import_module(m.name)\n"
          "from lm.train.rundir import MetricsWriter\n"
          f"w = MetricsWriter(pathlib.Path({str(tmp_path)!r}))\n"
          "w.write(0, {'loss': 1.0}); w.close()\n"
          "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:5]\n"
          "print('ok')")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
  assert list((tmp_path / "tensorboard").iterdir())
