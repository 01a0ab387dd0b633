"""Batched RandomResizedCrop + horizontal flip on image tensors (IntraQ/HAST synthesis and fine-tuning).

One affine sampling grid per image (`affine_grid` + bilinear `grid_sample`), so a batch costs one call instead of
a loop over images. Each transform is applied to an image with probability `prob` (IntraQ's 0.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, rng: torch.Generator, scale: tuple[float, float] = (0.5, 1.0),
              ratio: tuple[float, float] = (3 / 4, 4 / 3), prob: float = 0.5,
              flip_prob: float | None = None) -> torch.Tensor:
    """A random crop of area fraction in `scale` and aspect ratio in `ratio`, resized back to the input size,
    applied per image with probability `prob`, and a horizontal flip with probability `flip_prob` (default
    `prob`; torchvision's RandomResizedCrop + RandomHorizontalFlip: prob 1, flip_prob 0.5). Differentiable in x."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=rng)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=rng)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width / height as fractions of the image
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    crop = torch.rand(n, generator=rng) < prob
    w, h = torch.where(crop, w, torch.ones(n)), torch.where(crop, h, torch.ones(n))
    cx = (torch.rand(n, generator=rng) * 2 - 1) * (1 - w)  # centre in [-1, 1] keeping the crop inside
    cy = (torch.rand(n, generator=rng) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=rng) < (prob if flip_prob is None else flip_prob), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
