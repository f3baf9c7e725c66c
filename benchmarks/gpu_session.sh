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
# BUDGET (seconds, default 550) bounds the whole script, so it ends inside the call's limit.
# TRAIN_VARIANTS / GEN_VARIANTS="--remat full;--layers scan" add runs with those flags (and
# environments, see `variants` below);
# REF_TRAIN=0 and REF_GEN_BATCHES="16" narrow the reference runs (REF_TRAIN_STEPS=30 times more of
# the reference's train steps: its median moved 7% between two calls of 10); SCAN=0 skips the scanned decode;
# GEN=0 skips every generate run (ours, the reference's, the variants: a second call for the train
# variants, whose baseline is the default train run of the same call); TRAIN=0 skips our default
# train run (a call for generate variants); CHECKS=0 skips the GPU tests; KERNELS=0 skips the
# decode-attention kernel sweep, whose fastest configs our generate runs otherwise use
# (DECODE_KERNELS sets them by hand); MATMUL=0 skips the decode-matmul sweep and the generate run
# on the fused projections with its picks (MATMUL_KERNELS sets them by hand).
# CACHE=0 compiles every generate run from scratch (by default they share a compilation cache:
# see before `generate_jax`).
# Every step runs under its own `timeout` and prints its JSON line as soon as it has one, so a
# step that hangs costs only its own budget. SMOKE=1 runs the same steps on the CPU with the
# reference's tiny shapes in fp32 (benchmarks/shapes.py). Logs go to $OUT (or a temporary folder).
# DUMP=0 skips XLA's record of the programs built on this card (on by default on a GPU): per step,
# the optimized HLO, the autotuner's picks, the card's description and the launch sequence of the
# train step, prefill and decode loop, packed into $OUT/xla_dump.tar.gz, to read and to recompile
# without a GPU (benchmarks/gpu_deviceless.py --card-dump).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}  # JAX steps only; torch ignores it
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
REF=${REF:-.bench_ref/ref_torch_llava_ov.py}
PY=${PY:-python3}
LOG="$OUT/bench.jsonl"
LOGS="$OUT/logs"  # one log per step; packed into logs.tar.gz at the end (a device call returns 8 files)
mkdir -p "$LOGS"
: > "$LOG"

if [ "${SMOKE:-0}" = 1 ]; then
  ours_train=(--tiny --steps 3 --warmup 1 --dtype float32); ours_gen=(--tiny --batch 1,2 --variant grid)
  ref_common=(--size tiny --device cpu); ref_train=(--steps 3 --warmup 1 --image 384x384 --text 64)
  ref_gen=(--image 384x384 --text 64 --new-tokens 8 --steps 3); gen_batches=(1 2)
  t_train=${T_TRAIN:-300}; t_ref_train=${T_REF_TRAIN:-300}; t_gen=${T_GEN:-300}; t_ref_gen=${T_REF_GEN:-300}
else
  ours_train=(); ours_gen=(--batch 1,16 --variant grid)
  ref_common=(); ref_train=(--steps "${REF_TRAIN_STEPS:-10}"); ref_gen=(--text 64 --new-tokens 128 --steps 3); gen_batches=(1 16)
  t_train=${T_TRAIN:-160}; t_ref_train=${T_REF_TRAIN:-75}; t_gen=${T_GEN:-160}; t_ref_gen=${T_REF_GEN:-55}
fi

BUDGET=${BUDGET:-550}  # seconds for the whole script: a step gets what is left, at most its own limit
if [ -z "${DUMP:-}" ]; then  # on by default on a GPU machine
  DUMP=0; [ "${SMOKE:-0}" != 1 ] && command -v nvidia-smi > /dev/null && DUMP=1
fi
DUMP_MODULES='jit_(train_step|_prefill_fn|_decode_loop_fn)'

step() {  # step NAME SECONDS CMD...: run under timeout, keep JSON lines, show the rest's tail on failure
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then echo "== $name skipped: ${left}s of the budget left"; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  local dump=()  # a variant that sets XLA_FLAGS itself (`env XLA_FLAGS=...`) replaces this
  [ "$DUMP" = 1 ] && dump=(env "XLA_FLAGS=${XLA_FLAGS:-} --xla_dump_to=$OUT/xla_dump/$name --xla_dump_hlo_module_re=$DUMP_MODULES")
  timeout "$limit" "${dump[@]}" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  grep -E '^\{' "$LOGS/$name.log" | tee -a "$LOG"
  grep -E '^profile:' "$LOGS/$name.log"
  if [ $rc -ne 0 ]; then
    echo "   $name failed (rc=$rc; 124 = timed out); last lines:"
    grep -vE '^\{' "$LOGS/$name.log" | tail -n 8 | sed 's/^/   | /'
  fi
  echo "   $name took $((SECONDS - start))s"
  return $rc
}

echo "== environment"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

# The GPU-only correctness checks first (cuDNN attention and the Triton decode-attention kernel
# against the XLA path; skipped on CPU).
if [ "${CHECKS:-1}" = 1 ]; then
  step gpu_checks "${T_CHECKS:-90}" $PY -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_decode_attention.py -k "gpu or cudnn"
  tail -n 1 "$LOGS/gpu_checks.log"
fi
# The decode-attention kernels alone under several divisions of the work, against XLA's path
# (benchmarks/decode_attention.py; KERNELS=0 skips it).
# Our generate runs then decode with the fastest config per row count (DECODE_KERNELS, which a
# caller may also set by hand: "2:128,132,4,2;16:64,528,4,3"); their JSON lines record it.
DECODE_KERNELS=${DECODE_KERNELS:-}
if [ "${KERNELS:-1}" = 1 ]; then
  kernel_args=(); [ "${SMOKE:-0}" = 1 ] && kernel_args=(--tiny --rows 1,2 --configs "32,4,4,2;16,8,4,1")
  t_kernels=${T_KERNELS:-150}
  step decode_attention_kernels "$t_kernels" $PY benchmarks/decode_attention.py "${kernel_args[@]}" \
    --budget-s $((t_kernels > 60 ? t_kernels - 30 : t_kernels / 2))
  grep -E '^(\||# budget)' "$LOGS/decode_attention_kernels.log"
  if [ -z "$DECODE_KERNELS" ]; then
    DECODE_KERNELS=$(sed -n 's/^fastest kernels: //p' "$LOGS/decode_attention_kernels.log" | tail -n 1)
  fi
fi
kernels_arg=()
[ -n "$DECODE_KERNELS" ] && echo "== decode kernels for our generate runs: $DECODE_KERNELS" &&
  kernels_arg=(--decode-kernels "$DECODE_KERNELS")

# Ours first: they are what is not measured yet; the reference has numbers in REFERENCE_RESULTS.md.
# Each of ours also leaves a profile (.xplane.pb, read with xprof off the device) under $OUT.
if [ "${TRAIN:-1}" = 1 ]; then
  step train_jax "$t_train" $PY benchmarks/train_step.py "${ours_train[@]}" --profile "$OUT/train.xplane.pb" ||
    step train_jax_xla_attention "$t_train" $PY benchmarks/train_step.py "${ours_train[@]}" --attention xla \
      --profile "$OUT/train_xla_attention.xplane.pb"
fi
# Our generate runs share one persistent compilation cache (CACHE=0: none). The variants change
# the decode program only, so each loads the prefill programs that the first run compiled and
# autotuned (the same program and options; XLA's dump flags are not part of JAX's cache key): a
# variant's first_call_s is then mostly its decode program's compile. XLA's own per-fusion
# autotuning cache, which JAX turns on beside it, stays off: a variant with another tiling search
# (xla_gpu_exhaustive_tiling_search) must tune its GEMMs itself, not load the default search's picks.
GEN_CACHE=
if [ "${CACHE:-1}" = 1 ] && [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  GEN_CACHE=$(mktemp -d)  # not under $OUT: the call brings back 8 files at most
  export JAX_COMPILATION_CACHE_DIR="$GEN_CACHE" JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=none \
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
fi
# If the picked kernel configs fail end to end, the default ones still give the measurement.
if [ "${GEN:-1}" = 1 ] && ! step generate_jax "$t_gen" $PY benchmarks/generate.py "${ours_gen[@]}" "${kernels_arg[@]}" \
    --profile "$OUT/generate.xplane.pb" && [ ${#kernels_arg[@]} -gt 0 ]; then
  kernels_arg=()
  step generate_jax_default_kernels "$t_gen" $PY benchmarks/generate.py "${ours_gen[@]}" --profile "$OUT/generate.xplane.pb"
fi
# The decode projections on the fused Pallas kernels (models/decode_matmul.py): a sweep of their
# configs per projection, whose picks for 2 rows (batch 1) then decode in a generate run of ours.
MATMUL_KERNELS=${MATMUL_KERNELS:-}
if [ "${GEN:-1}" = 1 ] && [ "${MATMUL:-1}" = 1 ]; then
  # Two rows only (batch 1, the target furthest off): each config compiles a few layers per row count.
  matmul_args=(--rows 2); [ "${SMOKE:-0}" = 1 ] && matmul_args=(--tiny --rows 2 --configs "16,16,4,1" --sites down)
  t_matmul=${T_MATMUL:-150}
  step decode_matmul_kernels "$t_matmul" $PY benchmarks/decode_matmul.py "${matmul_args[@]}" \
    --budget-s $((t_matmul > 60 ? t_matmul - 40 : t_matmul / 2))
  grep -E '^(\||# budget|fastest)' "$LOGS/decode_matmul_kernels.log"
  if [ -z "$MATMUL_KERNELS" ]; then
    MATMUL_KERNELS=$(sed -n 's/^fastest matmul kernels (2 rows): //p' "$LOGS/decode_matmul_kernels.log" | tail -n 1)
  fi
  matmul_arg=(--decode-attention pallas --decode-matmul pallas)
  # With the picks; if those fail end to end, the default configs still give the measurement.
  if ! step generate_jax_matmul "$t_gen" $PY benchmarks/generate.py "${ours_gen[@]}" "${kernels_arg[@]}" "${matmul_arg[@]}" \
      ${MATMUL_KERNELS:+--decode-matmul-kernels "$MATMUL_KERNELS"} --profile "$OUT/generate_matmul.xplane.pb" &&
      [ -n "$MATMUL_KERNELS" ]; then
    MATMUL_KERNELS=
    step generate_jax_matmul_default "$t_gen" $PY benchmarks/generate.py "${ours_gen[@]}" "${kernels_arg[@]}" \
      "${matmul_arg[@]}" --profile "$OUT/generate_matmul.xplane.pb"
  fi
fi
# The reference next, before the variants: a ratio is only given between numbers of one call.
if [ -f "$REF" ]; then
  if [ "${REF_TRAIN:-1}" = 1 ]; then
    step train_ref "$t_ref_train" $PY "$REF" "${ref_common[@]}" --what train "${ref_train[@]}"
  fi
  if [ "${GEN:-1}" = 1 ]; then
    for b in ${REF_GEN_BATCHES:-${gen_batches[@]}}; do
      step "generate_ref_b$b" "$t_ref_gen" $PY "$REF" "${ref_common[@]}" --what generate --batch "$b" "${ref_gen[@]}"
    done
  fi
else
  echo "== reference skipped: $REF not found (see the top of this script)"
fi
# Variants with the time left (';'-separated flag sets; leading NAME=VALUE words become the run's
# environment; {OUT} stands for the output folder, for a variant's --profile, and
# {MATMUL_KERNELS} for the decode-matmul sweep's picks, as --decode-matmul-kernels={MATMUL_KERNELS}), e.g.
# TRAIN_VARIANTS="--remat full;XLA_FLAGS=--xla_gpu_enable_command_buffer= --remat dots".
variants() {  # variants KIND SCRIPT LIMIT SETS FIXED...
  local kind=$1 script=$2 limit=$3 sets=$4; shift 4
  local i=0 set words envs flags w
  IFS=';' read -ra set <<< "$sets"
  for words in "${set[@]}"; do
    envs=(); flags=()
    for w in $words; do
      w=${w//\{OUT\}/$OUT}; w=${w//\{MATMUL_KERNELS\}/$MATMUL_KERNELS}
      if [ ${#flags[@]} -eq 0 ] && [[ $w == [A-Z_]*=* ]]; then envs+=("$w"); else flags+=("$w"); fi
    done
    step "${kind}_variant$i" "$limit" env "${envs[@]}" $PY "$script" "$@" "${flags[@]}"
    i=$((i + 1))
  done
}
# The decode variants first: each is shorter than a train variant.
[ "${GEN:-1}" = 1 ] && variants generate_jax benchmarks/generate.py "$t_gen" "${GEN_VARIANTS:-}" "${ours_gen[@]}" \
  "${kernels_arg[@]}"
# The train variants compile programs of their own: nothing to share, and a train step's
# executable is large to write.
if [ -n "$GEN_CACHE" ]; then unset JAX_COMPILATION_CACHE_DIR; rm -rf "$GEN_CACHE"; fi
variants train_jax benchmarks/train_step.py "$t_train" "${TRAIN_VARIANTS:-}" "${ours_train[@]}"
# Where the device time went, read from the profiles on the device (benchmarks/profile_summary.py;
# the full files come back gzipped): per train step (2 profiled) and per decoded token (1 call).
decode_steps=$([ "${SMOKE:-0}" = 1 ] && echo 7 || echo 127)
for f in "$OUT"/*.xplane.pb; do
  [ -f "$f" ] || continue
  case $(basename "$f") in
    train*) echo "== profile $(basename "$f"), per step"; args=(--module train_step --per 2) ;;
    *) echo "== profile $(basename "$f"), per decoded token"; args=(--module decode --per "$decode_steps") ;;
  esac
  timeout 120 $PY benchmarks/profile_summary.py "$f" "${args[@]}" --top 5 2>&1 | head -n 19
done
gzip -f "$OUT"/*.xplane.pb 2> /dev/null

echo "== summary"
$PY benchmarks/compare.py "$LOG"

# With time left: the decode steps with the decoder layers scanned instead of unrolled (the
# engine's default), to check that default on this device.
if [ "${GEN:-1}" = 1 ] && [ "${SCAN:-1}" = 1 ] && step generate_jax_scan "${T_GEN_SCAN:-100}" $PY benchmarks/generate.py "${ours_gen[@]}" --batch 1 --decode-scan; then
  echo "== summary with the scanned decode"
  $PY benchmarks/compare.py "$LOG"
fi
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -r "$LOGS"
if [ -d "$OUT/xla_dump" ]; then  # what gpu_deviceless.py and hlo_traffic.py read; the rest is large
  find "$OUT/xla_dump" -type f ! \( -name '*_after_optimizations.txt' -o -name '*autotune_results.pbtxt' \
    -o -name '*gpu_target_config.pbtxt' -o -name '*thunk_sequence_after_thunk_passes.txt' \) -delete
  find "$OUT/xla_dump" -type d -empty -delete
  tar -czf "$OUT/xla_dump.tar.gz" -C "$OUT" xla_dump && rm -r "$OUT/xla_dump"
  echo "== XLA's record of the programs: $(du -h "$OUT/xla_dump.tar.gz" | cut -f1) in xla_dump.tar.gz"
fi
