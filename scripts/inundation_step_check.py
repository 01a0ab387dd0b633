"""How far AIT's gradient inundation moves when it scales the difference of the stored float32 weights
(w_new - w_old, dfqbench before 88b94d9) instead of SGD's own step (-lr * the Nesterov direction, as the code's
SGD_adalr and dfqbench now do), on the teacher's W4A4 student (quant=gdfq, activation ranges observed on a test
batch) at each learning rate a schedule reaches: the cpu schedule's 1e-4 and 1e-5, the paper's down to 1e-7.
Three KD steps per rate (T 20, element mean x T^2, SGD Nesterov 0.9, the threshold 1e-3 decayed with the rate);
for every quantized tensor and step, the ratio of the two scales and the cosine of the two applied steps.

    python scripts/inundation_step_check.py [--out results/explore/inundation-step/check.json]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dfqbench.data import load_eval_set
from dfqbench.models import load_model
from dfqbench.quant import Convention, act_quantizers, quantize_model
from dfqbench.train.inundation import GradientInundation, sgd_step

REPO = Path(__file__).resolve().parents[1]
RATES = (1e-4, 1e-5, 1e-6, 1e-7)


def observed_student(teacher, conv, x):
    student = quantize_model(copy.deepcopy(teacher), conv, 4, 4)
    for q in act_quantizers(student):
        q.start_observing()
    with torch.no_grad():
        student(x)
    for q in act_quantizers(student):
        q.stop_observing()
    return student.eval()


def check_rate(teacher, conv, x, lr: float, steps: int = 3) -> dict:
    student = observed_student(teacher, conv, x)
    with torch.no_grad():
        target = F.softmax(teacher(x) / 20, 1)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True)
    gi = GradientInundation(student, threshold=1e-3 * lr / 1e-4, bisection_steps=5)
    ratios, cosines = [], []
    for step in range(steps):
        half = slice(64 * (step % 2), 64 * (step % 2) + 64)
        loss = F.kl_div(F.log_softmax(student(x[half]) / 20, 1), target[half], reduction="mean") * 400
        opt.zero_grad()
        loss.backward()
        before = gi.snapshot()
        opt.step()
        for layer, w0 in zip(gi.layers, before):
            exact, stored = sgd_step(opt, layer.weight, w0), layer.weight.detach() - w0
            a_exact = gi.scale_for(w0, exact, layer.weight_quantizer)
            a_stored = gi.scale_for(w0, stored, layer.weight_quantizer)
            ratios.append(a_stored / a_exact)
            cosines.append(F.cosine_similarity((a_stored * stored).flatten(), (a_exact * exact).flatten(), 0).item())
        gi.apply(before, opt)
    r, c = torch.tensor(ratios), torch.tensor(cosines)
    return {"lr": lr, "tensor_steps": len(ratios), "scale_ratio_median": round(r.median().item(), 4),
            "scale_ratio_min": round(r.min().item(), 4), "scale_ratio_max": round(r.max().item(), 4),
            "step_cosine_median": round(c.median().item(), 4), "step_cosine_min": round(c.min().item(), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20_cifar10")
    ap.add_argument("--out", default=str(REPO / "results/explore/inundation-step/check.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", "quant=gdfq"])
    teacher = load_model(cfg.model, cfg.paths.models_dir).model.eval()
    norm = cfg.model.normalize or cfg.dataset
    data = load_eval_set(cfg.dataset, norm.mean, norm.std, cfg.paths.cache_dir)
    x, _ = next(iter(data.batches(128, "cpu")))
    conv = Convention.from_dict(OmegaConf.to_container(cfg.quant, resolve=True))
    rows = [check_rate(teacher, conv, x, lr) for lr in RATES]
    for row in rows:
        print(f"lr {row['lr']:g}: stored/exact scale median {row['scale_ratio_median']}, range "
              f"[{row['scale_ratio_min']}, {row['scale_ratio_max']}]; cosine of the applied steps median "
              f"{row['step_cosine_median']}, min {row['step_cosine_min']} ({row['tensor_steps']} tensor-steps)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "quant": "gdfq", "wbit": 4, "abit": 4, "rows": rows}, indent=1)
                   + "\n")


if __name__ == "__main__":
    main()
