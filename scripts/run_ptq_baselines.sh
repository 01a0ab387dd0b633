#!/usr/bin/env bash
# Regenerate the post-training family's records on the ResNet-20 CIFAR-10 teacher (full test set) into
# results/sweeps/...: every method at W8A8/W6A6/W5A5/W4A4 under gdfq, brecq and its own preset; seeds 0,1,2 for
# the stochastic ones; reconstruction (genie) under brecq at W4A4 (3 seeds), W5A5 and W8A8 (1 seed).
# Finished runs (same run fingerprint: docs/running.md) are skipped on a rerun. STAGES="dsg genie" picks stages (default: all);
# arguments are passed to every sweep (e.g. threads=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
base=(model=resnet20_cifar10 dataset=cifar10 paths.output_dir=results progress=false "$@")  # "$@": e.g. threads=1
common=("${base[@]}" 'abit=${wbit}')
bits=wbit=8,6,5,4
stage() { [[ " ${STAGES:-all} " == *" all "* || " ${STAGES:-all} " == *" $1 "* ]]; }
if stage deterministic; then
  "$PY" -m dfqbench -m method=aciq,spiq,powerquant,rex quant=gdfq,brecq $bits "${common[@]}"
  "$PY" -m dfqbench -m method=aciq quant=aciq $bits "${common[@]}"
  "$PY" -m dfqbench -m method=ocs quant=gdfq,brecq,ocs $bits "${common[@]}"
  "$PY" -m dfqbench -m method=squant quant=gdfq,brecq,squant $bits "${common[@]}"
  # the papers' mixed widths: OCS's W4A8, ACIQ's W8A4
  "$PY" -m dfqbench -m method=ocs quant=gdfq,brecq,ocs wbit=4 abit=8 "${base[@]}"
  "$PY" -m dfqbench -m method=aciq quant=gdfq,brecq,aciq wbit=8 abit=4 "${base[@]}"
fi
if stage dsg; then
  "$PY" -m dfqbench -m method=dsg quant=gdfq,brecq $bits seed=0,1,2 "${common[@]}"
fi
if stage crossdomain; then  # the calibration-source study at the ends of the range: W8A8 and W4A4
  # other_domain: ImageNet images (DFQ_OTHER_DOMAIN_ROOT, default shared/data/imagenet-samples)
  export DFQ_OTHER_DOMAIN_ROOT=${DFQ_OTHER_DOMAIN_ROOT:-../shared/data/imagenet-samples}
  "$PY" -m dfqbench -m method=crossdomain method.calib_data=procedural,uniform_noise,other_domain,real \
    quant=gdfq,brecq wbit=8,4 seed=0,1,2 "${common[@]}"
fi
if stage genie; then
  "$PY" -m dfqbench -m method=genie quant=brecq wbit=4 seed=0,1,2 "${common[@]}"
  "$PY" -m dfqbench -m method=genie quant=brecq wbit=5,8 seed=0 "${common[@]}"  # W8A8: the 0.5-point check
fi
