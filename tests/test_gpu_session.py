"""scripts/gpu_session.sh's plumbing, without a GPU (DRY=1: CPU, smoke schedule, 200 test images)."""

import os
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO


@pytest.mark.slow
def test_dry_gpu_session_brings_back_its_records_and_benchmark(tmp_path, cifar10_root, teacher):
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path / "out"), "PY": sys.executable, "DEADLINE_S": "300",
           "LANES": "long_gdfq", "BACKENDS": "torch", "BENCH_METHODS": "gdfq", "FAKEQUANT": "0",
           "KERNEL_TESTS": "0", "DFQ_CIFAR10_ROOT": str(cifar10_root), "DFQ_MODELS_DIR": str(teacher.parent)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_session.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    assert "trainer iteration (gdfq)" in (out / "bench_qat_gpu_torch.md").read_text()
    records = (out / "records.txt").read_text().split()
    assert len(records) == 1 and records[0].endswith("gdfq/w4a4-s0-smoke/record.json")
    with tarfile.open(out / "records.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("w4a4-s0-smoke/record.json") for n in names)
    assert any(n.endswith("gpu-long_gdfq.log") for n in names)
