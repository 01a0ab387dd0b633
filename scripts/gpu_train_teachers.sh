#!/usr/bin/env bash
# Train teachers on a lent GPU, evaluate them here. From the repository root, on the GPU machine:
#   OUT=DIR DEADLINE_S=480 scripts/gpu_train_teachers.sh ARCH...      (vit_cifar10 or a train_teacher.py arch)
# Needs in .gpu/ (ignored by git, named in the device tool's carry): cifar10-train-jpeg.npz (the shared train split
# packed by scripts/pack_split.py; the test split stays here), models/resnet20_cifar10.pt (the ViT's distillation teacher) and wheels/
# (pytorchcv). The archs train side by side, each with the committed recipe (the docstrings of
# scripts/train_teacher.py and scripts/train_vit_teacher.py); with no test split each run stops after its last epoch
# and leaves its state in .gpu/out/.<arch>.resume.pt, which is copied to $OUT (also at the deadline, unfinished).
# Back here: copy the states into models/ and rerun the same command with --data ../shared/data/cifar10-jpeg
# --out models/ (and --distill-from ../shared/models/resnet20_cifar10.pt): it resumes after the last epoch, computes
# the full test top-1 and writes models/<arch>.pt and .json (trained_on names the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/dfqbench-gpu}
DEADLINE_S=${DEADLINE_S:-480}
mkdir -p "$OUT" .gpu/out
if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site
fi
[[ -d .gpu/cifar10-jpeg/train ]] || "$PY" scripts/pack_split.py unpack .gpu/cifar10-train-jpeg.npz .gpu/cifar10-jpeg/train
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
t0=$(date +%s)
pids=()
for arch in "$@"; do
  if [[ $arch == vit_* ]]; then
    cmd=(scripts/train_vit_teacher.py --arch "$arch" --epochs 50 --distill-from .gpu/models/resnet20_cifar10.pt)
  else
    cmd=(scripts/train_teacher.py --arch "$arch" --epochs 12)
  fi
  "$PY" "${cmd[@]}" --data .gpu/cifar10-jpeg --out .gpu/out --device cuda --threads 2 > "$OUT/$arch.log" 2>&1 &
  pids+=($!)
done
while (( $(date +%s) - t0 < DEADLINE_S )); do
  running=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
  (( running )) || break
  sleep 5
done
cp .gpu/out/.*.resume.pt "$OUT/" 2>/dev/null
for f in "$OUT"/.*.resume.pt; do [[ -e $f ]] && mv "$f" "$OUT/${f##*/.}"; done  # names without a leading dot
tail -n 3 "$OUT"/*.log
ls -la "$OUT"
