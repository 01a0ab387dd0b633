#!/usr/bin/env bash
# Regenerate the foundation baselines on the ResNet-20 CIFAR-10 teacher (full test set):
# fp32, rtn, dfq x {W8A8, W6A6, W5A5, W4A4} x {gdfq, brecq}; zeroq the same with seeds 0, 1, 2.
# Records land in results/sweeps/...; finished runs (same run fingerprint: docs/running.md) are skipped on a rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
common=(model=resnet20_cifar10 dataset=cifar10 paths.output_dir=results progress=false)
"$PY" -m dfqbench -m method=fp32 quant=gdfq wbit=32 abit=32 "${common[@]}"
"$PY" -m dfqbench -m method=rtn,dfq quant=gdfq,brecq wbit=8,6,5,4 'abit=${wbit}' "${common[@]}"
"$PY" -m dfqbench -m method=zeroq quant=gdfq,brecq wbit=8,6,5,4 'abit=${wbit}' seed=0,1,2 "${common[@]}"
