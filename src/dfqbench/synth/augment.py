"""Batched RandomResizedCrop + horizontal flip on image tensors (IntraQ/HAST synthesis and fine-tuning, ClusterQ's
generated batches).

One affine sampling grid per image (`affine_grid` + bilinear `grid_sample`), so a batch costs one call instead of
a loop over images. The crop box is torchvision's RandomResizedCrop.get_params in continuous form (`crop_boxes`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crop_boxes(n: int, rng: torch.Generator, scale: tuple[float, float],
               ratio: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(width, height) of `n` crop boxes as fractions of the image, as torchvision's RandomResizedCrop draws them:
    up to 10 draws of (area fraction in `scale`, aspect ratio log-uniform in `ratio`), the first whose box fits in
    the image is taken, else the whole image (its fallback for a square image and ratios around 1). A box is
    redrawn, not clamped: clamping would shift the crops toward larger areas."""
    area = torch.empty(n, 10).uniform_(scale[0], scale[1], generator=rng)
    aspect = torch.exp(torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=rng))
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= 1.0) & (h <= 1.0)
    found = fits.any(dim=1)
    first = torch.where(found, fits.float().argmax(dim=1), 0)[:, None]
    return torch.where(found, w.gather(1, first)[:, 0], 1.0), torch.where(found, h.gather(1, first)[:, 0], 1.0)


def crop_flip(x: torch.Tensor, rng: torch.Generator, scale: tuple[float, float] = (0.5, 1.0),
              ratio: tuple[float, float] = (3 / 4, 4 / 3), prob: float = 1.0,
              flip_prob: float = 0.5) -> torch.Tensor:
    """A random crop (`crop_boxes`) resized back to the input size, applied per image with probability `prob`,
    and a horizontal flip with probability `flip_prob` (torchvision's RandomResizedCrop + RandomHorizontalFlip:
    the defaults). Differentiable in x."""
    n = x.shape[0]
    w, h = crop_boxes(n, rng, scale, ratio)
    crop = torch.rand(n, generator=rng) < prob
    w, h = torch.where(crop, w, torch.ones(n)), torch.where(crop, h, torch.ones(n))
    cx = (torch.rand(n, generator=rng) * 2 - 1) * (1 - w)  # centre in [-1, 1] keeping the crop inside
    cy = (torch.rand(n, generator=rng) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=rng) < flip_prob, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
