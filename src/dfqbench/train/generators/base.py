"""Image generators of the GDFQ family, chosen by name (`method.generator.name`).

Every generator maps a `Sample` (noise, labels, mixing weights, soft targets) drawn by its own `sample()` to a
batch of images in the teacher's normalized input space: the last layer is a BatchNorm without affine
parameters, so in training mode each output channel has batch mean 0 and variance 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from ...synth.augment import apply_theta, crop_boxes, crop_flip, crop_flip_theta, scale_pair
from ...settings import check_int

GENERATORS: dict[str, type] = {}


@dataclass
class Sample:
    z: torch.Tensor  # [B, K, latent]: one noise vector per superposed component (K = 1 unless mixing)
    labels: torch.Tensor | None  # [B, K] class indices; None for an unconditional generator
    weights: torch.Tensor | None  # [B, K] mixing weights summing to 1
    targets: torch.Tensor | None  # [B, classes] soft labels: sum_k weights_k * one_hot(labels_k)
    images: torch.Tensor | None = None  # a fixed set's drawn (augmented) images: forward returns them
    theta: torch.Tensor | None = None  # [B, 2, 3] affine crop/flip of the generated images (`augment`), or None

    def to(self, device: torch.device) -> "Sample":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Sample(move(self.z), move(self.labels), move(self.weights), move(self.targets), move(self.images),
                      move(self.theta))


def _check_shape(image_shape) -> tuple[int, int]:
    channels, height, width = image_shape
    if height != width or height % 4:
        raise ValueError(f"the generator needs square images with a side divisible by 4, not {height}x{width}")
    return channels, height


class Trunk(nn.Module):
    """GDFQ's decoder: Linear -> 128 x (S/4)^2, BN, up x2, conv 3x3 128->128, BN, LeakyReLU 0.2, up x2,
    conv 128->64, BN, LeakyReLU 0.2, conv 64->C, tanh, BN(affine=False). `bn_eps` 0.8 reproduces the original
    `BatchNorm2d(n, 0.8)` (the second positional argument is eps, not momentum)."""

    def __init__(self, latent_dim: int, channels: int, size: int, bn_eps: float = 0.8, width: int = 128):
        super().__init__()
        self.init_size, self.width = size // 4, width
        self.fc = nn.Linear(latent_dim, width * self.init_size ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, eps=bn_eps), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2, eps=bn_eps), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, channels, 3, padding=1), nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.fc(h).view(h.shape[0], self.width, self.init_size, self.init_size)
        return self.body(out)


class ConditionalBN(nn.Module):
    """Class-conditional BatchNorm: affine-free BN, then a per-class scale (init 1) and shift (init 0). With
    superposed labels [B, K] and mixing weights [B, K], the scale and shift are mean_k(weight_k * embedding(label_k))
    (Qimera's ImageNet generator: a mean over the K components, not a sum)."""

    def __init__(self, num_classes: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=eps, affine=False)
        self.scale = nn.Embedding(num_classes, channels)
        self.shift = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if labels.dim() == 1:
            labels = labels[:, None]
        w = torch.ones(labels.shape, device=x.device) if weights is None else weights
        scale = (self.scale(labels) * w.unsqueeze(2)).mean(dim=1)
        shift = (self.shift(labels) * w.unsqueeze(2)).mean(dim=1)
        return self.bn(x) * scale[:, :, None, None] + shift[:, :, None, None]


class ConditionalTrunk(nn.Module):
    """The GDFQ lineage's ImageNet decoder: Trunk's layers with its three BatchNorms class-conditional
    (the first with eps 1e-5, the other two with `bn_eps`)."""

    def __init__(self, latent_dim: int, channels: int, size: int, num_classes: int, bn_eps: float = 0.8,
                 width: int = 128):
        super().__init__()
        self.init_size, self.width = size // 4, width
        self.fc = nn.Linear(latent_dim, width * self.init_size ** 2)
        self.norm0 = ConditionalBN(num_classes, width)
        self.conv1, self.norm1 = nn.Conv2d(width, width, 3, padding=1), ConditionalBN(num_classes, width, bn_eps)
        self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1)
        self.norm2 = ConditionalBN(num_classes, width // 2, bn_eps)
        self.to_image = nn.Sequential(nn.Conv2d(width // 2, channels, 3, padding=1), nn.Tanh(),
                                      nn.BatchNorm2d(channels, affine=False))

    def forward(self, h: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm0(self.fc(h).view(h.shape[0], self.width, self.init_size, self.init_size), labels, weights)
        x = F.leaky_relu(self.norm1(self.conv1(F.interpolate(x, scale_factor=2)), labels, weights), 0.2)
        x = F.leaky_relu(self.norm2(self.conv2(F.interpolate(x, scale_factor=2)), labels, weights), 0.2)
        return self.to_image(x)


def _conditional_bn(value, size: int) -> bool:
    """`auto`: the lineage's ImageNet generator (conditional BNs) for inputs larger than 64 px, else the CIFAR one."""
    if value == "auto":
        return size > 64
    if not isinstance(value, bool):
        raise ValueError(f"conditional_bn={value!r} is not valid; choose one of: auto, true, false")
    return value


AUGMENT_KEYS = ("prob", "crop_scale", "flip_prob", "ratio")


def check_augment(augment) -> dict | None:
    """`augment` of a generator: null (off) or {prob, crop_scale, flip_prob, ratio} -> the checked settings."""
    if augment is None or augment is False:
        return None
    if not isinstance(augment, dict):
        raise ValueError(f"augment={augment!r} must be null or a mapping with keys {list(AUGMENT_KEYS)}")
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"augment: unknown setting(s) {unknown}; valid: {list(AUGMENT_KEYS)}")
    out = {"prob": augment.get("prob", 0.5), "flip_prob": augment.get("flip_prob", 0.5)}
    for key, value in out.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"augment.{key}={value!r} must be a number in [0, 1]")
    out["crop_scale"] = scale_pair("augment.crop_scale", augment.get("crop_scale", (0.8, 1.0)))
    out["ratio"] = scale_pair("augment.ratio", augment.get("ratio", (3 / 4, 4 / 3)), high=None)
    return out


def batch_crop_flip_theta(n: int, rng: torch.Generator, prob: float, crop_scale: tuple[float, float],
                          flip_prob: float, ratio: tuple[float, float]) -> torch.Tensor | None:
    """ClusterQ's augmentation of a generated batch (its trainer.augmentation): with probability `prob` the WHOLE
    batch is augmented (else None: the images pass unchanged), and then every image gets its own
    RandomResizedCrop (area fraction in `crop_scale`, aspect ratio log-uniform in `ratio`, resized back) and a
    horizontal flip with probability `flip_prob`. Returns the [n, 2, 3] affine matrices for `affine_grid`. The box
    is continuous (torchvision's: whole pixels) and sampled bilinearly."""
    if float(torch.rand((), generator=rng)) >= prob:
        return None
    w, h = crop_boxes(n, rng, crop_scale, ratio)  # torchvision's RandomResizedCrop box, as fractions of the image
    return crop_flip_theta(w, h, rng, flip_prob)


@register(GENERATORS, "gdfq")
class ConditionalGenerator(nn.Module):
    """GDFQ (Xu et al., ECCV 2020): input = label embedding * noise (element-wise), uniform random labels. On
    ImageNet (`conditional_bn`, auto: inputs > 64 px) the labels enter through conditional BatchNorms instead, and
    the input is the noise alone. `augment` (ClusterQ; default null = off): the generated batch is cropped and
    flipped before anyone sees it (batch_crop_flip_theta, drawn in sample(), applied in forward())."""

    def __init__(self, num_classes: int, image_shape, teacher_fc: torch.Tensor | None = None,
                 latent_dim: int = 100, bn_eps: float = 0.8, conditional_bn="auto", augment: dict | None = None):
        super().__init__()
        channels, size = _check_shape(image_shape)
        self.num_classes, self.latent_dim = num_classes, check_int("latent_dim", latent_dim)
        self.augment = check_augment(augment)
        self.conditional_bn = _conditional_bn(conditional_bn, size)
        if self.conditional_bn:
            self.trunk = ConditionalTrunk(latent_dim, channels, size, num_classes, bn_eps)
        else:
            self.embedding = nn.Embedding(num_classes, latent_dim)
            self.trunk = Trunk(latent_dim, channels, size, bn_eps)

    def sample(self, batch_size: int, rng: torch.Generator) -> Sample:
        z = torch.randn(batch_size, 1, self.latent_dim, generator=rng)
        labels = torch.randint(0, self.num_classes, (batch_size, 1), generator=rng)
        return self._augmented(_with_targets(z, labels, torch.ones(batch_size, 1), self.num_classes), rng)

    def sample_for(self, labels: torch.Tensor, rng: torch.Generator) -> Sample:
        """A sample for the given class indices [B] (ClusterQ's per-class probes): noise, then the augmentation."""
        n = labels.shape[0]
        z = torch.randn(n, 1, self.latent_dim, generator=rng)
        return self._augmented(_with_targets(z, labels.reshape(n, 1), torch.ones(n, 1), self.num_classes), rng)

    def _augmented(self, s: Sample, rng: torch.Generator) -> Sample:
        if self.augment:  # drawn after the noise and labels: without `augment` the stream is GDFQ's as before
            s.theta = batch_crop_flip_theta(s.z.shape[0], rng, **self.augment)
        return s

    def forward(self, s: Sample) -> torch.Tensor:
        if self.conditional_bn:
            return apply_theta(self.trunk(s.z[:, 0], s.labels), s.theta)
        return apply_theta(self.trunk(self.embedding(s.labels[:, 0]) * s.z[:, 0]), s.theta)


@register(GENERATORS, "qimera")
class SuperposedGenerator(nn.Module):
    """Qimera (Choi et al., NeurIPS 2021): input = per-vector standardized (label embedding + noise_scale * noise),
    summed over K superposed components with mixing weights. With probability `mix_prob` a whole batch is made of
    boundary samples: K = `mix_classes` uniform random labels per image, weights softmax(randn), soft target =
    the same mixture; otherwise K = 1. `embedding_init: teacher_fc` starts the embeddings from the teacher's
    classifier weights (then latent_dim must be the classifier's input width; null takes it). On ImageNet
    (`conditional_bn`, auto: inputs > 64 px) the superposed labels also drive conditional BatchNorms.
    `mix_norm` says how a superposed batch (K > 1) is standardized: "component" (the official code: main.py's
    BatchNorm1d on the 3-D `.T` standardizes each component k over all D features and B images at once) or
    "vector" (each of the B x K vectors over its D features, as a plain batch is; dfqbench before 2026-12-04)."""

    def __init__(self, num_classes: int, image_shape, teacher_fc: torch.Tensor | None = None,
                 latent_dim: int | None = None, mix_prob: float = 0.4, mix_classes: int = 2,
                 noise_scale: float = 1.0, embedding_init: str = "random", freeze_embedding: bool = False,
                 bn_eps: float = 0.8, conditional_bn="auto", mix_norm: str = "vector"):
        super().__init__()
        channels, size = _check_shape(image_shape)
        if mix_norm not in ("vector", "component"):
            raise ValueError(f"mix_norm={mix_norm!r} is not valid; choose one of: vector, component")
        self.mix_norm = mix_norm
        if embedding_init not in ("random", "teacher_fc"):
            raise ValueError(f"embedding_init={embedding_init!r} is not valid; choose one of: random, teacher_fc")
        if not 0.0 <= mix_prob <= 1.0:
            raise ValueError(f"mix_prob={mix_prob!r} must be in [0, 1]")
        feature_dim = None if teacher_fc is None else teacher_fc.shape[1]
        latent_dim = latent_dim if latent_dim is not None else feature_dim
        if latent_dim is None:
            raise ValueError("latent_dim=null needs a teacher whose classifier is an nn.Linear or a last 1x1 "
                             "convolution (its input width)")
        self.num_classes, self.latent_dim = num_classes, check_int("latent_dim", latent_dim)
        self.mix_prob, self.mix_classes = float(mix_prob), check_int("mix_classes", mix_classes)
        self.noise_scale = float(noise_scale)
        self.embedding = nn.Embedding(num_classes, latent_dim)
        if embedding_init == "teacher_fc":
            if teacher_fc is None or tuple(teacher_fc.shape) != (num_classes, latent_dim):
                raise ValueError(f"embedding_init=teacher_fc needs a classifier weight of shape "
                                 f"({num_classes}, {latent_dim})")
            self.embedding.weight.data.copy_(teacher_fc)
        self.embedding.weight.requires_grad_(not freeze_embedding)
        self.conditional_bn = _conditional_bn(conditional_bn, size)
        self.trunk = (ConditionalTrunk(latent_dim, channels, size, num_classes, bn_eps) if self.conditional_bn
                      else Trunk(latent_dim, channels, size, bn_eps))

    def sample(self, batch_size: int, rng: torch.Generator) -> Sample:
        k = self.mix_classes if float(torch.rand((), generator=rng)) < self.mix_prob else 1
        z = torch.randn(batch_size, k, self.latent_dim, generator=rng)
        labels = torch.randint(0, self.num_classes, (batch_size, k), generator=rng)
        weights = torch.softmax(torch.randn(batch_size, k, generator=rng), dim=1)
        return _with_targets(z, labels, weights, self.num_classes)

    def forward(self, s: Sample) -> torch.Tensor:
        h = self.embedding(s.labels) + self.noise_scale * s.z  # [B, K, D]
        if self.mix_norm == "component" and h.shape[1] > 1:  # BatchNorm1d on [D, K, B]: per k over D and B
            h = F.batch_norm(h.permute(2, 1, 0), None, None, training=True).permute(2, 1, 0)
        else:  # Qimera's affine-free normalizer on a plain batch: each vector over its D features
            h = F.layer_norm(h, h.shape[-1:])
        h = (h * s.weights.unsqueeze(2)).sum(dim=1)
        return self.trunk(h, s.labels, s.weights) if self.conditional_bn else self.trunk(h)


@torch.no_grad()
def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialization: conv weights ~ N(0, 0.02); affine BatchNorm weights ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.normal_(0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d) and m.weight is not None:
            m.weight.normal_(1.0, 0.02)
            m.bias.zero_()


@register(GENERATORS, "unconditional")
class UnconditionalGenerator(nn.Module):
    """ZAQ-style (DAFL's generator): noise only, the same decoder; losses that need labels use the teacher's
    prediction. ZAQ: latent 256, ngf 64 (width 2 * ngf = 128). `init`: "default" (PyTorch's) or "dcgan" (DFQF's
    generator.py: conv weights ~ N(0, 0.02), affine BatchNorm weights ~ N(1, 0.02) and biases 0)."""

    def __init__(self, num_classes: int, image_shape, teacher_fc: torch.Tensor | None = None,
                 latent_dim: int = 256, width: int = 128, bn_eps: float = 0.8, init: str = "default"):
        super().__init__()
        channels, size = _check_shape(image_shape)
        if init not in ("default", "dcgan"):
            raise ValueError(f"init={init!r} is not valid; choose one of: default, dcgan")
        self.latent_dim = check_int("latent_dim", latent_dim)
        self.trunk = Trunk(latent_dim, channels, size, bn_eps, width=check_int("width", width))
        if init == "dcgan":
            dcgan_init(self)

    def sample(self, batch_size: int, rng: torch.Generator) -> Sample:
        return Sample(torch.randn(batch_size, 1, self.latent_dim, generator=rng), None, None, None)

    def forward(self, s: Sample) -> torch.Tensor:
        return self.trunk(s.z[:, 0])


FIXED_SET_LABELS = ("teacher", "synthesis")
# how a batch picks its images from the fixed set. replacement: uniformly, with replacement (dfqbench's default);
# passes: shuffled passes without replacement, a new permutation at every epoch's start and whenever fewer than a
# batch remain (IntraQ's code: DataLoader(shuffle=True, drop_last=True), re-iterated each epoch);
# epoch_permutation: one permutation per epoch, restarted from its start when used up, the last batch of a pass
# holding what remains (HAST's code: DistributedSampler with set_epoch, drop_last off)
FIXED_SET_SAMPLING = ("replacement", "passes", "epoch_permutation")
LABELLED_SOURCES = ("intraq", "hast")  # dfqbench.synth.labelled: image j synthesized for class j mod C


@register(GENERATORS, "fixed_set")
class FixedSet(nn.Module):
    """No generator: a fixed synthetic set (IntraQ, HAST) made once before training by a calibration source of
    dfqbench.synth.calib_data (`source`: intraq, hast, or any other: distill, genie, dsg, real, ...) and cached per
    teacher, settings and seed. Each batch draws images uniformly with replacement (a decision: IntraQ's code
    draws shuffled passes over the set, HAST's repeats one permutation within an epoch) and applies RandomResizedCrop
    (scale `crop_scale`) with probability `crop_prob` and a horizontal flip with probability `flip_prob` (IntraQ's
    and HAST's fine-tuning: torchvision's RandomResizedCrop on every image, then RandomHorizontalFlip: 1 and 0.5).
    Labels (`labels`): "teacher", losses that need one use the teacher's prediction on the drawn (augmented)
    image; "synthesis", the class each image was synthesized for (the intraq/hast sources make image j for class
    j mod C, so the set's order carries it), as IntraQ's and HAST's code train the student's CE. The set's size
    and the synthesis steps come from the schedule (`fixed_set_images`, `fixed_set_iterations`). Nothing is
    trained: the method's generator_losses must be empty."""

    trainable = False

    def __init__(self, num_classes: int, image_shape, teacher_fc: torch.Tensor | None = None,
                 source: str = "intraq", source_settings: dict | None = None, crop_prob: float = 1.0,
                 flip_prob: float = 0.5, crop_scale: tuple[float, float] = (0.5, 1.0), synthesis_batch: int = 256,
                 labels: str = "teacher", sampling: str = "replacement"):
        super().__init__()
        from ...synth.calib_data import check_source

        if sampling not in FIXED_SET_SAMPLING:
            raise ValueError(f"sampling={sampling!r} is not valid; choose one of: {', '.join(FIXED_SET_SAMPLING)}")
        self.sampling, self._order, self._cursor = sampling, None, 0
        self.source = check_source(source, "method.generator.source")
        if labels not in FIXED_SET_LABELS:
            raise ValueError(f"labels={labels!r} is not valid; choose one of: {', '.join(FIXED_SET_LABELS)}")
        if labels == "synthesis" and self.source not in LABELLED_SOURCES:
            raise ValueError(f"labels=synthesis needs a source that synthesizes per class "
                             f"({', '.join(LABELLED_SOURCES)}), not source={self.source!r}; use labels=teacher")
        self.labels, self.num_classes = labels, num_classes
        self.source_settings = dict(source_settings or {})
        for key, value in (("crop_prob", crop_prob), ("flip_prob", flip_prob)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}={value!r} must be a number in [0, 1]")
        crop_scale = scale_pair("crop_scale", crop_scale)
        self.crop_prob, self.flip_prob, self.crop_scale = float(crop_prob), float(flip_prob), crop_scale
        self.synthesis_batch = check_int("synthesis_batch", synthesis_batch)
        self.register_buffer("images", torch.zeros(0, *image_shape), persistent=False)  # rebuilt from the cache

    def prepare(self, teacher: nn.Module, ctx, num_images: int, iterations: int) -> None:
        import inspect

        from ...synth.calib_data import source_function

        fn = source_function(self.source)
        settings = dict(self.source_settings)
        params = inspect.signature(fn).parameters.values()
        if any(p.kind is p.VAR_KEYWORD or p.name == "iterations" for p in params):
            settings.setdefault("iterations", iterations)
        elif settings:
            raise ValueError(f"method.generator.source_settings: source {self.source!r} takes no settings")
        batches = fn(teacher, ctx, num_images, self.synthesis_batch, **settings)
        self.images = torch.cat([b.float() for b in batches]).to(ctx.device).contiguous()
        ctx.info["fixed_set"] = {"source": self.source, "images": len(self.images), **settings}

    def start_epoch(self) -> None:
        """Called by the trainer before each epoch: the permutation samplers draw a new one at the next batch."""
        self._order, self._cursor = None, 0

    def _indices(self, batch_size: int, rng: torch.Generator) -> torch.Tensor:
        n = len(self.images)
        if self.sampling == "replacement":
            return torch.randint(n, (batch_size,), generator=rng)
        if self.sampling == "passes" and (self._order is None or self._cursor + min(batch_size, n) > n):
            self._order, self._cursor = torch.randperm(n, generator=rng), 0
        if self.sampling == "epoch_permutation":
            if self._order is None:
                self._order = torch.randperm(n, generator=rng)
            if self._cursor >= n:
                self._cursor = 0
        idx = self._order[self._cursor:self._cursor + batch_size]
        self._cursor += batch_size
        return idx

    def sample(self, batch_size: int, rng: torch.Generator) -> Sample:
        if not len(self.images):
            raise RuntimeError("FixedSet.prepare() must run before sampling")
        idx = self._indices(batch_size, rng).to(self.images.device)
        batch_size = len(idx)
        images = crop_flip(self.images[idx], rng, scale=self.crop_scale, prob=self.crop_prob,
                           flip_prob=self.flip_prob)
        targets = None  # None: the step takes the teacher's argmax
        if self.labels == "synthesis":
            targets = F.one_hot(idx % self.num_classes, self.num_classes).to(images.dtype)
        return Sample(torch.zeros(batch_size, 1, 0), None, None, targets, images)

    def forward(self, s: Sample) -> torch.Tensor:
        return s.images.contiguous(memory_format=torch.channels_last)


def _with_targets(z, labels, weights, num_classes) -> Sample:
    targets = torch.zeros(labels.shape[0], num_classes).scatter_add_(1, labels, weights)
    return Sample(z, labels, weights, targets)
