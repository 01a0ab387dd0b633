#!/usr/bin/env bash
# re-runs after the 2026-12-03 parity fixes (W4A4, quant=gdfq, schedule cpu, CPU, 1 thread)
cd /work/main
export DFQ_CIFAR10_ROOT=/work/shared/data/cifar10-jpeg DFQ_MODELS_DIR=/work/shared/models DFQ_CACHE_DIR=/work/main/.cache/dfqbench OMP_NUM_THREADS=1
common=(model=resnet20_cifar10 dataset=cifar10 paths.output_dir=results progress=false threads=1 quant=gdfq wbit=4 abit=4)
for job in hast:0 qimera_ait:0 intraq:0 hast:1 hast:2 ait:0 qimera:0 zaq:0 adasg:0 adadfq:0 arc:0 arc_ait:0 qimera_ait:1 qimera_ait:2 intraq:1 intraq:2; do
  m=${job%:*}; s=${job#*:}
  echo "=== $(date -u +%H:%M:%S) $m seed $s"
  .venv/bin/python -m dfqbench -m method=$m seed=$s "${common[@]}"
done
echo "=== $(date -u +%H:%M:%S) lane done"
