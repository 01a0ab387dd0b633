"""Diagnose a collapsed ZAQ student from its kept checkpoint (method.keep_checkpoint=true), on the first 1,000 test
images: its accuracy as trained, with the teacher's BatchNorm running statistics put back, and its running-max
activation ranges beside those of real test data (the maxima a running min/max observer sees on those images).

    DFQ_CIFAR10_ROOT=... python results/explore/zaq-frame/diag_zaq_bn_and_ranges.py CHECKPOINT
"""

import copy
import sys

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from dfqbench.__main__ import CONF_DIR
from dfqbench.data import load_eval_set
from dfqbench.evaluate import evaluate
from dfqbench.models import load_model
from dfqbench.quant import Convention, quantize_model
from dfqbench.train.ema import EMARangeObserver

torch.set_num_threads(1)
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", overrides=["quant=gdfq", "dataset.max_samples=1000"])
teacher = load_model(cfg.model, "../shared/models").model.eval()
data = load_eval_set(cfg.dataset, cfg.dataset.mean, cfg.dataset.std, None)
conv = Convention.from_dict(OmegaConf.to_container(cfg.quant, resolve=True))
state = torch.load(sys.argv[1], weights_only=False)
cpu = torch.device("cpu")


def student():
    s = quantize_model(copy.deepcopy(teacher), conv, 4, 4)
    s.load_state_dict(state["student"])
    return s


print("as trained:", evaluate(student(), data, 500, cpu)["top1"])
s, bns = student(), {n: m for n, m in teacher.named_modules() if isinstance(m, nn.BatchNorm2d)}
for name, m in s.named_modules():
    if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(bns[name].running_mean)
        m.running_var.copy_(bns[name].running_var)
print("teacher BN statistics:", evaluate(s, data, 500, cpu)["top1"])
real = quantize_model(copy.deepcopy(teacher), conv, 4, 4)
observer = EMARangeObserver(real, mode="running_minmax")
with torch.no_grad():
    for x, _ in data.batches(250, cpu):
        real(x)
print("running-max ranges (trained):", [round(float(o["hi"]), 1) for o in state["observer"] if o["hi"] is not None])
print("maxima on real test data:    ", [round(float(o["hi"]), 1) for o in observer.state if o["hi"] is not None])
