"""Distilled data by BatchNorm-statistics matching (ZeroQ, Cai et al., CVPR 2020).

Optimizes a batch of images so that, at the input of every BatchNorm2d, the per-sample channel mean and std
match the BN running mean and sqrt(running var + eps), plus a prior pulling each image's channels to mean 0 /
std 1. Squared L2 distances divided by the batch size; no labels. Reusable by any calibration-based method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UnsupportedModel

_EPS = 1e-6


@dataclass
class DistillSettings:
    batch_size: int = 32
    num_batches: int = 1
    iterations: int = 500
    lr: float = 0.5
    patience: int = 100
    min_lr: float = 1e-4


def _per_sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(dim=2), torch.sqrt(flat.var(dim=2) + _EPS)


def _sq_l2_per_batch(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return (value - target).pow(2).sum() / value.shape[0]


def uniform_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """ZeroQ's initialization: integers 0..254, centred, divided by the variance of U(-128, 127)."""
    return (torch.randint(0, 255, shape, generator=generator).float() - 127.5) / 5418.75


def distill_bn_data(model: nn.Module, image_shape: tuple[int, int, int], settings: DistillSettings,
                    generator: torch.Generator, device: torch.device, progress: bool = False) -> list[torch.Tensor]:
    model = model.eval().to(device)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise UnsupportedModel("BatchNorm-statistics distillation needs a model with BatchNorm2d layers")
    captured: dict[nn.Module, torch.Tensor] = {}
    handles = [bn.register_forward_pre_hook(lambda mod, inp: captured.__setitem__(mod, inp[0])) for bn in bns]
    targets = [(bn.running_mean.detach(), torch.sqrt(bn.running_var.detach() + _EPS)) for bn in bns]
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    batches = []
    try:
        for b in range(settings.num_batches):
            x = uniform_noise((settings.batch_size, *image_shape), generator).to(device)
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=settings.lr)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=settings.patience,
                                                               min_lr=settings.min_lr)
            steps = tqdm(range(settings.iterations), desc=f"distill batch {b + 1}/{settings.num_batches}",
                         disable=not progress, leave=False)
            for _ in steps:
                opt.zero_grad(set_to_none=True)
                captured.clear()
                model(x)
                loss = x.new_zeros(())
                for bn, (mean_t, std_t) in zip(bns, targets):
                    mean, std = _per_sample_moments(captured[bn])
                    loss = loss + _sq_l2_per_batch(mean_t, mean) + _sq_l2_per_batch(std_t, std)
                mean, std = _per_sample_moments(x)
                loss = loss + _sq_l2_per_batch(torch.zeros_like(mean[0]), mean)
                loss = loss + _sq_l2_per_batch(torch.ones_like(std[0]), std)
                loss.backward()
                opt.step()
                sched.step(loss.item())
                steps.set_postfix(loss=f"{loss.item():.3f}")
            batches.append(x.detach())
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return batches
