#!/usr/bin/env bash
# Every training method, and ZeroQ PTQ for reference, from the CLI on a trained teacher that none of them was
# developed on: pytorchcv's preresnet20_cifar10 (pre-activation blocks: BN and ReLU before each convolution),
# trained here from scratch by scripts/train_teacher.py (EPOCHS, default 4) on the train split of the CIFAR-10
# copy (DFQ_CIFAR10_ROOT). W4A4, convention gdfq, schedule `quick` (minutes per method: a check, not a
# baseline), an evenly strided slice of 2,000 test images. Writes results/explore/unseen-teacher/: the teacher
# (.pt, .json), one <method>.record.json per method (renamed so that `make tables` does not collect them) and
# README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ARCH=${ARCH:-preresnet20_cifar10}
OUT=results/explore/unseen-teacher
DATA=${DFQ_CIFAR10_ROOT:?set DFQ_CIFAR10_ROOT to the CIFAR-10 ImageFolder copy}
METHODS=${METHODS:-zeroq,gdfq,qimera,ait,qimera_ait,arc,arc_ait,adasg,adadfq,zaq,intraq,hast,dfqf}
[[ -f $OUT/$ARCH.pt ]] || "$PY" scripts/train_teacher.py --arch "$ARCH" --data "$DATA" --epochs "${EPOCHS:-4}" \
  --out "$OUT" --threads "${THREADS:-1}"
sha=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['sha256'])" "$OUT/$ARCH.json")
work=$(mktemp -d)
"$PY" -m dfqbench -m method="$METHODS" model=pytorchcv model.arch="$ARCH" model.checkpoint="$OUT/$ARCH.pt" \
  model.sha256="$sha" dataset=cifar10 quant=gdfq wbit=4 abit=4 seed=0 schedule=quick dataset.max_samples=2000 \
  paths.output_dir="$work" progress=false threads="${THREADS:-1}"
"$PY" - "$work" "$OUT" "$ARCH" <<'PYEOF'
import json, shutil, sys
from pathlib import Path

work, out, arch = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
teacher = json.loads((out / f"{arch}.json").read_text())
rows = []
for path in sorted(work.rglob("record.json")):  # METHODS=... reruns some: the table lists every method's record
    shutil.copy(path, out / f"{json.loads(path.read_text())['method']}.record.json")
for path in sorted(out.glob("*.record.json")):
    r = json.loads(path.read_text())
    seconds = (r.get("info", {}).get("training") or {}).get("train_time_s")
    rows.append(f"| {r['method']} | {r['fp32_top1']:.2f} | {r['top1']:.2f} | {r['fp32_top1'] - r['top1']:.2f} | "
                f"{'' if seconds is None else f'{seconds:.0f}'} |")
(out / "README.md").write_text(
    f"# Every training method on a teacher none of them was developed on\n\n"
    f"Written by `scripts/check_unseen_teacher.sh`. Teacher: pytorchcv `{arch}` trained from scratch for "
    f"{teacher['epochs']} epochs by `scripts/train_teacher.py` (test top-1 {teacher['test_top1']:.2f} on the full "
    f"test set; sha256 {teacher['sha256'][:12]}...). Runs: W4A4, convention gdfq, schedule `quick` "
    f"(3 x 10 iterations of batch 32: a check that each method runs end to end and what it does to the student "
    f"in minutes, not a baseline), seed 0, evaluated on an evenly strided slice of 2,000 test images.\n\n"
    "| method | FP32 top-1 | W4A4 top-1 | drop | training s |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
print(f"{len(rows)} records -> {out}")
PYEOF
rm -rf "$work"
