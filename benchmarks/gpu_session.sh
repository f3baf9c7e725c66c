#!/usr/bin/env bash
# One device call that measures the train and generate targets of issues 5 and 6 against the
# PyTorch reference on the same GPU, then prints a table with the ratios (benchmarks/compare.py).
#
# The reference script lives beside the repository (../shared/bench) and does not travel with a
# device call: copy it into an ignored folder first and carry that folder.
#
#   mkdir -p .bench_ref && cp ../shared/bench/ref_torch_llava_ov.py .bench_ref/
#   echo /.bench_ref/ >> .git/info/exclude
#   device run: carry [".bench_ref"], timeout_s 590,
#     command: bash benchmarks/gpu_session.sh
#
# Every step runs under its own `timeout` and prints its JSON line as soon as it has one, so a
# step that hangs costs only its own budget. SMOKE=1 runs the same steps on the CPU with the
# reference's tiny shapes in fp32 (benchmarks/shapes.py). Logs go to $OUT (or a temporary folder).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
REF=${REF:-.bench_ref/ref_torch_llava_ov.py}
PY=${PY:-python3}
LOG="$OUT/bench.jsonl"
: > "$LOG"

if [ "${SMOKE:-0}" = 1 ]; then
  ours_train=(--tiny --steps 3 --warmup 1 --dtype float32); ours_gen=(--tiny --batch 1,2 --variant grid)
  ref_common=(--size tiny --device cpu); ref_train=(--steps 3 --warmup 1 --image 384x384 --text 64)
  ref_gen=(--image 384x384 --text 64 --new-tokens 8 --steps 3); gen_batches=(1 2)
  t_train=${T_TRAIN:-300}; t_ref_train=${T_REF_TRAIN:-300}; t_gen=${T_GEN:-300}; t_ref_gen=${T_REF_GEN:-300}
else
  ours_train=(); ours_gen=(--batch 1,16 --variant grid)
  ref_common=(); ref_train=(--steps 10); ref_gen=(--text 64 --new-tokens 128 --steps 3); gen_batches=(1 16)
  t_train=${T_TRAIN:-180}; t_ref_train=${T_REF_TRAIN:-90}; t_gen=${T_GEN:-170}; t_ref_gen=${T_REF_GEN:-50}
fi

step() {  # step NAME SECONDS CMD...: run under timeout, keep JSON lines, show the rest's tail on failure
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -E '^\{' "$OUT/$name.log" | tee -a "$LOG"
  if [ $rc -ne 0 ]; then
    echo "   $name failed (rc=$rc; 124 = timed out); last lines:"
    tail -n 8 "$OUT/$name.log" | sed 's/^/   | /'
  fi
  echo "   $name took $((SECONDS - start))s"
}

echo "== environment"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

# Ours first: they are what is not measured yet; the reference has numbers in REFERENCE_RESULTS.md.
step train_jax "$t_train" $PY benchmarks/train_step.py "${ours_train[@]}"
step generate_jax "$t_gen" $PY benchmarks/generate.py "${ours_gen[@]}"
if [ -f "$REF" ]; then
  step train_ref "$t_ref_train" $PY "$REF" "${ref_common[@]}" --what train "${ref_train[@]}"
  for b in "${gen_batches[@]}"; do
    step "generate_ref_b$b" "$t_ref_gen" $PY "$REF" "${ref_common[@]}" --what generate --batch "$b" "${ref_gen[@]}"
  done
else
  echo "== reference skipped: $REF not found (see the top of this script)"
fi

echo "== summary"
$PY benchmarks/compare.py "$LOG"

# With time left: the decode steps with the decoder layers scanned instead of unrolled (the
# engine's default), to check that default on this device.
step generate_jax_scan "${T_GEN_SCAN:-100}" $PY benchmarks/generate.py "${ours_gen[@]}" --batch 1 --decode-scan
echo "== summary with the scanned decode"
$PY benchmarks/compare.py "$LOG"
