"""Loss terms of the generator step and of the student step, chosen by name in the method yaml.

A term is called with a `Step` (one batch: images, soft targets, teacher/student outputs computed on first use)
and returns a scalar; its `weight` multiplies it in the sum (weight 0 leaves the term out). Register a new term
with `@register(GENERATOR_LOSSES, "name")` or `@register(STUDENT_LOSSES, "name")`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModel
from ..synth.bn_kl import gaussian_kl
from .registry import build, register

GENERATOR_LOSSES: dict[str, type] = {}
STUDENT_LOSSES: dict[str, type] = {}


class Step:
    """What a loss term may read for one batch. `targets` are soft labels [B, classes] (one-hot for plain labels,
    mixtures for Qimera's superposed samples; None for an unconditional generator, which then uses the teacher's
    own prediction as a pseudo-label). Teacher and student logits are computed when a term first asks. `taps` is
    (teacher, student) FeatureTaps; `teacher_features` their kind -> feature dict, when the logits are given."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor | None, teacher: Callable | None = None,
                 student: Callable | None = None, teacher_logits: torch.Tensor | None = None,
                 bn_stats: Callable[[], list] | None = None, taps: tuple | None = None,
                 teacher_features: dict | None = None, epoch: int | None = None, teacher_grad: bool = False):
        self.images = images
        self.teacher_grad = teacher_grad  # student terms differentiate through the teacher too (as_target)
        self.epoch = epoch  # the trainer's 0-based epoch (terms gated by epoch: class_bns); None outside it
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
    def teacher_feature_set(self) -> dict:
        """Every tapped teacher feature (kind -> tensor or list), from the same forward as its logits."""
        self.teacher_logits
        return self._teacher_features

    @property
    def teacher_features(self) -> torch.Tensor:
        """The teacher's penultimate feature (the input of its classifier), from the same forward as its logits."""
        self.teacher_logits
        return self._teacher_features["penultimate"]

    @property
    def student_feature_set(self) -> dict:
        """Every tapped student feature (kind -> tensor or list), from the same forward as its logits."""
        self.student_logits
        return self._student_features

    @property
    def student_features(self) -> torch.Tensor:
        self.student_logits
        return self._student_features["penultimate"]

    @property
    def teacher_stages(self) -> list[torch.Tensor]:
        """The teacher's stage outputs (see train.features), from the same forward as its logits."""
        self.teacher_logits
        return self._teacher_features["stages"]

    @property
    def student_stages(self) -> list[torch.Tensor]:
        self.student_logits
        return self._student_features["stages"]

    def as_target(self, value: torch.Tensor) -> torch.Tensor:
        """A teacher value where a student term compares against it: detached, unless the step differentiates
        through the teacher (HAST's code takes its perturbation direction through both networks; the student's
        parameter gradients are the same either way)."""
        return value if self.teacher_grad else value.detach()

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


class LossTerm:
    needs_bn_stats = False  # the trainer records the teacher's BN-input statistics only when a term needs them
    features: frozenset[str] = frozenset()  # ... and taps the features (train.features kinds) terms name here

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


CLASS_BNS_CENTROIDS = ("running_stats", "class_ema")
CLASS_BNS_REDUCTIONS = ("official_recurrent", "mean")


def official_start_layer(num_bn: int) -> int:
    """ClusterQ's first BN layer of the class-wise term: int((nBN + 1) / 2) - 2 (pytorchcv ResNet-20, 21 BNs: 9)."""
    return int((num_bn + 1) / 2) - 2


def recurrent_weights(batch: int, layers: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """[batch, layers] weights w with sum(w * d) == the official loop `for i in samples: for l in layers:
    C = (C + d[i, l]) / layers` started at C = 0: d[i, j] is divided once for every step from its own on, i.e.
    w[i, j] = layers ** -((batch - i) * layers - j) (computed in log space; far-back terms underflow to 0)."""
    i = torch.arange(batch, dtype=torch.float64)[:, None]
    j = torch.arange(layers, dtype=torch.float64)[None, :]
    steps = (batch - i) * layers - j
    return torch.exp(-steps * math.log(layers)).to(dtype=dtype, device=device)


@register(GENERATOR_LOSSES, "class_bns")
class ClassBNS(LossTerm):
    """ClusterQ's class-wise BN-statistics term (Gao et al., ICDM 2022; DiamondSheep/ClusterQ trainer.py
    compute_class_BNS_loss), on the teacher's BN-input statistics of the generated batch:

        for each sample i (class c_i), for each BN layer l >= start_layer:
            C = (C + MSE(batch mean_l, centroid_mean[c_i, l]) + MSE(batch var_l, centroid_var[c_i, l])) / K
        return C + dbns_weight * D_BNS,   K = nBN - start_layer

    - the division by K sits INSIDE the layer loop (`reduction: official_recurrent`, the code): the value is a
      geometrically weighted sum dominated by the last BN layer of the last sample (recurrent_weights);
      `reduction: mean` is the plain mean over samples and layers (not the code);
    - `centroids: running_stats` (the code): its forward hook stores module.running_mean/var, not the batch's, so
      its per-class "soft" centroids (init_soft_stat, EMA in update_soft_stat) always equal the teacher's
      running statistics, the same for every class; `class_ema` (the paper's description): per-class EMAs of
      the class's own BN-input statistics, started at epoch `after_epoch` from one generated image per class,
      then updated with `decay` at the start of every later epoch when the teacher classifies that class's
      image correctly (the trainer calls start_epoch with a probe);
    - D_BNS = sum over samples and layers of MSE(x, x + U(-a, a)) for the mean (a = dbns_noise[0]) and the
      variance (dbns_noise[1]): zero gradient, only a value (weight 0.1 in the code, 0 leaves it out);
    - gating: 0 (no gradient) until the epoch after `after_epoch` (the code: epoch > soft_stat_epoch);
      `after_epoch: warmup` takes the schedule's warmup_epochs (the code's CIFAR/ImageNet hocons:
      soft_stat_epoch = warmup_epochs). Outside the trainer (Step.epoch None) the term is on.
    Labels are the argmax of the step's targets (the generator's labels)."""

    needs_bn_stats = True

    def __init__(self, weight: float = 0.9, after_epoch="warmup", start_layer="official",
                 reduction: str = "official_recurrent", centroids: str = "running_stats", decay: float = 0.2,
                 dbns_weight: float = 0.1, dbns_noise: tuple[float, float] = (0.03, 0.05), noise_seed: int = 0):
        super().__init__(weight)
        if after_epoch != "warmup" and (isinstance(after_epoch, bool) or not isinstance(after_epoch, int)
                                        or after_epoch < 0):
            raise ValueError(f"after_epoch={after_epoch!r} must be 'warmup' or an integer >= 0")
        if start_layer != "official" and (isinstance(start_layer, bool) or not isinstance(start_layer, int)
                                          or start_layer < 0):
            raise ValueError(f"start_layer={start_layer!r} must be 'official' or an integer >= 0")
        if reduction not in CLASS_BNS_REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is not valid; choose one of: {', '.join(CLASS_BNS_REDUCTIONS)}")
        if centroids not in CLASS_BNS_CENTROIDS:
            raise ValueError(f"centroids={centroids!r} is not valid; choose one of: {', '.join(CLASS_BNS_CENTROIDS)}")
        for key, value in (("decay", decay), ("dbns_weight", dbns_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (key == "decay" and value > 1):
                raise ValueError(f"{key}={value!r} must be a number in [0, {1 if key == 'decay' else 'inf'})")
        try:
            noise = tuple(float(v) for v in dbns_noise)
        except (TypeError, ValueError):
            noise = ()
        if len(noise) != 2 or min(noise) < 0:
            raise ValueError(f"dbns_noise={dbns_noise!r} must be two numbers >= 0 (mean, variance noise widths)")
        self.after_epoch, self.start_layer, self.reduction = after_epoch, start_layer, reduction
        self.centroids, self.decay = centroids, float(decay)
        self.dbns_weight, self.dbns_noise = float(dbns_weight), noise
        self.noise = torch.Generator().manual_seed(int(noise_seed))  # D_BNS's noise: a value only, own stream
        self.needs_class_probes = centroids == "class_ema"
        self.cent_mean: list[torch.Tensor] | None = None  # class_ema: per layer [classes, channels]
        self.cent_var: list[torch.Tensor] | None = None
        self.probes = {"init": 0, "updates": 0, "skipped": 0}

    # -- the schedule and the epochs
    def bind_schedule(self, schedule) -> None:
        if self.after_epoch == "warmup":
            self.after_epoch = int(schedule.warmup_epochs)
        if self.after_epoch + 1 >= schedule.epochs:
            print(f"dfqbench: generator loss 'class_bns' is on from epoch {self.after_epoch + 2} (after_epoch="
                  f"{self.after_epoch}), after the last of {schedule.epochs}: it never acts", file=sys.stderr)

    def active(self, epoch: int | None) -> bool:
        if epoch is None:
            return True
        if self.after_epoch == "warmup":
            raise ValueError("class_bns: after_epoch='warmup' needs the schedule (bind_schedule) before training")
        return epoch > self.after_epoch

    @torch.no_grad()
    def start_epoch(self, epoch: int, probe: Callable, num_classes: int) -> None:
        """class_ema only (the code's init_soft_stat at epoch == after_epoch, update_soft_stat after it):
        probe(class index, augment) -> (teacher logits [1, classes], BN stats of that one generated image)."""
        if not self.needs_class_probes or epoch < self.after_epoch:
            return
        if epoch == self.after_epoch or self.cent_mean is None:  # init: one image per class, no augmentation
            means, vars_ = [], []
            for c in range(num_classes):
                logits, stats = probe(c, False)
                means.append([m.detach().clone() for m, _, _, _ in stats])
                vars_.append([v.detach().clone() for _, v, _, _ in stats])
            self.cent_mean = [torch.stack([m[l] for m in means]) for l in range(len(means[0]))]
            self.cent_var = [torch.stack([v[l] for v in vars_]) for l in range(len(vars_[0]))]
            self.probes["init"] += 1
            return
        for c in range(self.cent_mean[0].shape[0]):  # update: augmented, only when the teacher gets it right
            logits, stats = probe(c, True)
            if int(logits.argmax(dim=1)[0]) != c:
                self.probes["skipped"] += 1
                continue
            for l, (m, v, _, _) in enumerate(stats):
                self.cent_mean[l][c] = (1.0 - self.decay) * self.cent_mean[l][c] + self.decay * m
                self.cent_var[l][c] = (1.0 - self.decay) * self.cent_var[l][c] + self.decay * v
            self.probes["updates"] += 1

    def state_dict(self) -> dict:
        return {"after_epoch": self.after_epoch, "cent_mean": self.cent_mean, "cent_var": self.cent_var,
                "probes": dict(self.probes), "noise": self.noise.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.cent_mean, self.cent_var = state["cent_mean"], state["cent_var"]
        self.probes = dict(state["probes"])
        self.noise.set_state(state["noise"])

    # -- the value
    def first_layer(self, num_bn: int) -> int:
        start = official_start_layer(num_bn) if self.start_layer == "official" else self.start_layer
        if not 0 <= start < num_bn:
            raise UnsupportedModel(f"generator loss 'class_bns': start layer {start} is outside the teacher's "
                                   f"{num_bn} BatchNorm2d layers (start_layer={self.start_layer!r}; 'official' "
                                   f"needs at least 3)")
        return start

    def distances(self, stats: list, labels: torch.Tensor) -> torch.Tensor:
        """[B, K]: MSE(batch mean_l, centroid mean) + MSE(batch var_l, centroid var) for sample i, layer start+j."""
        start = self.first_layer(len(stats))
        cols = []
        for l in range(start, len(stats)):
            mean, var, rm, rv = stats[l]
            if self.centroids == "running_stats":
                d = (F.mse_loss(mean, rm) + F.mse_loss(var, rv)).expand(labels.shape[0])
            else:
                if self.cent_mean is None:
                    raise RuntimeError("class_bns (centroids: class_ema): the centroids are not initialised; "
                                       "the trainer's start_epoch(after_epoch) makes them")
                cm, cv = self.cent_mean[l].to(mean.device), self.cent_var[l].to(var.device)
                per_class = ((mean[None] - cm) ** 2).mean(dim=1) + ((var[None] - cv) ** 2).mean(dim=1)
                d = per_class[labels]
            cols.append(d)
        return torch.stack(cols, dim=1)

    def dbns(self, stats: list, batch: int) -> torch.Tensor:
        """The code's D_BNS: per sample and layer, MSE(x, x + U(-a, a)) for the batch mean and variance (its
        gradient is exactly 0; the value is ~ batch * layers * (a_mean^2 + a_var^2) / 3)."""
        total = 0.0
        for mean, var, _, _ in stats[self.first_layer(len(stats)):]:
            for x, a in ((mean, self.dbns_noise[0]), (var, self.dbns_noise[1])):
                u = (torch.rand(batch, x.shape[0], generator=self.noise) * 2 - 1) * a
                xb = x[None].expand(batch, -1)
                total = total + ((xb - (xb + u.to(x.device, x.dtype))) ** 2).mean(dim=1).sum()
        return total

    def __call__(self, step):
        stats = step.bn_stats
        if not stats:
            raise UnsupportedModel("generator loss 'class_bns' needs a teacher with BatchNorm2d layers")
        if not self.active(step.epoch):
            return stats[0][0].new_zeros(())
        labels = step.targets.argmax(dim=1)
        d = self.distances(stats, labels)
        if self.reduction == "official_recurrent":
            value = (d * recurrent_weights(*d.shape, dtype=d.dtype, device=d.device)).sum()
        else:
            value = d.mean()
        if self.dbns_weight:
            value = value + self.dbns_weight * self.dbns(stats, d.shape[0])
        return value


@register(GENERATOR_LOSSES, "adversarial_l1")
class AdversarialL1(LossTerm):
    """ZAQ-style disagreement: the generator maximizes the student-teacher logit L1 distance."""

    def __call__(self, step):
        return -(step.student_logits - step.teacher_logits).abs().mean()


@register(GENERATOR_LOSSES, "activation")
class FeatureActivation(LossTerm):
    """DAFL's activation term as ZAQ uses it: the generator maximizes the mean absolute value of the teacher's
    penultimate feature (returns its negative)."""

    features = frozenset({"penultimate"})

    def __call__(self, step):
        return -step.teacher_features.abs().mean()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)


@register(GENERATOR_LOSSES, "class_balance")
class ClassBalance(LossTerm):
    """DFQF's inception-score term on the teacher's softmax p: mean_b H(p_b) - marginal * H(mean_b p_b), i.e.
    confident predictions per image and all classes equally often over the batch (DFQF: marginal 40)."""

    def __init__(self, weight: float = 1.0, marginal: float = 40.0):
        super().__init__(weight)
        if isinstance(marginal, bool) or not isinstance(marginal, (int, float)) or not math.isfinite(marginal) \
                or marginal < 0:
            raise ValueError(f"marginal={marginal!r} must be a finite number >= 0")
        self.marginal = float(marginal)

    def __call__(self, step):
        p = F.softmax(step.teacher_logits, dim=1)
        return _entropy(p).mean() - self.marginal * _entropy(p.mean(dim=0))


@register(GENERATOR_LOSSES, "bn_kl")
class BNStatKL(LossTerm):
    """DFQF's BN-statistics term: summed over the teacher's BN layers, the channel mean of
    var - running_var * log(var) + (mean - running_mean)^2 (minimal at the running statistics; var floored at
    1e-8). The batch variance is the biased one (DFQF's code: unbiased; n / (n - 1) ~ 1 at these sizes)."""

    needs_bn_stats = True

    def __call__(self, step):
        stats = step.bn_stats
        if not stats:
            raise UnsupportedModel("generator loss 'bn_kl' needs a teacher with BatchNorm2d layers")
        return sum((v.clamp_min(1e-8) - rv * torch.log(v.clamp_min(1e-8)) + (m - rm) ** 2).mean()
                   for m, v, rm, rv in stats)


@register(GENERATOR_LOSSES, "bn_gauss_kl")
class BNGaussianKL(LossTerm):
    """AdvKD's BN term (its unofficial code, utils/core.py): summed over the teacher's BN layers and channels,
    KL(N(batch mean, biased batch var) || N(running mean, running var)) =
    ((mean - running_mean)^2 + var) / (2 running_var) - log(std / running_std) - 1/2.
    `direction: running_to_batch` is KW's / Q-ASR's KL(stored || batch); `reduction: mean` averages over
    channels instead of summing."""

    needs_bn_stats = True
    DIRECTIONS, REDUCTIONS = ("batch_to_running", "running_to_batch"), ("sum", "mean")

    def __init__(self, weight: float = 1.0, direction: str = "batch_to_running", reduction: str = "sum"):
        super().__init__(weight)
        if direction not in self.DIRECTIONS:
            raise ValueError(f"direction={direction!r} is not valid; choose one of: {', '.join(self.DIRECTIONS)}")
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is not valid; choose one of: {', '.join(self.REDUCTIONS)}")
        self.direction, self.reduction = direction, reduction

    def __call__(self, step):
        stats = step.bn_stats
        if not stats:
            raise UnsupportedModel("generator loss 'bn_gauss_kl' needs a teacher with BatchNorm2d layers")
        total = 0.0
        for m, v, rm, rv in stats:
            batch, running = (m, v.clamp_min(1e-12).sqrt()), (rm, rv.sqrt())
            p, q = (batch, running) if self.direction == "batch_to_running" else (running, batch)
            kl = gaussian_kl(*p, *q)
            total = total + (kl.sum() if self.reduction == "sum" else kl.mean())
        return total


@register(GENERATOR_LOSSES, "adversarial_kd")
class AdversarialKD(LossTerm):
    """DFQF's (and DFAD's) adversarial term: the generator maximizes KL(teacher || student) at T = 1, summed
    over classes and averaged over the batch (returns its negative)."""

    def __call__(self, step):
        log_p = F.log_softmax(step.student_logits, dim=1)
        q = F.softmax(step.teacher_logits, dim=1)
        return -F.kl_div(log_p, q, reduction="batchmean")


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
        q = F.softmax(step.as_target(step.teacher_logits) / t, dim=1)
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
        return (step.student_logits - step.as_target(step.teacher_logits)).abs().mean()


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
        return -t * t * difference_entropy(step.as_target(step.teacher_logits), step.student_logits, t).mean()


@register(STUDENT_LOSSES, "feature_mse")
class FeatureMSE(LossTerm):
    """MSE between the student's and the teacher's penultimate features (the classifier's input): dfqbench's
    first reading of HAST's "feature alignment", kept as an option (HAST's code: attention_mse)."""

    features = frozenset({"penultimate"})

    def __call__(self, step):
        return F.mse_loss(step.student_features.flatten(1), step.as_target(step.teacher_features).flatten(1))


def channel_attention(f: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C]: the mean over positions of f^2 per channel, L2-normalized per sample."""
    return F.normalize(f.pow(2).mean(dim=(2, 3)).flatten(1), dim=1)


@register(STUDENT_LOSSES, "attention_mse")
class ChannelAttentionMSE(LossTerm):
    """HAST's feature alignment (its code's loss_fa): summed over the residual units, the MSE between the
    student's and the teacher's channel attention (channel_attention) of each unit's branch output, taken
    before the identity is added (pytorchcv's ResUnit.body)."""

    features = frozenset({"residual_branches"})

    def __call__(self, step):
        student, teacher = step.student_feature_set["residual_branches"], step.teacher_feature_set["residual_branches"]
        return sum(F.mse_loss(channel_attention(s), channel_attention(step.as_target(t)))
                   for s, t in zip(student, teacher, strict=True))


def _spatial_relation(f: torch.Tensor, gamma: float) -> torch.Tensor:
    """f [B, C, N] -> f + gamma * f @ softmax(f^T f)^T: each position mixed with the positions it resembles."""
    attention = torch.softmax(f.transpose(1, 2) @ f, dim=-1)  # [B, N, N]
    return f + gamma * (f @ attention.transpose(1, 2))


def _channel_relation(f: torch.Tensor, gamma: float) -> torch.Tensor:
    """f [B, C, N] -> f + gamma * softmax(max - f f^T) @ f: each channel mixed with the channels least like it
    (the max-minus-energy form of the DANet channel attention ZAQ's code uses)."""
    energy = f @ f.transpose(1, 2)  # [B, C, C]
    attention = torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)
    return f + gamma * (attention @ f)


def scrm_distance(student: list[torch.Tensor], teacher: list[torch.Tensor], gamma: float = 0.1) -> torch.Tensor:
    """ZAQ's spatial and channel relation distance summed over stages: per stage, both feature maps are
    L2-normalized along the channels, passed through the spatial and the channel relation maps, and compared by
    mean absolute difference (spatial + channel)."""
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        s, t = F.normalize(s.flatten(2), dim=1), F.normalize(t.flatten(2), dim=1)
        total = total + F.l1_loss(_spatial_relation(s, gamma), _spatial_relation(t, gamma)) \
            + F.l1_loss(_channel_relation(s, gamma), _channel_relation(t, gamma))
    return total


class _SCRMTerm(LossTerm):
    features = frozenset({"stages"})

    def __init__(self, weight: float = 1.0, gamma: float = 0.1):
        super().__init__(weight)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma={gamma!r} must be a finite number >= 0")
        self.gamma = float(gamma)


@register(STUDENT_LOSSES, "scrm")
class StudentSCRM(_SCRMTerm):
    """ZAQ's intermediate-feature term: the student matches the teacher's stage-wise spatial and channel
    relations (scrm_distance, teacher side detached)."""

    def __call__(self, step):
        return scrm_distance(step.student_stages, [step.as_target(t) for t in step.teacher_stages], self.gamma)


@register(GENERATOR_LOSSES, "scrm")
class AdversarialSCRM(_SCRMTerm):
    """ZAQ's generator side of SCRM: the generator maximizes the same distance (returns its negative)."""

    def __call__(self, step):
        return -scrm_distance(step.student_stages, step.teacher_stages, self.gamma)


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
