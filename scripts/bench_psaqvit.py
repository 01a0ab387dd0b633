"""Benchmark: PSAQ-ViT synthesis at the paper's budget (one batch of 32, 2 x 500 steps) on the CIFAR-10 ViT,
beside a plain forward+backward of the same batch through the same teacher, and the official loss's broadcast
cosine similarity beside dfqbench's normalize-then-matmul, all in this one run.

    python scripts/bench_psaqvit.py [--checkpoint models/vit_cifar10.pt] [--steps N] [--threads T]
                                    [--out results/bench/bench_psaqvit.md]

The ratios are the figures to compare across machines; the full-budget seconds are measured over --steps steps
and scaled to 1000 (the loop is the same every step), unless --steps 1000.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from bench_report import emit
from dfqbench.archs import vit_cifar10
from dfqbench.synth.patch_similarity import PSAQSettings, PatchFeatures, kde_entropy, psaq_images

PAPER_STEPS = 1000  # 2 rounds x 500 iterations


def _seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/vit_cifar10.pt", help="random weights when missing")
    parser.add_argument("--steps", type=int, default=50, help="synthesis steps timed (scaled to the paper's 1000)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = vit_cifar10().eval()
    weights = "random weights"
    if os.path.exists(args.checkpoint):
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
        weights = args.checkpoint
    load = os.getloadavg()[0]
    s = PSAQSettings()
    x = torch.randn(s.batch_size, 3, 32, 32, requires_grad=True)

    def fwd_bwd():
        F.cross_entropy(model(x), torch.zeros(s.batch_size, dtype=torch.long)).backward()

    plain_s = _seconds(fwd_bwd, 10)

    def loss_step(fast: bool):
        with PatchFeatures(model) as patches:
            model(x)
            total = 0
            for f in patches.features:
                sims = torch.cosine_similarity(f.unsqueeze(1), f.unsqueeze(2), dim=3).flatten(1) if not fast else \
                    (F.normalize(f, dim=-1) @ F.normalize(f, dim=-1).transpose(1, 2)).flatten(1)
                total = total + kde_entropy(sims, s.bandwidth, s.kde_points)
            (-total).backward()

    official_loss_s = _seconds(lambda: loss_step(False), 3)
    fast_loss_s = _seconds(lambda: loss_step(True), 10)
    steps = max(1, min(args.steps, PAPER_STEPS))
    timed = PSAQSettings(rounds=1, iterations=steps)
    lo, hi = torch.full((3,), -2.0), torch.full((3,), 2.2)
    t0 = time.perf_counter()
    psaq_images(model, (3, 32, 32), 10, lo, hi, timed, torch.Generator().manual_seed(0), "cpu")
    step_s = (time.perf_counter() - t0) / steps
    full_s = step_s * PAPER_STEPS
    threads = torch.get_num_threads()
    lines = [f"measured {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}; load average at start {load:.2f} on "
             f"{os.cpu_count()} cores; threads {threads}; torch {torch.__version__}; teacher vit_cifar10 "
             f"({weights}); batch {s.batch_size} images 32x32", "",
             "| stage | seconds | ratio |", "|---|---|---|",
             f"| plain forward+backward of the batch (CE) | {plain_s:.3f} | 1.00x |",
             f"| PSAQ-ViT loss step, dfqbench (normalize + matmul similarities) | {fast_loss_s:.3f} | "
             f"{fast_loss_s / plain_s:.2f}x |",
             f"| PSAQ-ViT loss step, official broadcast cosine_similarity | {official_loss_s:.3f} | "
             f"{official_loss_s / plain_s:.2f}x |",
             f"| PSAQ-ViT synthesis step (jitter, loss, Adam, clamp), mean of {steps} | {step_s:.3f} | "
             f"{step_s / plain_s:.2f}x |",
             f"| PSAQ-ViT synthesis, paper budget ({PAPER_STEPS} steps){' (scaled)' if steps < PAPER_STEPS else ''} "
             f"| {full_s:.1f} | {full_s / plain_s:.0f}x |"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
