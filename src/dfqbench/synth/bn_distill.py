"""Distilled data by BatchNorm-statistics matching (ZeroQ, Cai et al., CVPR 2020).

Optimizes a batch of images so that, at the input of every BatchNorm2d, the per-sample channel mean and std
match the BN running mean and sqrt(running var + eps), plus a prior pulling each image's channels to mean 0 /
std 1. Squared L2 distances divided by the batch size; no labels. Reusable by any calibration-based method.
The loop is the shared one (`bn_loop`); this module holds ZeroQ's initialization and loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .bn_loop import EPS, ImageBatch, Synthesis, moment_distance, synthesize_batches


@dataclass
class DistillSettings:
    batch_size: int = 32
    num_batches: int = 1
    iterations: int = 500
    lr: float = 0.5
    patience: int = 100
    min_lr: float = 1e-4


class _PerSampleMoments(torch.autograd.Function):
    """mean and sqrt(unbiased var + EPS) over H, W (over L for a [N, C, L] input) with a closed-form backward:
    d mean / dx = 1/n, d std / dx = (x - mean) / ((n - 1) std), so dx = x * b + (g_mean / n - mean * b),
    b = g_std / ((n - 1) std): one addcmul. On CPU, 11x faster forward + backward than autograd through
    `Tensor.var` (a strided reduction on channels_last activations); the same numbers to float32 rounding."""

    @staticmethod
    def forward(ctx, x):
        dims = tuple(range(2, x.dim()))  # (2, 3) for images, (2,) for sequences
        n = 1
        for d in dims:
            n *= x.shape[d]
        mean = x.mean(dim=dims)
        std = (x - _expand(mean, x)).pow_(2).sum(dim=dims).div_(max(n - 1, 1)).add_(EPS).sqrt_()
        ctx.save_for_backward(x, mean, std)
        ctx.n = n
        return mean, std

    @staticmethod
    def backward(ctx, g_mean, g_std):
        x, mean, std = ctx.saved_tensors
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        g_std = torch.zeros_like(std) if g_std is None else g_std
        b = g_std / (max(ctx.n - 1, 1) * std)
        a = g_mean / ctx.n - mean * b
        return torch.addcmul(_expand(a, x), x, _expand(b, x))


def _expand(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [N, C, 1, 1] (or [N, C, 1] for a [N, C, L] input)."""
    return stat.reshape(*stat.shape, *(1,) * (x.dim() - 2))


def per_sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's channel mean and sqrt(unbiased var + eps), [N, C] (x is [N, C, H, W] or [N, C, L])."""
    return _PerSampleMoments.apply(x)


def uniform_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """ZeroQ's initialization: integers 0..254, centred, divided by the variance of U(-128, 127)."""
    return (torch.randint(0, 255, shape, generator=generator).float() - 127.5) / 5418.75


class ZeroQDistillation(Synthesis):
    what = "BatchNorm-statistics distillation"
    name = "distill"

    def __init__(self, image_shape: tuple[int, int, int], settings: DistillSettings, generator: torch.Generator,
                 device: torch.device):
        self.image_shape, self.settings, self.generator, self.device = image_shape, settings, generator, device
        self.num_batches, self.iterations = settings.num_batches, settings.iterations

    def new_batch(self, index: int) -> ImageBatch:
        s = self.settings
        x = uniform_noise((s.batch_size, *self.image_shape), self.generator).to(self.device)
        return ImageBatch(x, s.lr, s.patience, s.min_lr)

    def loss(self, batch, x, logits, taps) -> torch.Tensor:
        """Every BN input against its running statistics, then the input against mean 0 / std 1."""
        return moment_distance([*taps.pairs(), (x, (0.0, 1.0))], per_sample_moments)


def distill_bn_data(model: nn.Module, image_shape: tuple[int, int, int], settings: DistillSettings,
                    generator: torch.Generator, device: torch.device, progress: bool = False) -> list[torch.Tensor]:
    return synthesize_batches(model, ZeroQDistillation(image_shape, settings, generator, device), device, progress)
