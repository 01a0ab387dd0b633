"""Benchmark: ZeroQ data distillation for one batch (paper settings) and FP32 vs quantized eval throughput.

    python scripts/bench_zeroq.py [--checkpoint PATH] [--data ROOT] [--images N] [--threads T]

Everything is measured in this one run on this machine; the quantized/FP32 throughput ratio is the figure to
compare across machines, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from omegaconf import OmegaConf

from dfqbench.data import load_eval_set
from dfqbench.evaluate import evaluate
from dfqbench.models import load_model
from dfqbench.quant import Convention, quantize_model
from dfqbench.quant.calibration.calibrate import calibrate_on_batches
from dfqbench.synth.bn_distill import DistillSettings, distill_bn_data

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=os.path.join(os.environ.get("DFQ_MODELS_DIR", "../shared/models"),
                                                              "resnet20_cifar10.pt"))
    parser.add_argument("--data", default=os.environ.get("DFQ_CIFAR10_ROOT", "../shared/data/cifar10-jpeg"))
    parser.add_argument("--images", type=int, default=2000, help="test images per throughput measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model_cfg = OmegaConf.merge(OmegaConf.load(os.path.join(CONF, "model", "pytorchcv.yaml")),
                                {"arch": "resnet20_cifar10", "checkpoint": args.checkpoint, "num_classes": 10})
    data_cfg = OmegaConf.merge(OmegaConf.load(os.path.join(CONF, "dataset", "cifar10.yaml")),
                               {"root": args.data, "max_samples": args.images})
    model = load_model(model_cfg).model.to(memory_format=torch.channels_last).eval()
    data = load_eval_set(data_cfg, data_cfg.mean, data_cfg.std, ".cache/dfqbench")
    evaluate(model, data, 500, device)  # warm-up

    settings = DistillSettings()  # ZeroQ: one batch of 32, 500 Adam steps at lr 0.5
    t0 = time.perf_counter()
    batches = distill_bn_data(model, (3, 32, 32), settings, torch.Generator().manual_seed(0), device)
    distill_s = time.perf_counter() - t0
    qmodel = quantize_model(copy.deepcopy(model), Convention.from_dict({"name": "gdfq"}), args.bits, args.bits)
    calibrate_on_batches(qmodel, batches)

    fp32 = evaluate(model, data, 500, device)
    quant = evaluate(qmodel, data, 500, device)
    print(f"threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"| stage | result |\n|---|---|")
    print(f"| ZeroQ distillation, 1 batch x {settings.batch_size} images x {settings.iterations} steps "
          f"| {distill_s:.1f} s (target < 60 s: {'met' if distill_s < 60 else 'NOT met'}) |")
    print(f"| FP32 eval ({fp32['n']} images) | {fp32['images_per_s']:.0f} images/s, top-1 {fp32['top1']:.2f} |")
    print(f"| W{args.bits}A{args.bits} fake-quant eval (gdfq) | {quant['images_per_s']:.0f} images/s, "
          f"top-1 {quant['top1']:.2f} |")
    print(f"| quantized / FP32 throughput | {quant['images_per_s'] / fp32['images_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
