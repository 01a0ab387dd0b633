"""Benchmark: a sweep of post-training methods on one machine, one job after another vs all cores at once.

    python scripts/bench_sweep.py [--methods rtn dfq squant aciq] [--images 2000] [--out FILE]

Both sweeps run the same cells (W4A4, the ResNet-20 teacher, the first --images test images) into scratch folders
in this one run, each with a copy of the same warm cache (the decoded test set and the FP32 score, from a first
RTN run; no synthetic calibration data, so ZeroQ distils in both): first with Hydra's basic launcher and every core for each job (threads=<cores>), then with
hydra/launcher=local_parallel (n_jobs=<cores>) and no `threads`, so that each job takes its share of the cores
(runner.job_threads: cores // n_jobs; never jobs x threads > cores). Goal (issue 16): the parallel sweep faster
than one by one. Wall seconds of each whole sweep, Python start-up included; the top-1 of each cell must agree
between the two (the same computation), which the report checks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from bench_report import emit  # noqa: E402  (scripts/ is on sys.path: run as a script)


def sweep(out: Path, methods: list[str], images: int, parallel: bool, cores: int,
          warm_cache: Path | None = None) -> tuple[float, dict]:
    if warm_cache is not None:  # the decoded test set and the FP32 score, as a second sweep on a machine finds them
        shutil.copytree(warm_cache, out / "cache")
    args = [sys.executable, "-m", "dfqbench", "-m", f"method={','.join(methods)}", "quant=gdfq", "wbit=4", "abit=4",
            "model=resnet20_cifar10", "dataset=cifar10", f"dataset.max_samples={images}", f"paths.output_dir={out}",
            f"paths.cache_dir={out / 'cache'}",  # nothing read from an earlier sweep's cache
            "progress=false"]
    args += [f"hydra/launcher=local_parallel", f"hydra.launcher.n_jobs={cores}"] if parallel else [f"threads={cores}"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    t0 = time.perf_counter()
    subprocess.run(args, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    top1 = {}
    for path in out.rglob("record.json"):
        record = json.loads(path.read_text())
        top1[record["method"]] = (record["top1"], record.get("threads"))
    return wall, top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["zeroq", "ocs", "aciq", "dfq", "squant", "rtn"],
                        help="in launch order: the longest first, so that no core idles at the end")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        sweep(Path(tmp) / "warm", ["rtn"], a.images, False, cores)  # fills warm/cache: test set, FP32 score
        serial_s, serial = sweep(Path(tmp) / "serial", a.methods, a.images, False, cores, Path(tmp) / "warm" / "cache")
        parallel_s, parallel = sweep(Path(tmp) / "parallel", a.methods, a.images, True, cores,
                                     Path(tmp) / "warm" / "cache")
    same = all(serial[m][0] == parallel.get(m, (None,))[0] for m in serial) and len(serial) == len(a.methods)
    speedup = serial_s / parallel_s
    lines = [f"measured {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}; load average at start {load:.2f} on "
             f"{cores} cores", "",
             f"# Sweep of {len(a.methods)} post-training methods ({', '.join(a.methods)}), W4A4, {a.images} test images",
             "", "| sweep | jobs at once x threads per job | wall s |", "|---|---|---:|",
             f"| one by one (basic launcher) | 1 x {cores} | {serial_s:.1f} |",
             f"| local_parallel | {cores} x {sorted({t for _, t in parallel.values()})} | {parallel_s:.1f} |",
             "", f"one by one / parallel = {speedup:.2f}x (goal > 1x with jobs x threads <= cores: "
             f"{'met' if speedup > 1 else 'NOT met'}); same top-1 in every cell: {same}", "",
             "Both use every core and no more. Parallel jobs win only what one job's threads leave idle (start-up, "
             "Python between kernels); the sweep's longest job bounds the parallel wall time, hence the launch "
             "order, longest first.",
             "", "| method | top-1 one by one | top-1 parallel |", "|---|---:|---:|"]
    lines += [f"| {m} | {serial[m][0]:.2f} | {parallel.get(m, (float('nan'),))[0]:.2f} |" for m in sorted(serial)]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
