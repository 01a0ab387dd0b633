#!/usr/bin/env bash
# One prepared GPU session: what dfqbench checks and measures when a GPU is lent for a few minutes.
#   OUT=DIR DEADLINE_S=420 scripts/gpu_session.sh        (from the repository root; PY=python3 by default)
#   LANES="long_gdfq long_qimera" picks lanes (default: all); BACKENDS="torch triton" runs bench_qat once per
#   fake-quant backend (default: auto); COMPILE="none,default,reduce-overhead" gives bench_qat one trainer row per
#   torch.compile mode (default: none); FAKEQUANT=0 skips bench_fakequant, BENCH=0 both benchmarks; KERNEL_TESTS=0
#   skips the Triton kernel tests; BENCH_TIMEOUT_S caps each benchmark (default 600); PRECISIONS="fp32,bf16" (the
#   default) gives bench_qat one trainer row per precision.
# 0. optional set-up for a bare machine: wheels in .gpu/wheels (hydra-core, omegaconf, antlr4, pytorchcv) are
#    installed to /tmp/site; the test split and teacher in .gpu/cifar10-jpeg and .gpu/models are used when present
#    (the test split may come packed, .gpu/cifar10-test-jpeg.npz from scripts/pack_split.py: the machine takes the
#    working tree by size on disk, where 10,000 small files cost 40 MB)
# 1. benchmarks, alone on the GPU (the timings): scripts/bench_qat.py (trainer iteration and W4A4 fwd+bwd vs FP32,
#    batch 200) and scripts/bench_fakequant.py -> $OUT/bench_qat_gpu.md, $OUT/fakequant_gpu.md
# 2. side by side until DEADLINE_S seconds after the start: the Triton kernel tests compiled natively
#    ($OUT/kernel_tests.log), and training lanes, each a list of runs (full test set, convention gdfq):
#    lanes long*: GDFQ and Qimera W4A4 on schedule paper_first10; lanes seeds*: seeds 1 and 2 of the
#    single-seed cells of the cpu schedule; lanes tune_*: the tuning-robustness study's methods not yet run
#    (experiment=tuning_robustness, records under results/tuning/); lanes gdfq_eager / gdfq_compiled: GDFQ W4A4
#    seeds 0-2 on the cpu schedule, eagerly (results/cuda/sweeps) and with compile=$COMPILE_RUN (default
#    reduce-overhead; results/explore/compile-gpu/): equal accuracy or not; lane gdfq_bf16 the same with
#    precision=bf16 (results/explore/gdfq-bf16-gpu/). Runs still going at the deadline are
#    stopped (their checkpoints stay).
# 3. every record finished in this session, with its .hydra folder and the lane logs -> $OUT/records.tgz
# DRY=1 runs the same plumbing on tiny settings (CPU, smoke schedules, 200 test images): a check of the script.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/dfqbench-gpu}
DEADLINE_S=${DEADLINE_S:-420}
mkdir -p "$OUT"
t0=$(date +%s)
log() { echo "[gpu_session +$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/session.log"; }

if [[ -z "${DRY:-}" ]]; then  # a bare lent machine: packages, data and teacher carried in .gpu/
  if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site
  fi
  [[ -f .gpu/cifar10-test-jpeg.npz && ! -d .gpu/cifar10-jpeg/test ]] && \
    "$PY" scripts/pack_split.py unpack .gpu/cifar10-test-jpeg.npz .gpu/cifar10-jpeg/test
  [[ -d .gpu/cifar10-jpeg ]] && export DFQ_CIFAR10_ROOT="$PWD/.gpu/cifar10-jpeg"
  [[ -d .gpu/models ]] && export DFQ_MODELS_DIR="$PWD/.gpu/models"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RESULTS=results
if [[ -n "${DRY:-}" ]]; then
  RESULTS="$OUT/dry-results"; device=cpu; long=smoke; short=smoke; extra=(dataset.max_samples=200); bench=(--device cpu --batch 8 --iters 1)
  fq=(--device cpu --max-elements 2100000 --repeats 1 --e2e-batches 1)
else
  device=cuda; long=paper_first10; short=cpu; extra=(); bench=(--device cuda --batch 200 --iters 10 --warmup 3)
  fq=(--max-elements 67108864 --repeats 10)
fi
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'python', sys.version.split()[0])" 2>&1 \
  | tee -a "$OUT/session.log"
stamp=$(mktemp); touch "$stamp"
COMPILE=${COMPILE:-none}

[[ "${BENCH:-1}" == 0 ]] && BACKENDS=none FAKEQUANT=0
for backend in ${BACKENDS:-auto}; do
  [[ $backend == none ]] && break
  for mode in ${COMPILE//,/ }; do  # one process per mode: its own FP32 baseline, its own compile caches
    suffix=$([[ $mode == none ]] || echo "_compile-$mode")
    log "bench_qat ($backend, compile $mode)"
    timeout "${BENCH_TIMEOUT_S:-600}" "$PY" scripts/bench_qat.py "${bench[@]}" --backend "$backend" \
      --methods "${BENCH_METHODS:-gdfq,ait,adadfq,arc}" --compile "$mode" --precisions "${PRECISIONS:-fp32,bf16}" \
      --out "$OUT/bench_qat_gpu_$backend$suffix.md" >> "$OUT/bench.log" 2>&1 || log "bench_qat failed (see bench.log)"
  done
done
if [[ "${FAKEQUANT:-1}" != 0 ]]; then
  log "bench_fakequant"
  timeout "${BENCH_TIMEOUT_S:-600}" "$PY" scripts/bench_fakequant.py "${fq[@]}" --out "$OUT/fakequant_gpu.md" \
    >> "$OUT/bench.log" 2>&1 \
    || log "bench_fakequant failed (see bench.log)"
fi

log "kernel tests and training lanes"
mkdir -p "$RESULTS/logs"
test_pid=
if [[ "${KERNEL_TESTS:-1}" != 0 ]]; then
  ( unset TRITON_INTERPRET; "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_quantizers.py \
      > "$OUT/kernel_tests.log" 2>&1; echo "exit $?" >> "$OUT/kernel_tests.log" ) &
  test_pid=$!
fi

base=(model=resnet20_cifar10 dataset=cifar10 quant=gdfq progress=false threads=1 device=$device "${extra[@]}")
# sweeps under results/<device>/ (results/cuda/sweeps/...): a cell's CPU records keep their results/sweeps folders
run() { "$PY" -m dfqbench -m "${base[@]}" "paths.output_dir=$RESULTS/$device" "$@"; }
explore() { "$PY" -m dfqbench -m "${base[@]}" "paths.output_dir=$RESULTS/explore/$1" "${@:2}"; }
seeds() { run schedule=$short seed=1,2 "$@"; }
tune() { "$PY" -m dfqbench experiment=tuning_robustness "paths.output_dir=$RESULTS" progress=false threads=1 \
  device=$device "${extra[@]}" "tuning.methods=[$1]" "${@:2}"; }
COMPILE_RUN=${COMPILE_RUN:-reduce-overhead}
declare -A lanes=(
  [long_gdfq]="run schedule=$long method=gdfq wbit=4 abit=4 seed=0"
  [long_qimera]="run schedule=$long method=qimera wbit=4 abit=4 seed=0"
  [seeds_arc]="seeds method=arc wbit=4,5 'abit=\${wbit}'"
  [seeds_arc_ait]="seeds method=arc_ait wbit=4,5 'abit=\${wbit}'"
  [seeds_a]="seeds method=qimera_ait,intraq wbit=4 abit=4"
  [seeds_b]="seeds method=hast wbit=4 abit=4; seeds method=gdfq wbit=5 abit=5"
  [seeds_c]="seeds method=qimera,ait wbit=5 abit=5"
  [seeds_d]="seeds method=adasg,adadfq wbit=5 abit=5"
  [seeds_e]="seeds method=intraq,hast,qimera_ait wbit=5 abit=5"
  [seeds_advkd]="seeds method=advkd wbit=4 abit=4"
  [kd_advkd]="run schedule=$short method=advkd wbit=4 abit=4 seed=0,1,2"   # their 2026-12-04 settings
  [kd_dfed]="run schedule=$short method=dfed wbit=4 abit=4 seed=0,1,2"
  [gdfq_eager]="run schedule=$short method=gdfq wbit=4 abit=4 seed=0,1,2"
  [gdfq_compiled]="explore compile-gpu schedule=$short method=gdfq wbit=4 abit=4 seed=0,1,2 compile=$COMPILE_RUN ||
    explore compile-gpu schedule=$short method=gdfq wbit=4 abit=4 seed=0,1,2 compile=default"
  [gdfq_bf16]="explore gdfq-bf16-gpu schedule=$short method=gdfq wbit=4 abit=4 seed=0,1,2 precision=bf16"
  # the training family's W4A4 cells on the cpu schedule, 3 seeds each (their CPU records were superseded by
  # the 2026-12-03 parity fixes and have 0-1 seeds again): results/cuda/sweeps/
  [family_1]="run schedule=$short method=gdfq,qimera wbit=4 abit=4 seed=0,1,2"
  [family_2]="run schedule=$short method=ait,qimera_ait wbit=4 abit=4 seed=0,1,2"
  [family_3]="run schedule=$short method=intraq,hast wbit=4 abit=4 seed=0,1,2"
  [family_4]="run schedule=$short method=adasg,adadfq wbit=4 abit=4 seed=0,1,2"
  [family_5]="run schedule=$short method=zaq,dfqf wbit=4 abit=4 seed=0,1,2"
  [family_6]="run schedule=$short method=arc,arc_ait wbit=4 abit=4 seed=0,1,2"
  [tune_intraq_margin]="tune intraq 'tuning.only=[intraq-tune_generator.source_settings.margin_upper_0.5,intraq-tune_generator.source_settings.margin_upper_1.0]'"
  [tune_genie_iters]="tune genie 'tuning.only=[genie-tune_reconstruct.iterations_500,genie-tune_reconstruct.iterations_2000]'"
  [tune_gdfq]="tune gdfq"
  [tune_qimera]="tune qimera"
  [tune_intraq]="tune intraq"
  [tune_ptq]="tune dsg,ocs,aac_abn"
  [tune_genie]="tune genie"
)
pids=()
for name in ${LANES:-${!lanes[@]}}; do
  [[ -n "${lanes[$name]:-}" ]] || { log "unknown lane $name; lanes: ${!lanes[*]}"; continue; }
  setsid bash -c "$(declare -p base PY short RESULTS device extra COMPILE_RUN); $(declare -f run explore seeds tune); ${lanes[$name]}" \
    > "$RESULTS/logs/gpu-$name.log" 2>&1 &
  pids+=($!)
done
while (( $(date +%s) - t0 < DEADLINE_S )); do
  running=0
  for pid in "${pids[@]}" "$test_pid"; do kill -0 "$pid" 2>/dev/null && running=1; done
  (( running )) || break
  sleep 5
done
for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
[[ -n "$test_pid" ]] && kill "$test_pid" 2>/dev/null
sleep 3
log "lanes stopped"

find "$RESULTS" -name record.json -newer "$stamp" | sort > "$OUT/records.txt"
while read -r rec; do
  d=$(dirname "$rec")
  echo "$rec"; [[ -d "$d/.hydra" ]] && echo "$d/.hydra"
done < "$OUT/records.txt" > "$stamp.paths"
ls "$RESULTS"/logs/gpu-*.log >> "$stamp.paths"
tar czf "$OUT/records.tgz" -T "$stamp.paths"
log "$(wc -l < "$OUT/records.txt") records -> records.tgz"
grep -h '"top1"\|"status"' $(cat "$OUT/records.txt") /dev/null | tr -d ' ' | paste -sd' ' | fold -w 2000 | head -c 4000
echo
[[ -f "$OUT/kernel_tests.log" ]] && tail -3 "$OUT/kernel_tests.log"
exit 0  # what ran and what failed is in $OUT: session.log, the lane logs, records.txt
