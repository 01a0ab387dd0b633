#!/usr/bin/env bash
# GPU check of the Triton fake-quant backend; installs nothing. From the repository root:
#   PY=.venv/bin/python scripts/gpu_check.sh [extra bench_fakequant.py arguments]
# 1. the kernel tests natively on the GPU (TRITON_INTERPRET unset: compiled kernels on CUDA tensors, compared
#    bit for bit with the ATen built-ins), plus the quantizer tests;
# 2. the bandwidth benchmark (ATen vs Triton vs copy, 2M..256M elements, and ResNet-20 FP32 vs W4A4),
#    written to results/bench/fakequant_<gpu-name>.md.
set -euo pipefail
PY=${PY:-python}
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET

"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch; nothing to check")
try:
    import triton
except ImportError as exc:
    sys.exit(f"gpu_check: triton does not import ({exc}); the Triton backend needs it")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
EOF

echo "gpu_check: kernel tests (native)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_quantizers.py

gpu=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9.-]+', '_', torch.cuda.get_device_name(0)).strip('_'))")
out="results/bench/fakequant_${gpu}.md"
mkdir -p results/bench
echo "gpu_check: benchmark"
"$PY" scripts/bench_fakequant.py --out "$out" "$@"
echo "gpu_check: wrote $out"
