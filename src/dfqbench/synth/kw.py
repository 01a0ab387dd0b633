"""Images from the teacher alone by The Knowledge Within (Haroush, Hubara, Hoffer, Soudry, CVPR 2020).

Three schemes (`scheme`):
  bn_stats   images ~ N(0, 1) in the normalized input space, optimized so that at every BatchNorm input the
             batch's channel statistics (over images and positions) match the layer's running statistics:
             sum over BN layers of the channel mean of KL(N(running mean, running std) || N(batch mean, batch std))
             (`bn_kl.bn_kl_loss` with the biased batch variance; the KL direction of KW's note and of Q-ASR);
  inception  the same start, optimized to raise a target class (CE against balanced labels: image i of a batch
             has class i mod C), no BN term ("DeepDream"-like, KW's Inception scheme);
  gaussian   the start itself, not optimized (KW's Gaussian-noise baseline).
`bn_weight` and `ce_weight` mix the two losses for other methods (AAC+ABN's highly responsive images use both).
The loop is the shared one (`bn_loop`): Adam on the pixels with ReduceLROnPlateau.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .bn_kl import bn_kl_loss
from .bn_loop import ImageBatch, Synthesis, synthesize_batches
from .calib_data import _split, cached
from ..settings import check_int, check_number

SCHEMES = ("bn_stats", "inception", "gaussian")


@dataclass
class KWSettings:
    scheme: str = "bn_stats"
    batch_size: int = 32
    iterations: int = 500
    lr: float = 0.5
    patience: int = 100
    min_lr: float = 1e-4
    bn_weight: float | None = None  # None: the scheme's (bn_stats 1, inception 0)
    ce_weight: float | None = None  # None: the scheme's (bn_stats 0, inception 1)

    def validate(self, prefix: str = "method.") -> "KWSettings":
        if self.scheme not in SCHEMES:
            raise ValueError(f"{prefix}scheme={self.scheme!r} is not valid; choose one of: {', '.join(SCHEMES)}")
        for key in ("batch_size", "iterations"):
            value = getattr(self, key)
            check_int(f"{prefix}{key}", value)
        for key in ("lr", "min_lr"):
            value = getattr(self, key)
            check_number(f"{prefix}{key}", value, strict=True)
        for key in ("bn_weight", "ce_weight"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{prefix}{key}={value!r} must be a number >= 0 (or null: the scheme's)")
        return self

    def weights(self) -> tuple[float, float]:
        bn, ce = {"bn_stats": (1.0, 0.0), "inception": (0.0, 1.0), "gaussian": (0.0, 0.0)}[self.scheme]
        return (bn if self.bn_weight is None else float(self.bn_weight),
                ce if self.ce_weight is None else float(self.ce_weight))


class _LabelledImages(ImageBatch):
    def __init__(self, x, labels, s: KWSettings):
        super().__init__(x, s.lr, s.patience, s.min_lr)
        self.labels = labels


class KWSynthesis(Synthesis):
    what = "The Knowledge Within's synthesis"

    def __init__(self, num_images: int, image_shape, num_classes: int, settings: KWSettings,
                 generator: torch.Generator, device: torch.device):
        self.num_images, self.image_shape, self.num_classes = num_images, tuple(image_shape), num_classes
        self.settings, self.generator, self.device = settings, generator, device
        self.name, self.iterations = f"kw-{settings.scheme}", settings.iterations
        self.num_batches = math.ceil(num_images / settings.batch_size)
        self.bn_weight, self.ce_weight = settings.weights()

    def new_batch(self, index: int) -> _LabelledImages:
        done = index * self.settings.batch_size
        n = min(self.settings.batch_size, self.num_images - done)
        x = torch.randn((n, *self.image_shape), generator=self.generator).to(self.device)
        labels = ((torch.arange(n) + done) % self.num_classes).to(self.device)
        return _LabelledImages(x, labels, self.settings)

    def loss(self, batch, x, logits, taps) -> torch.Tensor:
        loss = logits.new_zeros(())
        if self.bn_weight:
            loss = loss + self.bn_weight * bn_kl_loss(taps.pairs(), unbiased=False)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits, batch.labels)
        return loss


def kw_images(model, ctx, num_images: int, settings: KWSettings) -> torch.Tensor:
    """`num_images` normalized images [N, C, H, W] of the scheme, cached per (teacher, settings, seed)."""
    settings.validate()
    if settings.scheme == "gaussian":  # the start, not optimized
        return torch.randn((num_images, *ctx.input_shape), generator=ctx.generator()).to(ctx.device)
    synthesis = KWSynthesis(num_images, ctx.input_shape, ctx.num_classes, settings, ctx.generator(), ctx.device)
    batches = cached(ctx, "kw", {**asdict(settings), "num_images": num_images},
                     lambda: synthesize_batches(model, synthesis, ctx.device, ctx.progress))
    return torch.cat(batches).to(ctx.device)


def kw_source(model, ctx, num_images: int, batch_size: int) -> list[torch.Tensor]:
    """The `kw` calibration source: KW's BN-statistics images with this module's default settings."""
    return _split(kw_images(model, ctx, num_images, KWSettings()), batch_size)
