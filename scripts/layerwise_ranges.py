"""LayerWise's layer-wise data against real activations: for every ReLU output of the preconditioned teacher (ReLU6
-> ReLU, BN folded, cross-layer equalization, high-bias absorption: conf/method/layerwise.yaml's defaults), the
upper clip a range estimator picks on the method's Gaussian layer-wise data (per-channel N(beta, gamma^2) of the
BN-derived statistics, through the ReLU) and on real test images, and the share of real activations above the
Gaussian clip. Diagnostic only (it reads test images); results/explore/layerwise-brecq-estimator/ uses it.

    python scripts/layerwise_ranges.py [--bits 4] [--lp 2.4] [--images 256] [--out ranges.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.fx.interpreter import Interpreter

from dfqbench.data import load_eval_set
from dfqbench.models import load_model
from dfqbench.quant.calibration.layerwise import node_shapes, sample_gaussian
from dfqbench.quant.quantizers.ranges import estimate_range
from dfqbench.quant.transforms.bn_stats import BNStatistics
from dfqbench.quant.transforms.graph import relu_kind
from dfqbench.quant.transforms.precondition import precondition
from dfqbench.runner import data_shape

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ReluOutputs(Interpreter):
    """A forward that keeps every ReLU node's output."""

    def __init__(self, gm):
        super().__init__(gm)
        self.outputs = {}

    def run_node(self, n):
        out = super().run_node(n)
        if relu_kind(self.module, n):
            self.outputs[n] = out.detach()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20_cifar10")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--lp", type=float, default=2.4, help="the mse estimator's norm (quant=brecq: 2.4)")
    ap.add_argument("--images", type=int, default=256, help="real test images and Gaussian samples per site")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="also write the table here")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", [f"model={args.model}", "method=layerwise"])
    m = cfg.method
    net = load_model(cfg.model, cfg.paths.models_dir).model.eval()
    gm = precondition(net, m.relu6_to_relu, m.equalize, m.equalize_iterations, m.equalize_tol, m.equalize_range,
                      m.absorb_bias, m.absorb_k_std).gm
    norm = cfg.model.normalize or cfg.dataset
    data = load_eval_set(cfg.dataset, norm.mean, norm.std, cfg.paths.cache_dir)
    stats, shapes = BNStatistics(gm), node_shapes(gm, tuple(data_shape(data, cfg)))
    x, _ = next(iter(data.batches(args.images)))
    real = ReluOutputs(gm)
    with torch.no_grad():
        real.run(x)
    g = torch.Generator().manual_seed(args.seed)
    lines = [f"| ReLU output | mse clip, Gaussian data | mse clip, real | real above it (%) | minmax, Gaussian data "
             f"| real 99.99th pct |", "| --- | --- | --- | --- | --- | --- |"]
    for node, act in real.outputs.items():
        gauss = torch.relu(sample_gaussian(stats.of(node.args[0]), shapes[node.args[0]][1:], args.images, g))
        hg = estimate_range(gauss, "mse", args.bits, True, lp=args.lp)[1].item()
        hr = estimate_range(act, "mse", args.bits, True, lp=args.lp)[1].item()
        sample = act.flatten()[torch.randperm(act.numel(), generator=g)[:1_000_000]]
        lines.append(f"| {node.name} | {hg:.2f} | {hr:.2f} | {(act > hg).float().mean().item() * 100:.2f} | "
                     f"{gauss.max().item():.2f} | {torch.quantile(sample, 0.9999).item():.2f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
