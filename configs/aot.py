"""The accelerator recipes compiled ahead of time (`make aot`; docs/aot/README.md): every `:gpu_full`
training config and the `:tpu_pod` variants, each on a TPU topology it fits, compiled from this
host with `launch.py --compile_only` (libtpu, no TPU). Not a launch config: a table of rows.

Each `:gpu_full` recipe has a TPU row, and the GPU recipes with a history on one H100/H200 a GPU
row. A row is (config, topology, mesh overrides): the overrides are `--config.mesh.*` flags, and the
rows of one config over several meshes are the mesh search (data / fsdp / tensor). The sink study
(`configs/sinks.py`) trains nothing (it analyses trained models); its training runs are
`pretrain.py`'s.
"""

# (config, topology, mesh overrides "data,fsdp,tensor" or "" for the config's own mesh)
ROWS = (
    ("pretrain.py:gpu_full", "v5p:2x2x1", ""),
    ("pretrain.py:gpu_full", "v5p:2x2x1", "4,1,1"),
    ("pretrain.py:gpu_full", "v5p:2x2x1", "1,2,2"),
    ("pretrain.py:gpu_full", "v5e:2x2", ""),
    ("pretrain.py:tpu_pod", "v5p:2x2x2", ""),
    ("sft.py:gpu_full", "v5e:2x2", ""),
    ("reward.py:gpu_full", "v5e:2x2", ""),
    ("verifier.py:gpu_full", "v5e:2x2", ""),
    ("dpo.py:gpu_full", "v5p:2x2x1", ""),
    ("dpo.py:tpu_pod", "v5p:2x2x2", ""),
    ("grpo.py:gpu_full", "v5p:2x2x1", ""),
    ("grpo.py:rm_gpu_full", "v5p:2x2x1", ""),
    ("ppo.py:gpu_full", "v5p:2x2x1", ""),
    ("usae_vision.py:gpu_full", "v5p:2x2x1", ""),
    ("sae_lm.py:gpu_full", "v5p:2x2x1", ""),
    ("pipeline.py:gpu_full", "v5p:2x2x1", ""),
    # GPU targets (jax's CUDA plugin, no GPU: `make aot EXTRAS=cuda12`)
    ("pretrain.py:gpu_full", "h200:1x1", ""),
    ("dpo.py:gpu_full", "h100:1x1", ""),
    ("grpo.py:gpu_full", "h100:1x1", ""),
)

GPU_TARGETS = ("h100", "h200")


def row_dir(config: str, topology: str, mesh: str) -> str:
  """The row's directory under docs/aot/: `dpo-gpu_full-v5p-2x2x1` (+ `-mesh-4-1-1`)."""
  name = config.replace(".py:", "-") + "-" + topology.replace(":", "-")
  return name + (f"-mesh-{mesh.replace(',', '-')}" if mesh else "")


def needs(topology: str) -> str:
  """What compiling for `topology` needs beyond the test extra: "cuda" (jax's CUDA plugin) or "-"."""
  return "cuda" if topology.split(":")[0] in GPU_TARGETS else "-"


def command(config: str, topology: str, mesh: str, workdir: str) -> list[str]:
  """The row's `launch.py` arguments."""
  args = [f"--config=configs/{config}", "--compile_only", f"--topology={topology}",
          f"--workdir={workdir}"]
  if mesh:
    data, fsdp, tensor = mesh.split(",")
    args += [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
             f"--config.mesh.tensor={tensor}"]
  return args

