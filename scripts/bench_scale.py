"""Benchmark: how the cost grows with the network: ZeroQ, SQuant and a GDFQ iteration on ResNet-20 (CIFAR, 32 px),
ResNet-18 and ResNet-50 (ImageNet shape, 224 px, random weights: the cost is the architecture's).

    python scripts/bench_scale.py [--models resnet20_cifar10 resnet18 resnet50] [--threads T] [--out FILE]

Per model, in this one run: ZeroQ's distillation step (batch 32, forward + backward + Adam; its paper budget is
500 steps, so the "paper budget" column is 500 x the step, an estimate), SQuant's whole quantization (data-free:
one pass over the weights, measured end to end) and one GDFQ trainer iteration after calibration (generator
step + student step; batch 32 on ImageNet shape as GDFQ's ImageNet files, the CIFAR schedule's 64 for ResNet-20;
the paper budget is 400 x 200 iterations on CIFAR, an estimate again). "x ResNet-20" is the ratio to the first
row, the figure to carry to another machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_qat import timed  # noqa: E402
from bench_report import emit  # noqa: E402  (scripts/ is on sys.path: run as a script)

from dfqbench.cpu_allocator import keep_freed_memory  # noqa: E402
from dfqbench.methods.base import QuantContext  # noqa: E402
from dfqbench.models import load_model  # noqa: E402
from dfqbench.quant import Convention, quantize_model, weight_quantizers  # noqa: E402
from dfqbench.runner import build_convention, build_method  # noqa: E402
from dfqbench.synth.bn_distill import DistillSettings, distill_bn_data  # noqa: E402
from dfqbench.train.generators import GENERATORS  # noqa: E402
from dfqbench.train.registry import build  # noqa: E402
from dfqbench.train.trainer import Trainer  # noqa: E402

SHAPES = {"resnet20_cifar10": ((3, 32, 32), 10, 64), "resnet18": ((3, 224, 224), 1000, 32),
          "resnet50": ((3, 224, 224), 1000, 32)}  # input, classes, GDFQ batch
PAPER_STEPS = {"zeroq": 500, "gdfq": 400 * 200}


def teacher_of(name: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", [f"model={name}", "model.pretrained=false", "model.checkpoint=null"])
    return cfg, load_model(cfg.model, cfg.paths.models_dir).model.eval().to(memory_format=torch.channels_last)


def zeroq_step_s(teacher, shape) -> float:
    def run(steps):
        t0 = time.perf_counter()
        distill_bn_data(teacher, shape, DistillSettings(iterations=steps), torch.Generator().manual_seed(0),
                        torch.device("cpu"))
        return time.perf_counter() - t0
    run(1)
    return (run(4) - run(1)) / 3  # the batch's set-up cancels


def squant_s(name: str, teacher, shape, classes) -> float:
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", [f"model={name}", "method=squant", "quant=squant", "wbit=4", "abit=4"])
    method = build_method(cfg)
    ctx = QuantContext(build_convention(cfg, method), 4, 4, 0, torch.device("cpu"), shape, classes, progress=False)
    t0 = time.perf_counter()
    method.quantize(copy.deepcopy(teacher), ctx)
    return time.perf_counter() - t0


def gdfq_iteration_s(name: str, teacher, shape, classes, batch) -> float:
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", [f"model={name}", "method=gdfq", "quant=gdfq", "schedule=smoke",
                                 f"schedule.batch_size={batch}", "schedule.warmup_epochs=0"])
    method = build_method(cfg)
    spec = dict(method.generator_spec)
    fc = [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)][-1].weight.detach()
    generator = build(GENERATORS, spec.pop("name"), "generator", spec, num_classes=classes, image_shape=shape,
                      teacher_fc=fc)
    student = quantize_model(copy.deepcopy(teacher), Convention.from_dict(dict(cfg.quant)), 4, 4)
    for wq in weight_quantizers(student):
        wq.dynamic = True
    trainer = Trainer(copy.deepcopy(teacher), student, generator, method.generator_terms, method.student_terms,
                      method.schedule, method.settings, torch.device("cpu"), seed=0)
    trainer._set_rates(0)
    trainer._iteration(0, 0)  # epoch 0: calibration of the activation ranges
    trainer.observer.close()
    return timed(lambda: trainer._iteration(1, 0), 2, 1, torch.device("cpu"))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()[0]
    rows = []
    for name in a.models:
        shape, classes, batch = SHAPES[name]
        _, teacher = teacher_of(name)
        z = zeroq_step_s(teacher, shape)
        s = squant_s(name, teacher, shape, classes)
        g = gdfq_iteration_s(name, teacher, shape, classes, batch)
        rows.append((name, shape[1], z, s, g, batch))
        print(rows[-1], flush=True)
    base = rows[0]
    lines = [f"measured {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())} on {os.cpu_count()} CPU cores, "
             f"{torch.get_num_threads()} threads, load average at start {load:.2f}; torch {torch.__version__}", "",
             "| model | input px | ZeroQ step s (x ResNet-20) | ZeroQ paper budget (500 steps), est. | "
             "SQuant W4 s (x ResNet-20) | GDFQ iteration s, batch (x ResNet-20) | GDFQ 80,000 iterations, est. |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, px, z, s, g, batch in rows:
        lines.append(f"| {name} | {px} | {z:.3f} ({z / base[2]:.0f}x) | {z * PAPER_STEPS['zeroq'] / 60:.1f} min | "
                     f"{s:.2f} ({s / base[3]:.1f}x) | {g:.3f}, {batch} ({g / base[4]:.0f}x) | "
                     f"{g * PAPER_STEPS['gdfq'] / 3600:.1f} h |")
    emit(lines, a.out)


if __name__ == "__main__":
    main()
