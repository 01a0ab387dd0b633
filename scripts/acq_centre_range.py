"""ACQ's attention-centre range from the teacher alone (data-free): distill images from the teacher's BN
statistics (ZeroQ's synthesis), take the centre of mass of the teacher's last-stage attention map on each, and
print the spread. conf/method/acq.yaml's generator.centre_range (0.25) is the rounded 5-95% half-range.

    python scripts/acq_centre_range.py --model resnet20_cifar10 --batches 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from dfqbench.feature_taps import StageTap
from dfqbench.methods.acq import attention_centre, spatial_attention
from dfqbench.models import load_model
from dfqbench.synth.bn_distill import DistillSettings, distill_bn_data

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20_cifar10")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}"])
    model = load_model(cfg.model, cfg.paths.models_dir).model.eval()
    size = int(cfg.dataset.image_size)
    images = distill_bn_data(model, (3, size, size), DistillSettings(num_batches=args.batches),
                             torch.Generator().manual_seed(args.seed), torch.device("cpu"))
    tap = StageTap(model)
    with torch.inference_mode():
        centres = []
        for x in images:
            model(x)
            centres.append(attention_centre(spatial_attention(tap.value[-1])))
    c = torch.cat(centres)
    lo, hi = torch.quantile(c, torch.tensor([0.05, 0.95]), dim=0)
    print(f"{args.model}: {len(c)} distilled images, last-stage attention centre (x, y): std "
          f"{c.std(0).tolist()}, 5% {lo.tolist()}, 95% {hi.tolist()}; 5-95% half-range "
          f"{float((hi - lo).mean() / 2):.3f}")


if __name__ == "__main__":
    main()
