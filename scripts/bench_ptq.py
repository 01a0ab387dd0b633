"""Benchmark: wall time to quantize ResNet-20 (CIFAR-10) with each post-training method, and the top-1 it reaches.

    python scripts/bench_ptq.py [--methods squant,zeroq,...] [--bits 4] [--images N] [--threads T] [--out FILE]

Every method runs through the same runner as the CLI (`force=true`, a fresh cache so distilled data is not
reused), each under its own convention preset. The baseline measured in the same run is one FP32 pass over the
evaluation images: the "x FP32 eval" column is the figure to compare across machines, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from dfqbench.runner import run  # noqa: E402

# method -> (preset, extra overrides); the preset is the method's own convention (C2 for reconstruction)
PLAN = {
    "rtn": ("gdfq", []), "dfq": ("dfq", []), "aciq": ("aciq", []), "ocs": ("ocs", []), "spiq": ("gdfq", []),
    "squant": ("squant", []), "powerquant": ("gdfq", []), "rex": ("gdfq", []), "zeroq": ("gdfq", []),
    "dsg": ("gdfq", []), "crossdomain": ("gdfq", ["method.calib_data=procedural"]), "genie": ("brecq", []),
}
# the targets: seconds to quantize (and, for reconstruction, the largest drop from FP32)
TARGETS = {"squant": (1.0, None), "zeroq": (60.0, None), "dsg": (60.0, None), "genie": (900.0, 2.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(PLAN))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--images", type=int, default=0, help="test images for the top-1 (0 = all 10,000)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in PLAN]
    if unknown:
        sys.exit(f"bench_ptq: error: unknown method(s) {unknown}; choose from: {', '.join(PLAN)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_ptq-"))
    common = ["model=resnet20_cifar10", "dataset=cifar10", "progress=false", "force=true",
              f"paths.cache_dir={work / 'cache'}", f"wbit={args.bits}", f"abit={args.bits}", "seed=0"]
    if args.images:
        common.append(f"dataset.max_samples={args.images}")
    rows = []
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        fp32 = run(compose("config", common + ["method=fp32", "quant=gdfq", "wbit=32", "abit=32"]), work / "fp32")
        fp32_eval_s = fp32["n_test"] / fp32["eval_images_per_s"]
        for name in methods:
            preset, extra = PLAN[name]
            t0 = time.perf_counter()
            rec = run(compose("config", common + [f"method={name}", f"quant={preset}", *extra]), work / name)
            wall = time.perf_counter() - t0
            limit, max_drop = TARGETS.get(name, (None, None))
            verdict = ""
            if limit is not None:
                ok = rec["quantize_time_s"] < limit and (max_drop is None or rec["drop"] < max_drop)
                verdict = ("met" if ok else "NOT met") + f" (< {limit:g} s" + (
                    f", drop < {max_drop:g}" if max_drop is not None else "") + ")"
            rows.append(f"| {rec['method']} | {preset} | {rec['quantize_time_s']:.2f} | "
                        f"{rec['quantize_time_s'] / fp32_eval_s:.2f} | {wall:.1f} | {rec['top1']:.2f} | "
                        f"{rec['drop']:.2f} | {verdict} |")
            print(rows[-1], flush=True)
    table = [f"W{args.bits}A{args.bits}, ResNet-20 CIFAR-10 teacher (FP32 top-1 {fp32['top1']:.2f} on "
             f"{fp32['n_test']} test images), {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"FP32 eval of those images: {fp32_eval_s:.2f} s (the baseline, same run).", "",
             "| method | preset | quantize s | x FP32 eval | run wall s | top-1 | drop | target |",
             "|---|---|---|---|---|---|---|---|", *rows]
    print("\n".join(table))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
