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


def scale_pair(key: str, value, high: float | None = 1.0) -> tuple[float, float]:
    """A [low, high] range setting (a crop's area fraction, an aspect ratio), checked: 0 < low <= high (<= `high`)."""
    try:
        pair = tuple(float(v) for v in value if not isinstance(v, bool))
        pair = pair if len(pair) == len(value) else ()
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not 0.0 < pair[0] <= pair[1] or (high is not None and pair[1] > high):
        shown = list(value) if isinstance(value, (list, tuple)) else value
        raise ValueError(f"{key}={shown!r} must be [low, high] with 0 < low <= high"
                         + (f" <= {high:g}" if high is not None else ""))
    return pair


def crop_flip_theta(w: torch.Tensor, h: torch.Tensor, rng: torch.Generator, flip_prob: float) -> torch.Tensor:
    """The [n, 2, 3] affine matrices (for `affine_grid`) of crops of width/height `w`/`h` (fractions of the image)
    at random centres inside the image, each flipped horizontally with probability `flip_prob`."""
    n = w.shape[0]
    cx = (torch.rand(n, generator=rng) * 2 - 1) * (1 - w)  # centre in [-1, 1] keeping the crop inside
    cy = (torch.rand(n, generator=rng) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=rng) < flip_prob, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return theta


def apply_theta(x: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """Crop/flip `x` by the affine matrices `theta` (bilinear, differentiable in x); None: x unchanged."""
    if theta is None:
        return x
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


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
    return apply_theta(x, crop_flip_theta(w, h, rng, flip_prob))
