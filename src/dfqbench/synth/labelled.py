"""Labelled synthetic sets for fixed-set fine-tuning: IntraQ (Zhong et al., CVPR 2022) and HAST (Li et al.,
CVPR 2023), settings as collected in shared/docs/methods.md.

Both optimize batches of images (the shared loop of `bn_loop`), initialized ~ N(0, 1) in the teacher's normalized
input space, with Adam (lr 0.5, ReduceLROnPlateau patience 50) against the teacher:
  BN loss: mean over the teacher's BN layers of MSE(batch mean, running mean) + MSE(biased batch var, running
           var) at the BN inputs (GDFQ's BNS), plus a label term:
  intraq:  (softmax(logits)_y - p_y)^2 on the label entry only, averaged over the batch, where a random half
           of the batch has p_y ~ U[target_prob, 1] and the other half p_y = 1; plus the intra-class cosine
           margin: each image's penultimate feature keeps a cosine distance from its class centroid (the mean
           feature of that class over the finished batches) between `margin_lower` and `margin_upper` (linear
           hinges outside, averaged over the images whose class has a centroid);
  hast:    beta * mean((1 - p_y)^gamma * CE(logits, y)): hard samples (low p_y) weigh more.
Each step, with probability `augment_prob` the batch is augmented: every image randomly resized-cropped (area
`crop_scale`: 0.5-1, IntraQ's run scripts' augMargin; HAST's ImageNet synthesis 0.4-1, its default) and flipped
with probability 0.5, as the codes' RHF(RRC(x)) per image (before 2026-12-06 an image was cropped with probability
0.5 only). Adam's plateau scheduler stops at lr 1e-4. Centroids are updated after every finished batch, as
IntraQ's distill_data.py does. Decision where the papers leave room: labels are balanced (image i of a batch has
class i mod C, so every class has a centroid after the first batch; the code draws them at random). The paper's
4 x 5 x 256 = 5,120 images at 1,000 steps are the `paper` schedule; the `cpu` schedule makes fewer images with
fewer steps (conf/schedule/cpu.yaml).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModel
from ..feature_taps import PenultimateTap
from .augment import crop_flip, scale_pair
from .bn_loop import BNTaps, ImageBatch, Synthesis, synthesize_batches
from .calib_data import _split, cached
from ..settings import check_int

LABEL_LOSSES = ("intraq", "hast")
_VERSION = 3  # part of the cache key: bump when the synthesis changes what it computes


@dataclass
class LabelledSettings:
    label_loss: str = "intraq"  # intraq | hast
    batch_size: int = 256
    iterations: int = 1000
    lr: float = 0.5
    patience: int = 50
    augment_prob: float = 0.5
    crop_scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop's area range on augmented steps
    target_prob: float = 0.95  # intraq (CIFAR-10; CIFAR-100 0.6, ImageNet 1.0)
    margin_lower: float = 0.05  # intraq cosine-distance band (CIFAR-10; CIFAR-100 0.02-1.0, ImageNet 0-2)
    margin_upper: float = 0.8
    beta: float = 10.0  # hast (CIFAR; ImageNet 0.1)
    gamma: float = 2.0  # hast (CIFAR; ImageNet 0.5)

    def validate(self, prefix: str = "method.generator.source_settings.") -> "LabelledSettings":
        if self.label_loss not in LABEL_LOSSES:
            raise ValueError(f"{prefix}label_loss={self.label_loss!r} is not valid; choose one of: "
                             f"{', '.join(LABEL_LOSSES)}")
        for key in ("batch_size", "iterations"):
            value = getattr(self, key)
            check_int(f"{prefix}{key}", value)
        if not 0.0 <= self.augment_prob <= 1.0 or not 0.0 <= self.target_prob <= 1.0:
            raise ValueError(f"{prefix}augment_prob and target_prob must be in [0, 1]")
        self.crop_scale = scale_pair(f"{prefix}crop_scale", self.crop_scale)
        if not 0.0 <= self.margin_lower <= self.margin_upper:
            raise ValueError(f"{prefix}margin_lower={self.margin_lower} must be in [0, margin_upper]")
        return self


def bns_loss(taps: BNTaps) -> torch.Tensor:
    """GDFQ's BNS loss: mean over the BN layers of MSE(batch mean, running mean) + MSE(biased var, running var)."""
    total = 0.0
    for bn, activation in zip(taps.bns, taps.inputs()):
        var, mean = torch.var_mean(activation, dim=(0, 2, 3), unbiased=False)
        total = total + F.mse_loss(mean, bn.running_mean) + F.mse_loss(var, bn.running_var)
    return total / len(taps.bns)


def _target_probs(n: int, target_prob: float, rng: torch.Generator) -> torch.Tensor:
    """IntraQ's label-entry targets: U[target_prob, 1] for a random half of the batch, 1 for the rest."""
    p = torch.empty(n).uniform_(target_prob, 1.0, generator=rng)
    return torch.where(torch.rand(n, generator=rng) < 0.5, p, torch.ones(n))


def _cosine_band(features, labels, centroids, lower, upper) -> torch.Tensor:
    known = centroids[labels].norm(dim=1) > 0
    if not bool(known.any()):
        return features.new_zeros(())
    dist = 1.0 - F.cosine_similarity(features[known], centroids[labels[known]], dim=1)
    return (F.relu(lower - dist) + F.relu(dist - upper)).mean()


class _LabelledBatch(ImageBatch):
    """Images ~ N(0, 1) with their labels; each step they are augmented with probability `augment_prob`."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, centroids: torch.Tensor | None,
                 settings: LabelledSettings, rng: torch.Generator):
        super().__init__(x, settings.lr, settings.patience, 1e-4, channels_last=False)
        self.labels, self.targets, self.centroids = labels, targets, centroids
        self.augment_prob, self.crop_scale, self.rng = settings.augment_prob, settings.crop_scale, rng

    def images(self) -> torch.Tensor:
        augment = float(torch.rand((), generator=self.rng)) < self.augment_prob
        return crop_flip(self.x, self.rng, scale=self.crop_scale) if augment else self.x


class LabelledSynthesis(Synthesis):
    what = "labelled synthesis (intraq, hast)"

    def __init__(self, num_images: int, image_shape, num_classes: int, settings: LabelledSettings,
                 rng: torch.Generator, device: torch.device):
        self.num_images, self.image_shape, self.num_classes = num_images, image_shape, num_classes
        self.settings, self.rng, self.device = settings, rng, device
        self.name, self.iterations = settings.label_loss, settings.iterations
        self.num_batches = math.ceil(num_images / settings.batch_size)
        self.labels: list[torch.Tensor] = []
        self.feat_sum, self.feat_count = None, torch.zeros(num_classes, device=device)  # per-class feature sums

    def prepare(self, model, taps) -> list:
        self.penultimate = PenultimateTap(model)
        return [self.penultimate.handle]

    def new_batch(self, index: int) -> _LabelledBatch:
        done = index * self.settings.batch_size
        n = min(self.settings.batch_size, self.num_images - done)
        y = (torch.arange(n) + done) % self.num_classes
        targets = _target_probs(n, self.settings.target_prob, self.rng).to(self.device)
        x = torch.randn((n, *self.image_shape), generator=self.rng).to(self.device)
        centroids = None if self.feat_sum is None else self.feat_sum / self.feat_count.clamp_min(1).unsqueeze(1)
        return _LabelledBatch(x, y.to(self.device), targets, centroids, self.settings, self.rng)

    def loss(self, batch: _LabelledBatch, x, logits, taps) -> torch.Tensor:
        s, y = self.settings, batch.labels
        loss = bns_loss(taps)
        p_y = F.softmax(logits, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        if s.label_loss == "intraq":
            loss = loss + (p_y - batch.targets).pow(2).mean()
            if batch.centroids is not None:
                loss = loss + _cosine_band(self.penultimate.value.flatten(1), y, batch.centroids, s.margin_lower,
                                           s.margin_upper)
            return loss
        ce = F.cross_entropy(logits, y, reduction="none")
        return loss + s.beta * ((1.0 - p_y).pow(s.gamma) * ce).mean()

    @torch.no_grad()
    def finish(self, model, batch: _LabelledBatch) -> torch.Tensor:
        """Adds the finished images' penultimate features to their classes' centroids."""
        model(batch.x)
        f = self.penultimate.value.flatten(1)
        if self.feat_sum is None:
            self.feat_sum = torch.zeros(self.num_classes, f.shape[1], device=self.device)
        self.feat_sum.index_add_(0, batch.labels, f)
        self.feat_count += torch.bincount(batch.labels, minlength=self.num_classes).float()
        self.labels.append(batch.labels)
        return batch.result()


def synthesize(model: nn.Module, num_images: int, image_shape, num_classes: int, settings: LabelledSettings,
               rng: torch.Generator, device: torch.device, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, C, H, W] normalized, labels [N]) made by `settings.label_loss`."""
    settings.validate()
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise UnsupportedModel("labelled synthesis (intraq, hast) needs a teacher with an nn.Linear classifier")
    synthesis = LabelledSynthesis(num_images, image_shape, num_classes, settings, rng, device)
    images = synthesize_batches(model, synthesis, device, progress)
    return torch.cat(images), torch.cat(synthesis.labels)


def _source(label_loss: str):
    def source(model, ctx, num_images: int, batch_size: int, **overrides) -> list[torch.Tensor]:
        settings = LabelledSettings(label_loss=label_loss, **overrides).validate()
        key = {**asdict(settings), "num_images": num_images, "version": _VERSION}
        batches = cached(ctx, label_loss, key, lambda: [synthesize(
            model, num_images, tuple(ctx.input_shape), ctx.num_classes, settings, ctx.generator(), ctx.device,
            ctx.progress)[0]])
        return _split(torch.cat(batches).to(ctx.device), batch_size)
    source.__doc__ = f"The `{label_loss}` source: labelled synthesis (see dfqbench.synth.labelled), cached."
    return source


intraq_source = _source("intraq")
hast_source = _source("hast")
