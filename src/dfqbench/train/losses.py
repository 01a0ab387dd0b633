"""Loss terms of the generator step and of the student step, chosen by name in the method yaml.

A term is called with a `Step` (one batch: images, soft targets, teacher/student outputs computed on first use)
and returns a scalar; its `weight` multiplies it in the sum (weight 0 leaves the term out). Register a new term
with `@register(GENERATOR_LOSSES, "name")` or `@register(STUDENT_LOSSES, "name")`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModel
from .registry import build, register

GENERATOR_LOSSES: dict[str, type] = {}
STUDENT_LOSSES: dict[str, type] = {}


class Step:
    """What a loss term may read for one batch. `targets` are soft labels [B, classes] (one-hot for plain labels,
    mixtures for Qimera's superposed samples; None for an unconditional generator, which then uses the teacher's
    own prediction as a pseudo-label). Teacher and student logits are computed when a term first asks."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor | None, teacher: Callable | None = None,
                 student: Callable | None = None, teacher_logits: torch.Tensor | None = None,
                 bn_stats: Callable[[], list] | None = None, taps: tuple | None = None,
                 teacher_features: torch.Tensor | None = None):
        self.images = images
        self._targets, self._teacher, self._student = targets, teacher, student
        self._teacher_logits, self._student_logits, self._bn_stats = teacher_logits, None, bn_stats
        self._taps, self._teacher_features, self._student_features = taps, teacher_features, None

    @property
    def teacher_logits(self) -> torch.Tensor:
        if self._teacher_logits is None:
            self._teacher_logits = self._teacher(self.images)
            if self._taps:
                self._teacher_features = self._taps[0].value
        return self._teacher_logits

    @property
    def student_logits(self) -> torch.Tensor:
        if self._student_logits is None:
            self._student_logits = self._student(self.images)
            if self._taps:
                self._student_features = self._taps[1].value
        return self._student_logits

    @property
    def teacher_features(self) -> torch.Tensor:
        """The teacher's penultimate feature (the input of its classifier), from the same forward as its logits."""
        self.teacher_logits
        return self._teacher_features

    @property
    def student_features(self) -> torch.Tensor:
        self.student_logits
        return self._student_features

    @property
    def targets(self) -> torch.Tensor:
        if self._targets is None:
            logits = self.teacher_logits.detach()
            self._targets = F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)
        return self._targets

    @property
    def bn_stats(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(batch mean, biased batch var, running mean, running var) at the input of every teacher BN."""
        self.teacher_logits  # the statistics are recorded during the teacher's forward
        return self._bn_stats()


class PenultimateTap:
    """Keeps the input of a model's last nn.Linear (its penultimate feature) from the latest forward."""

    def __init__(self, model: torch.nn.Module):
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise UnsupportedModel("a feature loss needs a model whose classifier is an nn.Linear")
        self.value = None
        self.handle = linears[-1].register_forward_pre_hook(self._keep)

    def _keep(self, module, inputs):
        self.value = inputs[0]

    def close(self) -> None:
        self.handle.remove()


class LossTerm:
    needs_bn_stats = False  # the trainer records the teacher's BN-input statistics only when a term needs them
    needs_features = False  # ... and taps the penultimate features only when a term needs them

    def __init__(self, weight: float = 1.0):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise ValueError(f"weight={weight!r} must be a finite number >= 0")
        self.weight = float(weight)

    def __call__(self, step: Step) -> torch.Tensor:
        raise NotImplementedError


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c target_c log softmax(logits)_c (hard labels as one-hot rows)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@register(GENERATOR_LOSSES, "ce")
class TeacherCE(LossTerm):
    """GDFQ: the teacher must classify a generated image as the label it was generated for (Qimera: the
    superposed soft label of a boundary sample)."""

    def __call__(self, step):
        return soft_cross_entropy(step.teacher_logits, step.targets)


@register(GENERATOR_LOSSES, "bns")
class BNStatLoss(LossTerm):
    """GDFQ's BNS: mean over BN layers of MSE(batch mean, running mean) + MSE(batch var, running var), taken at
    the BN inputs (biased batch variance)."""

    needs_bn_stats = True

    def __call__(self, step):
        stats = step.bn_stats
        if not stats:
            raise UnsupportedModel("generator loss 'bns' needs a teacher with BatchNorm2d layers")
        total = sum(F.mse_loss(mean, rm) + F.mse_loss(var, rv) for mean, var, rm, rv in stats)
        return total / len(stats)


@register(GENERATOR_LOSSES, "adversarial_l1")
class AdversarialL1(LossTerm):
    """ZAQ-style disagreement: the generator maximizes the student-teacher logit L1 distance."""

    def __call__(self, step):
        return -(step.student_logits - step.teacher_logits).abs().mean()


@register(GENERATOR_LOSSES, "activation")
class FeatureActivation(LossTerm):
    """DAFL's activation term as ZAQ uses it: the generator maximizes the mean absolute value of the teacher's
    penultimate feature (returns its negative)."""

    needs_features = True

    def __call__(self, step):
        return -step.teacher_features.abs().mean()


@register(GENERATOR_LOSSES, "disagreement_ce")
class DisagreementCE(LossTerm):
    """AdaSG/AdaDFQ's "disagreement sample" term: CE of the logit difference (teacher - student) against the
    label, so that the generated image is one the student gets less right than the teacher."""

    def __call__(self, step):
        return soft_cross_entropy(step.teacher_logits - step.student_logits, step.targets)


@register(GENERATOR_LOSSES, "agreement_ce")
class AgreementCE(LossTerm):
    """AdaSG/AdaDFQ's "agreement sample" term: CE of the logit sum (teacher + student) against the label."""

    def __call__(self, step):
        return soft_cross_entropy(step.teacher_logits + step.student_logits, step.targets)


def difference_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0):
    """Per-sample entropy of softmax((teacher - student) / T): log(#classes) when the student's logits equal the
    teacher's up to a constant, small when they disagree sharply on one class."""
    log_p = F.log_softmax((teacher_logits - student_logits) / temperature, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


@register(GENERATOR_LOSSES, "adaptability_margin")
class AdaptabilityMargin(LossTerm):
    """AdaSG/AdaDFQ's margin on sample adaptability: h = entropy of softmax(teacher - student) per sample,
    rescaled over the batch to h' = (h - min h) / (log C - min h), is kept inside [lower, upper] by the hinge
    mean(relu(lower - h')) + mean(relu(h' - upper)) (AdaSG: 0.3 / 0.8, AdaDFQ CIFAR: 0.1 / 0.8). The gradient
    flows through the batch minimum too, as in the official code."""

    def __init__(self, weight: float = 1.0, lower: float = 0.3, upper: float = 0.8):
        super().__init__(weight)
        for key, v in (("lower", lower), ("upper", upper)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{key}={v!r} must be a number in [0, 1]")
        if lower > upper:
            raise ValueError(f"lower={lower!r} must not exceed upper={upper!r}")
        self.lower, self.upper = float(lower), float(upper)

    def __call__(self, step):
        h = difference_entropy(step.teacher_logits, step.student_logits)
        h_min = h.min()
        # (guarded against 0/0 when every sample is at the maximum entropy log C)
        scaled = (h - h_min) / (math.log(step.teacher_logits.shape[1]) - h_min).clamp_min(1e-12)
        return F.relu(self.lower - scaled).mean() + F.relu(scaled - self.upper).mean()


KD_REDUCTIONS = ("mean", "batchmean")


@register(STUDENT_LOSSES, "kd")
class DistillationKL(LossTerm):
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2. reduction "mean" averages over batch x classes
    (PyTorch's KLDivLoss default, as GDFQ/Qimera/AIT use it: the term is divided by the number of classes);
    "batchmean" sums over classes and averages over the batch (IntraQ/HAST)."""

    def __init__(self, weight: float = 1.0, temperature: float = 20.0, reduction: str = "mean"):
        super().__init__(weight)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        if reduction not in KD_REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is not valid; choose one of: {', '.join(KD_REDUCTIONS)}")
        self.temperature, self.reduction = float(temperature), reduction

    def __call__(self, step):
        t = self.temperature
        log_p = F.log_softmax(step.student_logits / t, dim=1)
        q = F.softmax(step.teacher_logits.detach() / t, dim=1)
        kl = F.kl_div(log_p, q, reduction="sum") / log_p.shape[0]  # batchmean
        if self.reduction == "mean":
            kl = kl / log_p.shape[1]
        return kl * t * t


@register(STUDENT_LOSSES, "ce")
class StudentCE(LossTerm):
    """Cross-entropy of the student against the generator's labels (soft for Qimera's boundary samples)."""

    def __call__(self, step):
        return soft_cross_entropy(step.student_logits, step.targets)


@register(STUDENT_LOSSES, "l1")
class LogitL1(LossTerm):
    """ZAQ-style: mean absolute difference of student and teacher logits."""

    def __call__(self, step):
        return (step.student_logits - step.teacher_logits.detach()).abs().mean()


@register(STUDENT_LOSSES, "difference_entropy")
class DifferenceEntropy(LossTerm):
    """AdaSG/AdaDFQ's student loss: -T^2 * mean entropy of softmax((teacher - student) / T), T = 20; minimal
    (-T^2 log C) when the student's logits equal the teacher's up to a per-sample constant."""

    def __init__(self, weight: float = 1.0, temperature: float = 20.0):
        super().__init__(weight)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        self.temperature = float(temperature)

    def __call__(self, step):
        t = self.temperature
        return -t * t * difference_entropy(step.teacher_logits.detach(), step.student_logits, t).mean()


@register(STUDENT_LOSSES, "feature_mse")
class FeatureMSE(LossTerm):
    """HAST's feature alignment: MSE between the student's and the teacher's penultimate features (decision: the
    paper aligns "features"; the classifier input is the one feature every classifier has)."""

    needs_features = True

    def __call__(self, step):
        return F.mse_loss(step.student_features.flatten(1), step.teacher_features.detach().flatten(1))


def build_terms(specs: dict | None, registry: dict[str, type], what: str,
                allow_empty: bool = False) -> list[tuple[str, LossTerm]]:
    """{name: {weight: w, ...settings}} -> [(name, term)], leaving out terms of weight 0."""
    if allow_empty and not specs:
        return []
    if not isinstance(specs, dict) or not specs:
        raise ValueError(f"{what} must map at least one loss name to its settings; choose from: "
                         f"{', '.join(sorted(registry))}")
    terms = []
    for name, settings in specs.items():
        try:
            term = build(registry, name, what, settings)
        except (TypeError, ValueError) as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith(what) else f"{what}.{name}: {msg}") from None
        if term.weight > 0:
            terms.append((name, term))
    if not terms:
        raise ValueError(f"{what}: every term has weight 0; give at least one a positive weight")
    return terms


def weighted_sum(terms: list[tuple[str, LossTerm]], step: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    values = {name: term(step) for name, term in terms}
    total = sum(term.weight * values[name] for name, term in terms)
    return total, values
