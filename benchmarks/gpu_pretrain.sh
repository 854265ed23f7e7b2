#!/usr/bin/env bash
# The GPU checks of issue 17 in one call: cuDNN attention parity (tests/test_attention.py, GPU
# cases) and the modern-253m bf16 pretraining step's tokens/s and MFU in several variants
# (benchmarks/pretrain_step.py --no_torch). Run from the repository root on a GPU machine:
#
#   OUT=/tmp/gpu bash benchmarks/gpu_pretrain.sh [ROUNDS]
#
# If a `.whl/` folder of wheels is present (packages the machine lacks: ml_collections, grain,
# array_record, portpicker; not flax: the machine's flax 0.12.10 works with its jax 0.11.2, and
# flax 0.12.8 fails to import there), they are installed into a fresh /tmp/site first. Writes $OUT/env.txt,
# $OUT/parity.log, $OUT/bench.jsonl (one benchmark JSON per line) and $OUT/bench.err; prints a
# table last.
set -u
OUT=${OUT:-/tmp/gpu-pretrain}
ROUNDS=${1:-10}
PRESET=${PRESET:-modern-253m}  # PRESET=tiny SEQ=64 JAX_PLATFORMS=cpu: a dry run of the script
SEQ=${SEQ:-1024}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
if [ -d .whl ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_attention.py -k "cudnn" \
  > "$OUT/parity.log" 2>&1
echo "parity rc=$?"; grep -E "cudnn|passed|failed|Error" "$OUT/parity.log" | tail -20

bench() {  # name, then pretrain_step flags
  local name=$1; shift
  echo "== $name: $*" >> "$OUT/bench.err"
  timeout "${BENCH_TIMEOUT:-100}" python3 -m benchmarks.pretrain_step --preset "$PRESET" \
    --dtype bfloat16 --seq "$SEQ" --rounds "$ROUNDS" --warmup 2 "$@" 2>> "$OUT/bench.err" \
    | tail -1 | python3 -c "import json, sys; d = json.load(sys.stdin); d['name'] = '$name'; print(json.dumps(d))" \
    >> "$OUT/bench.jsonl" || echo "{\"name\": \"$name\", \"failed\": true}" >> "$OUT/bench.jsonl"
}
bench fused_sinks_b16 --batch 16 --attention_impl fused --sink logit --scan_layers --nodocument_mask --no_torch
# ours and torch alternate steps on the one GPU: each process gets part of its memory
XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 BENCH_TIMEOUT=130 bench fused_vs_torch_b16 --batch 16 --attention_impl fused \
  --scan_layers --nodocument_mask --torch_device cuda --torch_adamw fused
bench unfused_sinks_b16 --batch 16 --attention_impl unfused --sink logit --scan_layers --nodocument_mask --no_torch
bench fused_sinks_docmask_b16 --batch 16 --attention_impl fused --sink logit --scan_layers --no_torch
bench gpu_full_b32 --batch 32 --attention_impl fused --sink logit --scan_layers --remat dots_no_batch --no_torch

python3 - "$OUT/bench.jsonl" <<'EOF'
import json, sys
print(f"{'variant':28s} {'tok/s':>9s} {'MFU':>6s} {'step ms (min/med/max)':>24s} {'1st s':>6s}")
for line in open(sys.argv[1]):
  d = json.loads(line)
  if d.get("failed"):
    print(f"{d['name']:28s} FAILED"); continue
  o = d["ours"]; s = o["step_s"]
  print(f"{d['name']:28s} {o['tokens_per_s']:9.0f} {o.get('mfu', 0):6.1%} "
        f"{s['min']*1e3:7.1f}/{s['median']*1e3:7.1f}/{s['max']*1e3:7.1f} {o['first_step_s']:6.1f}")
  if "torch" in d:
    t = d["torch"]; s = t["step_s"]
    print(f"{'  torch ' + t.get('adamw', ''):28s} {t['tokens_per_s']:9.0f} {'':6s} "
          f"{s['min']*1e3:7.1f}/{s['median']*1e3:7.1f}/{s['max']*1e3:7.1f} "
          f"{t['first_step_s']:6.1f}  ratio {d['ratio']:.2f}")
EOF
