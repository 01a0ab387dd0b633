"""MixMix's synthetic data (Li et al., ICCV 2021; LIS, its first preprint): inversion through a pool of
pretrained models ("feature mixing") of images pasted into each other ("data mixing").

Each step the batch is CutMix-ed (`cutmix`): a random box of a partner image (a random permutation of the batch)
is pasted into each image, and its soft label becomes the area-weighted mix of the two labels. The mixed batch goes
through the quantized model's teacher (the loop's model) and every pool model; per model the loss is GDFQ's BN
statistics loss (`bns_loss`) plus the soft-label CE, averaged over the models. Labels are balanced (image i of
a batch has class i mod C). The images are the optimized variable (Adam, ReduceLROnPlateau: the shared loop).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bn_loop import BNTaps, ImageBatch, Synthesis, bn_layers, frozen, synthesize_batches
from .calib_data import cached
from .labelled import bns_loss
from ..settings import check_int, check_number


@dataclass
class MixMixSettings:
    batch_size: int = 64
    iterations: int = 500
    lr: float = 0.25
    patience: int = 100
    min_lr: float = 1e-4
    mix_prob: float = 1.0  # probability that a step's batch is CutMix-ed
    ce_weight: float = 1.0

    def validate(self, prefix: str = "method.synthesis.") -> "MixMixSettings":
        for key in ("batch_size", "iterations"):
            value = getattr(self, key)
            check_int(f"{prefix}{key}", value)
        if not 0.0 <= self.mix_prob <= 1.0:
            raise ValueError(f"{prefix}mix_prob={self.mix_prob!r} must be in [0, 1]")
        check_number(f"{prefix}lr", self.lr, strict=True)
        check_number(f"{prefix}ce_weight", self.ce_weight)
        return self


def cutmix(x: torch.Tensor, targets: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a random box of image perm[i] into image i; the box's area fraction lam ~ U(0, 1) (side sqrt(lam)
    of each side, clipped at the border); soft targets mixed by the pasted area actually kept."""
    n, _, h, w = x.shape
    perm = torch.randperm(n, generator=rng)
    lam = float(torch.rand((), generator=rng))
    bh, bw = int(round(h * math.sqrt(lam))), int(round(w * math.sqrt(lam)))
    cy, cx = int(torch.randint(0, h, (), generator=rng)), int(torch.randint(0, w, (), generator=rng))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh - bh // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw - bw // 2, w)
    mask = torch.zeros(1, 1, h, w, dtype=x.dtype, device=x.device)
    mask[..., y0:y1, x0:x1] = 1.0
    pasted = (y1 - y0) * (x1 - x0) / (h * w)
    return x * (1 - mask) + x[perm] * mask, targets * (1 - pasted) + targets[perm] * pasted


class _MixBatch(ImageBatch):
    def __init__(self, x, targets, s: MixMixSettings, rng: torch.Generator):
        super().__init__(x, s.lr, s.patience, s.min_lr)
        self.targets, self.step_targets, self.rng, self.mix_prob = targets, targets, rng, s.mix_prob

    def images(self) -> torch.Tensor:
        if float(torch.rand((), generator=self.rng)) < self.mix_prob:
            mixed, self.step_targets = cutmix(self.x, self.targets, self.rng)
            return mixed
        self.step_targets = self.targets
        return self.x


class MixMixSynthesis(Synthesis):
    what = "MixMix's feature-mixing synthesis"
    name = "mixmix"

    def __init__(self, pool: list[nn.Module], num_images: int, image_shape, num_classes: int,
                 settings: MixMixSettings, rng: torch.Generator, device: torch.device):
        self.pool = [m.eval().to(device) for m in pool]
        self.num_images, self.image_shape, self.num_classes = num_images, tuple(image_shape), num_classes
        self.settings, self.rng, self.device = settings, rng, device
        self.num_batches, self.iterations = math.ceil(num_images / settings.batch_size), settings.iterations

    def prepare(self, model, taps) -> list:
        self.pool_taps = [BNTaps(bn_layers(m, self.what)) for m in self.pool]
        self.frozen = [frozen(m) for m in self.pool]
        for f in self.frozen:
            f.__enter__()
        return [h for t in self.pool_taps for h in t.handles] + [_Exit(self.frozen)]

    def new_batch(self, index: int) -> _MixBatch:
        done = index * self.settings.batch_size
        n = min(self.settings.batch_size, self.num_images - done)
        x = torch.randn((n, *self.image_shape), generator=self.rng).to(self.device)
        labels = (torch.arange(n) + done) % self.num_classes
        return _MixBatch(x, F.one_hot(labels, self.num_classes).float().to(self.device), self.settings, self.rng)

    def _term(self, logits, taps, targets) -> torch.Tensor:
        ce = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        return bns_loss(taps) + self.settings.ce_weight * ce

    def loss(self, batch: _MixBatch, x, logits, taps) -> torch.Tensor:
        total = self._term(logits, taps, batch.step_targets)
        for model, pool_taps in zip(self.pool, self.pool_taps):
            pool_taps.clear()
            total = total + self._term(model(x), pool_taps, batch.step_targets)
        return total / (1 + len(self.pool))


class _Exit:
    """A 'hook handle' whose remove() restores the pool models' requires_grad flags."""

    def __init__(self, contexts):
        self.contexts = contexts

    def remove(self) -> None:
        for c in self.contexts:
            c.__exit__(None, None, None)


def mixmix_images(model: nn.Module, pool: list[nn.Module], pool_ids: list[str], ctx, num_images: int,
                  settings: MixMixSettings) -> torch.Tensor:
    """`num_images` normalized images made against `model` and the pool, cached per (teachers, settings, seed)."""
    settings.validate()
    synthesis = MixMixSynthesis(pool, num_images, ctx.input_shape, ctx.num_classes, settings, ctx.generator(),
                                ctx.device)
    key = {**asdict(settings), "num_images": num_images, "pool": pool_ids}
    batches = cached(ctx, "mixmix", key, lambda: synthesize_batches(model, synthesis, ctx.device, ctx.progress))
    return torch.cat(batches).to(ctx.device)
