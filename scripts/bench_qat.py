"""Benchmark: iterations/s of the generator-QAT trainer on ResNet-20 (CIFAR-10), beside FP32 in the same run.

    python scripts/bench_qat.py [--batch 200] [--iters 5] [--threads T] [--device cpu|cuda] [--bits 4]
                                [--methods gdfq,ait] [--memory-format channels_last|contiguous]
                                [--backend auto|torch|triton] [--compile none,default,reduce-overhead]
                                [--precisions fp32,bf16] [--out FILE]

Rows (all on the same batch size, measured in this process one after another):
- FP32 fwd+bwd: the float ResNet-20 in eval mode, forward + backward of a cross-entropy loss: the baseline.
- W{b}A{b} fwd+bwd: the fake-quantized student (convention gdfq: per-channel weights re-quantized every
  forward, calibrated activation ranges) doing the same. Target: at most 1.5x the FP32 time.
- trainer iteration (<method>): one full iteration of dfqbench.train.Trainer after calibration: generator
  forward, teacher forward + backward to the images, generator Adam step, student forward + backward + SGD step
  (+ AIT's gradient inundation for `ait`). With --compile, one row per torch.compile mode (config `compile`:
  the trainer compiles its teacher, student and generator in place); a compiled row is timed after
  --compile-warmup iterations, which compile and, for reduce-overhead, record the CUDA graphs. With
  --precisions, one row per precision (config `precision`: bf16 runs the teacher and generator under autocast).
The "x FP32" column is the number to compare across machines, not the seconds. The teacher is the shared
checkpoint when $DFQ_MODELS_DIR has it, else pytorchcv's architecture with random weights (same cost).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from dfqbench import precision  # noqa: E402
from dfqbench.methods.qat import GeneratorQAT  # noqa: E402
from dfqbench.models import load_model  # noqa: E402
from dfqbench.quant import Convention, quantize_model, weight_quantizers  # noqa: E402
from dfqbench.quant.kernels.backend import resolve_backend_name, use_backend  # noqa: E402
from dfqbench.quant.calibration.calibrate import calibrate_on_batches  # noqa: E402
from dfqbench.runner import build_method  # noqa: E402
from dfqbench.train.generators import GENERATORS  # noqa: E402
from dfqbench.train.registry import build  # noqa: E402
from dfqbench.train.trainer import Trainer  # noqa: E402


def timed(fn, iters: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(median wall seconds, mean process CPU seconds) per call of `fn` after `warmup` calls. On a shared CPU
    machine the CPU time is the steadier figure: other jobs stretch the wall time, not this process's CPU time."""
    for _ in range(warmup):
        fn()
    times = []
    cpu0 = time.process_time()
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], (time.process_time() - cpu0) / iters


def fwd_bwd(model, x, y):
    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return step


def trainer_for(method: GeneratorQAT, teacher, convention, bits, device, batch, compile_mode="none") -> Trainer:
    spec = dict(method.generator_spec)
    generator = build(GENERATORS, spec.pop("name"), "generator", spec, num_classes=10, image_shape=(3, 32, 32),
                      teacher_fc=[m for m in teacher.modules() if isinstance(m, torch.nn.Linear)][-1].weight.detach())
    student = quantize_model(copy.deepcopy(teacher), convention, bits, bits)
    for wq in weight_quantizers(student):
        wq.dynamic = True
    return Trainer(copy.deepcopy(teacher), student, generator, method.generator_terms, method.student_terms,
                   method.schedule, method.settings, device, seed=0, compile_mode=compile_mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=200, help="GDFQ's CIFAR batch size (paper schedule)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--methods", default="gdfq,ait")
    parser.add_argument("--memory-format", default="channels_last", choices=("channels_last", "contiguous"))
    parser.add_argument("--backend", default="auto", help="fake-quant kernels (quant.backend): auto, torch, triton")
    parser.add_argument("--compile", default="none",
                        help="comma-separated torch.compile modes of the trainer rows (none = eager), e.g. "
                             "none,default,reduce-overhead")
    parser.add_argument("--compile-warmup", type=int, default=8)
    parser.add_argument("--precisions", default="fp32", help="comma-separated precisions of the trainer rows "
                        f"({', '.join(precision.PRECISIONS)})")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    backend = resolve_backend_name(args.backend, torch.device(args.device))
    with use_backend(backend):
        report = measure(args)
    report[0] += f", backend {backend}"
    print("\n".join(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(report) + "\n")


def measure(args) -> list[str]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    overrides = ["model=resnet20_cifar10", "schedule=smoke", f"schedule.batch_size={args.batch}",
                 "schedule.warmup_epochs=0"]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        base = compose("config", overrides)
        methods = {name: build_method(compose("config", overrides + [f"method={name}"]))
                   for name in args.methods.split(",") if name}
    loaded = load_model(base.model, base.paths.models_dir)
    teacher = loaded.model.to(device).to(memory_format=fmt).eval()
    convention = Convention.from_dict(dict(base.quant))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)

    fp32 = copy.deepcopy(teacher)
    t_fp32 = timed(fwd_bwd(fp32, x, y), args.iters, args.warmup, device)
    quant = quantize_model(copy.deepcopy(teacher), convention, args.bits, args.bits)
    for wq in weight_quantizers(quant):
        wq.dynamic = True
    calibrate_on_batches(quant, [x])
    t_quant = timed(fwd_bwd(quant.eval(), x, y), args.iters, args.warmup, device)
    rows = [("FP32 fwd+bwd (baseline)", t_fp32), (f"W{args.bits}A{args.bits} fwd+bwd (fake-quant student)", t_quant)]
    runs = [(name, method, mode, p) for name, method in methods.items() for mode in args.compile.split(",")
            for p in args.precisions.split(",")]
    for name, method, mode, prec in runs:
        with precision.scope(prec):  # the trainer takes its autocast at construction
            trainer = trainer_for(method, teacher, convention, args.bits, device, args.batch, mode)
        trainer._set_rates(0)
        trainer._iteration(0, 0)  # epoch 0: EMA calibration of the activation ranges
        trainer.observer.close()
        extra = "".join(f", {e}" for e in (f"compile {mode}" if mode != "none" else "", prec if prec != "fp32" else "")
                        if e)
        label = f"trainer iteration ({name}{extra})"
        warmup = args.warmup if mode == "none" else max(args.warmup, args.compile_warmup)
        t0 = time.perf_counter()
        try:
            rows.append((label, timed(lambda: trainer._iteration(1, 0), args.iters, warmup, device)))
        except Exception as exc:  # a mode this torch cannot compile: say so in the table, go on
            print(f"{label}: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append((f"{label}: failed ({type(exc).__name__})", (float("nan"), float("nan"))))
        print(f"{label}: {time.perf_counter() - t0:.1f} s with warm-up", file=sys.stderr)

    threads = torch.get_num_threads()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    lines = [f"ResNet-20 CIFAR-10, batch {args.batch}, {device.type} ({threads} threads{load}), "
             f"{args.memory_format}, weights {loaded.weights}, torch {torch.__version__}", "",
             "| what | wall s / iteration | iterations / s | x FP32 (wall) | CPU s / iteration | x FP32 (CPU) |",
             "|---|---|---|---|---|---|"]
    for label, (wall, cpu) in rows:
        lines.append(f"| {label} | {wall:.4f} | {1 / wall:.2f} | {wall / t_fp32[0]:.2f} | {cpu:.4f} | "
                     f"{cpu / t_fp32[1]:.2f} |")
    key = 1 if device.type == "cpu" else 0  # on CPU the process time, on GPU the wall time
    ratio = t_quant[key] / t_fp32[key]
    lines += ["", f"quantized / FP32 fwd+bwd = {ratio:.2f} ({'CPU' if key else 'wall'} time; target <= 1.5: "
                  f"{'met' if ratio <= 1.5 else 'NOT met'})"]
    gdfq = [(label, 1 / wall) for label, (wall, _) in rows if label.startswith("trainer iteration (gdfq") and wall == wall]
    if device.type == "cuda" and gdfq:
        label, best = max(gdfq, key=lambda r: r[1])
        lines.append(f"fastest GDFQ trainer iteration: {best:.1f} iterations/s, {label} (target >= 100 on a GPU: "
                     f"{'met' if best >= 100 else 'NOT met'}); schedule=paper (80,000 iterations) would take "
                     f"{80000 / best / 60:.1f} min (target <= 14)")
    return lines


if __name__ == "__main__":
    main()
