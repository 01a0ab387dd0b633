"""ACQ (J. Li, X. Guo, B. Dai, G. Gong, M. Jin, G. Chen, W. Mao, H. Lu, "Improving Generative Data-free
Quantization via Attention Correction", arXiv 2301.07266, Pattern Recognition 2024): a best-effort RECONSTRUCTION
from the abstract (no code, no paper text here).

The abstract names three components, each rebuilt here as small as it can be on GDFQ's frame:
- a generator conditioned on the attention-centre position, with an attention-centre matching loss: the
  generator `acq` takes (class, centre c in [-r, r]^2; c as a Gaussian bump at c on its first feature map) and the
  term `attention_centre` pulls the centre of mass of the teacher's spatial attention map (Zagoruyko & Komodakis:
  the channel mean of f^2 at a stage output, default the last stage) to c: mean_b ||centre(A_b) - c_b||^2 divided
  by its chance value 2 r^2 / 3;
- an adversarial loss between paired same-condition samples against mode collapse: every batch is B / 2
  conditions drawn twice with independent noise (sample i and i + B/2 share class and centre) and the term
  `pair_diversity` is the mean cosine similarity of the teacher's penultimate features of the two samples of a
  pair, which the generator minimizes (pushes the pair apart) against the CE and centre terms that pull both
  towards the same condition;
- a train/eval-mode attention-consistency penalty so that BN-statistics matching is accurate: the term
  `attention_consistency` runs the teacher a second time with its BatchNorms on the batch's statistics (train
  mode, running statistics untouched) and penalizes, summed over the stage outputs, Zagoruyko & Komodakis's
  attention distance mean((at(f_train) - at(f_eval))^2), at(f) = L2-normalized flattened channel mean of f^2.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModel
from ..feature_taps import StageTap
from ..train.generators import GENERATORS
from ..train.generators.base import ConditionalGenerator, Sample, _with_targets
from ..train.losses import GENERATOR_LOSSES, LossTerm
from ..train.registry import register
from .qat import GeneratorQAT
from ..settings import check_number


# ---------------------------------------------------------------------------------------------- attention
def spatial_attention(f: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H, W]: the channel mean of f^2 (Zagoruyko & Komodakis's attention map, p = 2)."""
    return f.pow(2).mean(dim=1)


def attention_vector(f: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H * W]: the attention map flattened and L2-normalized per sample (AT's at())."""
    return F.normalize(spatial_attention(f).flatten(1), dim=1)


def attention_centre(attention: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[B, H, W] non-negative maps -> [B, 2] centres of mass (x, y) in [-1, 1]: pixel j of W sits at
    (2j + 1) / W - 1 (the pixel centres of align_corners=False), x along the width, y along the height."""
    _, h, w = attention.shape
    p = attention / attention.sum(dim=(1, 2), keepdim=True).clamp_min(eps)
    xs = (2 * torch.arange(w, dtype=p.dtype, device=p.device) + 1) / w - 1
    ys = (2 * torch.arange(h, dtype=p.dtype, device=p.device) + 1) / h - 1
    return torch.stack([(p.sum(dim=1) * xs).sum(dim=1), (p.sum(dim=2) * ys).sum(dim=1)], dim=1)


# ---------------------------------------------------------------------------------------------- the generator
@dataclass
class CentredSample(Sample):
    centres: torch.Tensor | None = None  # [B, 2] attention-centre conditions (x, y) in [-1, 1]

    def to(self, device: torch.device) -> "CentredSample":
        moved = super().to(device)
        return CentredSample(moved.z, moved.labels, moved.weights, moved.targets, moved.images, moved.theta,
                             None if self.centres is None else self.centres.to(device, non_blocking=True))


def centre_heatmap(centres: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """[B, 2] centres (x, y) in [-1, 1] -> [B, size, size] Gaussian bumps exp(-||p - c||^2 / (2 sigma^2)) over the
    pixel centres p of a size x size grid (the same coordinates as attention_centre)."""
    grid = (2 * torch.arange(size, dtype=centres.dtype, device=centres.device) + 1) / size - 1
    dx = (grid[None, :] - centres[:, :1]) ** 2  # [B, W]
    dy = (grid[None, :] - centres[:, 1:]) ** 2  # [B, H]
    return torch.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * sigma ** 2))


class CentreInput(nn.Module):
    """The first layer of a centre-conditioned trunk: input [h, c] -> fc(h) + (gamma x heatmap(c)) in fc's
    flattened [width, s, s] layout: a Gaussian bump at the centre c on the generator's first feature map, scaled per
    channel by a learned gamma (init 0.1: a gentle bias at the start), which the translation-equivariant decoder can move objects with."""

    def __init__(self, fc: nn.Linear, width: int, size: int, sigma: float, gamma_init: float = 0.1):
        super().__init__()
        self.fc, self.width, self.size, self.sigma = fc, width, size, sigma
        self.gamma = nn.Parameter(torch.full((width,), float(gamma_init)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        latent, centres = h[:, :-2], h[:, -2:]
        heat = centre_heatmap(centres, self.size, self.sigma)
        return self.fc(latent) + (self.gamma[None, :, None, None] * heat[:, None]).flatten(1)


@register(GENERATORS, "acq")
class CentreConditionalGenerator(ConditionalGenerator):
    """GDFQ's conditional generator with the attention centre as a second condition: the label enters as in GDFQ
    (label embedding * z; ImageNet-sized inputs: the conditional BatchNorms), the centre c as a Gaussian bump
    (std `centre_sigma`, in the [-1, 1] image coordinates) at c added to the first feature map, scaled per channel
    by a learned gamma (CentreInput). sample(B) draws B / 2 conditions (uniform labels, centres uniform in
    [-centre_range, centre_range]^2) and two noise vectors for each: sample i and sample i + B / 2 are a
    same-condition pair. `last_centres`: the centres of the latest forward (the attention_centre term reads them)."""

    def __init__(self, num_classes: int, image_shape, teacher_fc: torch.Tensor | None = None,
                 latent_dim: int = 100, bn_eps: float = 0.8, conditional_bn="auto", centre_range: float = 0.12,
                 centre_sigma: float = 0.5):
        super().__init__(num_classes, image_shape, teacher_fc, latent_dim=latent_dim, bn_eps=bn_eps,
                         conditional_bn=conditional_bn)
        if isinstance(centre_range, bool) or not isinstance(centre_range, (int, float)) \
                or not 0.0 <= centre_range <= 1.0:
            raise ValueError(f"centre_range={centre_range!r} must be a number in [0, 1]")
        check_number("centre_sigma", centre_sigma, strict=True)
        self.centre_range, self.centre_sigma = float(centre_range), float(centre_sigma)
        self.trunk.fc = CentreInput(self.trunk.fc, self.trunk.width, self.trunk.init_size, self.centre_sigma)
        self.last_centres: torch.Tensor | None = None

    def _centres(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return (torch.rand(n, 2, generator=rng) * 2 - 1) * self.centre_range

    def sample(self, batch_size: int, rng: torch.Generator) -> CentredSample:
        if batch_size % 2:
            raise ValueError(f"generator acq draws same-condition pairs: the batch size must be even, not "
                             f"{batch_size}")
        n = batch_size // 2
        z = torch.randn(batch_size, 1, self.latent_dim, generator=rng)
        labels = torch.randint(0, self.num_classes, (n, 1), generator=rng).repeat(2, 1)
        centres = self._centres(n, rng).repeat(2, 1)
        s = _with_targets(z, labels, torch.ones(batch_size, 1), self.num_classes)
        return CentredSample(s.z, s.labels, s.weights, s.targets, centres=centres)

    def sample_for(self, labels: torch.Tensor, rng: torch.Generator) -> CentredSample:
        n = labels.shape[0]
        z = torch.randn(n, 1, self.latent_dim, generator=rng)
        s = _with_targets(z, labels.reshape(n, 1), torch.ones(n, 1), self.num_classes)
        return CentredSample(s.z, s.labels, s.weights, s.targets, centres=self._centres(n, rng))

    def forward(self, s: Sample) -> torch.Tensor:
        centres = getattr(s, "centres", None)
        if centres is None:
            raise ValueError("generator acq needs a sample with attention centres (its own sample())")
        self.last_centres = centres
        if self.conditional_bn:
            return self.trunk(torch.cat([s.z[:, 0], centres], dim=1), s.labels)
        return self.trunk(torch.cat([self.embedding(s.labels[:, 0]) * s.z[:, 0], centres], dim=1))


# ---------------------------------------------------------------------------------------------- the losses
class _Bound:
    """Terms that read the run's generator or teacher module: the ACQ method binds them before training."""

    term_name = ""
    generator: nn.Module | None = None
    teacher: nn.Module | None = None

    def bind(self, generator: nn.Module | None = None, teacher: nn.Module | None = None) -> None:
        self.generator, self.teacher = generator, teacher

    def _need(self, what: str):
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"generator loss '{self.term_name}' needs the run's {what}: method acq "
                             f"(dfqbench.methods.acq.ACQ) binds it; bind() was not called")
        return value


def _stage_index(stage) -> int:
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise ValueError(f"stage={stage!r} must be an integer index into the stage outputs (-1: the last)")
    return stage


@register(GENERATOR_LOSSES, "attention_centre")
class AttentionCentre(_Bound, LossTerm):
    """ACQ's attention-centre matching (reconstruction): mean over the batch of ||centre(A_b) - c_b||^2, A the
    teacher's spatial attention map (channel mean of f^2) at stage output `stage` (default -1, the last), c the
    generator's centre condition of each sample, divided by its chance value E||c||^2 = 2 r^2 / 3 for centres
    uniform in [-r, r]^2 (the bound generator's centre_range r; `normalize: false` leaves the raw distance): 1 when
    the attention stays in the middle whatever the condition, 0 when it follows it."""

    features = frozenset({"stages"})
    term_name = "attention_centre"

    def __init__(self, weight: float = 1.0, stage: int = -1, normalize: bool = True):
        super().__init__(weight)
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize={normalize!r} must be true or false")
        self.stage, self.normalize = _stage_index(stage), normalize

    def __call__(self, step):
        stages = step.teacher_feature_set["stages"]
        if not -len(stages) <= self.stage < len(stages):
            raise UnsupportedModel(f"generator loss 'attention_centre': stage={self.stage} is outside the teacher's "
                                   f"{len(stages)} stages")
        target = getattr(self._need("generator"), "last_centres", None)
        if target is None or target.shape[0] != step.images.shape[0]:
            raise ValueError("generator loss 'attention_centre' needs the centre conditions of this batch: "
                             "method.generator.name=acq")
        centre = attention_centre(spatial_attention(stages[self.stage]))
        distance = (centre - target.to(centre)).pow(2).sum(dim=1).mean()
        if not self.normalize:
            return distance
        chance = 2 * float(getattr(self.generator, "centre_range", 0.0)) ** 2 / 3
        return distance / chance if chance > 0 else distance


def pair_similarity(features: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between sample i and sample i + B/2 (the generator's same-condition pairs)."""
    n = features.shape[0] // 2
    if n < 1:
        raise ValueError("same-condition pairs need a batch of at least 2")
    flat = features.flatten(1)
    return F.cosine_similarity(flat[:n], flat[n:2 * n], dim=1).mean()


@register(GENERATOR_LOSSES, "pair_diversity")
class PairDiversity(_Bound, LossTerm):
    """ACQ's adversarial loss between paired same-condition samples (reconstruction): the mean cosine similarity
    of the teacher's penultimate features of the two samples of each pair (i, i + B/2), minimized by the generator,
    so two noises of one condition give different images, against the condition terms (CE, attention centre)
    that pull both to the same class and centre. When the generator is bound, its pairs are checked."""

    features = frozenset({"penultimate"})
    term_name = "pair_diversity"

    def __call__(self, step):
        generator = self.generator
        centres = getattr(generator, "last_centres", None) if generator is not None else None
        if centres is not None:
            n = centres.shape[0] // 2
            if centres.shape[0] != step.images.shape[0] or not torch.equal(centres[:n], centres[n:2 * n]):
                raise ValueError("generator loss 'pair_diversity' needs same-condition pairs (i, i + B/2): "
                                 "method.generator.name=acq")
        return pair_similarity(step.teacher_features)


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Inside the block the model's BatchNorms normalize with the batch's statistics (train mode) and leave their
    running statistics (and counters) untouched; everything else keeps its mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in bns]
    for m in bns:
        m.training, m.track_running_stats = True, False
    try:
        yield model
    finally:
        for m, (training, track) in zip(bns, saved):
            m.training, m.track_running_stats = training, track


@register(GENERATOR_LOSSES, "attention_consistency")
class AttentionConsistency(_Bound, LossTerm):
    """ACQ's train/eval-mode attention-consistency penalty (reconstruction): summed over the teacher's stage
    outputs, mean((at(f_train) - at(f_eval))^2) (Zagoruyko & Komodakis's at_loss), f_eval from the eval-mode
    forward (running BN statistics), f_train from a second forward of the same images with the BatchNorms on the
    batch's statistics (running statistics untouched). Zero when every BN input's batch statistics equal the running
    ones; gradients flow through both forwards to the images."""

    features = frozenset({"stages"})
    term_name = "attention_consistency"

    def __init__(self, weight: float = 500.0):
        super().__init__(weight)
        self._tap: StageTap | None = None

    def bind(self, generator: nn.Module | None = None, teacher: nn.Module | None = None) -> None:
        super().bind(generator, teacher)
        if self._tap is not None:
            self._tap.close()
        self._tap = StageTap(teacher) if teacher is not None else None

    def __call__(self, step):
        evaluated = step.teacher_feature_set["stages"]  # the eval-mode forward first: its taps are kept
        teacher = self._need("teacher")
        with batch_statistics(teacher):
            teacher(step.images)
        trained = self._tap.value
        return sum((attention_vector(t) - attention_vector(e)).pow(2).mean() for t, e in zip(trained, evaluated))


class ACQ(GeneratorQAT):
    """GDFQ's trainer with ACQ's centre-conditioned paired generator and its three generator terms; binds the
    run's generator and teacher to the terms that read them."""

    def __init__(self, name: str = "acq", **kwargs):
        super().__init__(name=name, **kwargs)
        if self.generator_spec.get("name") != "acq":
            raise ValueError(f"method=acq needs its centre-conditioned generator: method.generator.name=acq, not "
                             f"{self.generator_spec.get('name')!r}")
        if self.schedule.batch_size % 2:
            raise ValueError(f"method=acq trains on same-condition pairs: schedule.batch_size must be even, not "
                             f"{self.schedule.batch_size}")

    def _build_generator(self, spec: dict, teacher: nn.Module, ctx) -> nn.Module:
        generator = GeneratorQAT._build_generator(spec, teacher, ctx)
        for _, term in self.generator_terms:
            if isinstance(term, _Bound):
                term.bind(generator=generator, teacher=teacher)
        return generator
