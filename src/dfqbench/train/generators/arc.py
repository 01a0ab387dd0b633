"""AutoReCon's searched generator (Zhu et al., IJCAI 2021), as AIT re-implements it (`method.generator.name: arc`).

Three cells, each doubling the resolution (S/8 -> S/4 -> S/2 -> S), all 64 channels wide. A cell has two
upsampling nodes (n0, n1 = up(x)), n2 = op0(n0) + op1(n1) and its output n3 = op2(n0) + op3(n1) + op4(n2); cells
after the first also add upsampled copies of the previous cell's n0, n1, n2 to their n2 and n3 ("cross" edges).
The noise (latent 100) is split in three parts that enter as linear maps at S/8, S/4 and S/2. Labels condition
the generator only through class-conditional BatchNorms (affine-free BN with eps 0.8, then a per-class scale and
shift) in front of every LeakyReLU(0.2) -> conv. Output: conditional BN, LeakyReLU, conv 3x3 -> 3, tanh,
BN(affine=False). The searched choices (the genotype) per edge:
  up:    nearest | bilinear interpolation x2, then conditional BN, LeakyReLU, conv 1x1
  ops:   none | skip_connect | conv_1x1 | conv_3x3 | conv_5x5 | dil_conv_3x3 | dil_conv_5x5 (dilation 2)
  cross: none | nearest | bilinear (an upsampling node as above)
GENOTYPES holds the searched genotypes shipped with AIT's code (iamkanghyunchoi/ait, AutoReCon_AIT/
generator_architecture.py, decoded from its one-hot matrices); `genotype:` takes one of their names or an
explicit {up: [6 names], ops: [15], cross: [12]}; `auto` (the default) takes the one searched for the teacher
(`model`: the dfqbench model name), else the one searched for a teacher of the same input size.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...settings import check_int
from .base import GENERATORS, ConditionalBN, Sample, _with_targets
from ..registry import register

UPS = ("nearest", "bilinear")
OPS = ("none", "skip_connect", "conv_1x1", "conv_3x3", "conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
CROSS = ("none", "nearest", "bilinear")
_D5, _D3, _C5 = "dil_conv_5x5", "dil_conv_3x3", "conv_5x5"
GENOTYPES = {
    "cifar10": {"up": ["nearest"] * 4 + ["bilinear", "nearest"],
                "ops": [_D5, "none", _D5, _D3, _C5, _D5, _D5, "conv_3x3", _D3, _D5, _D5, _D5, "conv_1x1", _C5, _D3],
                "cross": ["none", "none", "bilinear", "none", "none", "nearest", "nearest", "nearest", "nearest",
                          "bilinear", "bilinear", "bilinear"]},
    "cifar100": {"up": ["bilinear"] + ["nearest"] * 5,
                 "ops": [_D5, _D5, _D5, "none", _C5, _D5, _C5, "conv_1x1", _D3, _D5, _D5, _D3, _C5, _C5, _D5],
                 "cross": ["none", "bilinear", "nearest", "none", "none", "nearest", "none", "bilinear", "nearest",
                           "nearest", "bilinear", "bilinear"]},
    "resnet18": {"up": ["bilinear"] * 6,
                 "ops": [_D5] * 9 + [_D3, _D5, _D5, _C5, _D3, _D3],
                 "cross": ["nearest", "bilinear", "nearest", "bilinear", "bilinear", "nearest", "bilinear",
                           "bilinear", "nearest", "nearest", "bilinear", "nearest"]},
    "resnet50": {"up": ["bilinear"] * 6,
                 "ops": [_D5] * 7 + ["conv_3x3", "conv_1x1", "conv_1x1", _D3, _D5, _D5, _C5, _D3],
                 "cross": ["bilinear"] * 3 + ["nearest", "nearest", "bilinear"] + ["nearest"] * 4
                          + ["bilinear", "bilinear"]},
    "mobilenetv2": {"up": ["bilinear"] * 4 + ["nearest", "bilinear"],
                    "ops": [_D5, _D5, _C5, _D5, _D5, _C5, _D5, "conv_1x1", "conv_1x1", "conv_1x1", "conv_3x3", _D5,
                            _C5, _D5, _D3],
                    "cross": ["bilinear", "bilinear", "nearest"] + ["bilinear"] * 4 + ["nearest"]
                             + ["bilinear"] * 3 + ["nearest"]},
}
_COUNTS = {"up": (6, UPS), "ops": (15, OPS), "cross": (12, CROSS)}
# genotype "auto": the one searched for the teacher (by dfqbench model name), else the one searched for a teacher
# with the same input size (a decision: AutoReCon searches per teacher, and an unseen teacher has no search)
_FOR_MODEL = {"resnet20_cifar10": "cifar10", "resnet20_cifar100": "cifar100", "resnet18": "resnet18",
              "resnet50": "resnet50", "mobilenetv2_w1": "mobilenetv2"}


def auto_genotype(model_name: str | None, num_classes: int, image_size: int) -> str:
    if model_name in _FOR_MODEL:
        return _FOR_MODEL[model_name]
    if image_size <= 64:
        return "cifar100" if num_classes > 10 else "cifar10"
    return "resnet18"


def resolve_genotype(genotype) -> dict[str, list[str]]:
    if isinstance(genotype, str):
        if genotype not in GENOTYPES:
            raise ValueError(f"genotype={genotype!r} is not valid; choose one of: {', '.join(GENOTYPES)} "
                             f"or give {{up: [6 names], ops: [15], cross: [12]}}")
        return GENOTYPES[genotype]
    if not isinstance(genotype, Mapping) or set(genotype) != set(_COUNTS):
        raise ValueError(f"genotype must be a name ({', '.join(GENOTYPES)}) or a mapping with keys up, ops, cross")
    out = {}
    for key, (count, names) in _COUNTS.items():
        values = list(genotype[key])
        bad = [v for v in values if v not in names]
        if len(values) != count or bad:
            raise ValueError(f"genotype.{key} must list {count} of: {', '.join(names)} (got {values})")
        out[key] = values
    return out


class Edge(nn.Module):
    """One chosen edge: 'none' (zeros), 'skip_connect', a (dilated) conv, or an x2 upsampling node."""

    def __init__(self, kind: str, num_classes: int, width: int, eps: float):
        super().__init__()
        self.kind, self.mode = kind, None
        if kind in ("none", "skip_connect"):
            return
        if kind in ("nearest", "bilinear"):
            self.mode, k, dilation = kind, 1, 1
        else:
            k = int(kind[-1])
            dilation = 2 if kind.startswith("dil") else 1
        self.norm = ConditionalBN(num_classes, width, eps)
        self.conv = nn.Conv2d(width, width, k, padding=dilation * (k // 2), dilation=dilation)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return None
        if self.kind == "skip_connect":
            return x
        if self.mode:
            x = F.interpolate(x, scale_factor=2, mode=self.mode)
        return self.conv(F.leaky_relu(self.norm(x, labels), 0.2))


def _add(*terms):
    present = [t for t in terms if t is not None]
    if not present:
        raise ValueError("an ARC genotype leaves a cell node without any input edge ('none' everywhere)")
    return sum(present[1:], present[0])


class Cell(nn.Module):
    def __init__(self, up: list[str], ops: list[str], cross: list[str] | None, num_classes: int, width: int,
                 eps: float):
        super().__init__()
        make = lambda kinds: nn.ModuleList(Edge(k, num_classes, width, eps) for k in kinds)  # noqa: E731
        self.up, self.ops = make(up), make(ops)
        self.cross = make(cross) if cross else None

    def forward(self, x, labels, previous=None):
        n0, n1 = (edge(x, labels) for edge in self.up)

        def op(i, v):
            return self.ops[i](v, labels)

        def cross(i):  # cross edge i upsamples the previous cell's node i % 3 (n0, n1, n2)
            return self.cross[i](previous[i % 3], labels) if self.cross else None

        n2 = _add(op(0, n0), op(1, n1), cross(0), cross(1), cross(2))
        n3 = _add(op(2, n0), op(3, n1), op(4, n2), cross(3), cross(4), cross(5))
        return n3, (n0, n1, n2)


@register(GENERATORS, "arc")
class SearchedGenerator(nn.Module):
    def __init__(self, num_classes: int, image_shape, teacher_fc: torch.Tensor | None = None,
                 latent_dim: int = 100, width: int = 64, genotype="auto", model: str | None = None,
                 bn_eps: float = 0.8):
        super().__init__()
        channels, size, width_ = image_shape[0], image_shape[1], check_int("width", width)
        if image_shape[1] != image_shape[2] or size % 8:
            raise ValueError(f"generator arc needs square images with a side divisible by 8, not "
                             f"{image_shape[1]}x{image_shape[2]}")
        self.num_classes, self.latent_dim = num_classes, check_int("latent_dim", latent_dim)
        if latent_dim < 3:
            raise ValueError(f"latent_dim={latent_dim!r} must be at least 3 (it is split in three)")
        if genotype == "auto":
            genotype = auto_genotype(model, num_classes, size)
        self.genotype_name = genotype if isinstance(genotype, str) else "custom"
        g = resolve_genotype(genotype)
        third = latent_dim // 3
        self.splits = (third, third, latent_dim - 2 * third)
        self.sides = (size // 8, size // 4, size // 2)
        self.width = width_
        self.inputs = nn.ModuleList(nn.Linear(n, width_ * s * s) for n, s in zip(self.splits, self.sides))
        self.cells = nn.ModuleList(
            Cell(g["up"][2 * i:2 * i + 2], g["ops"][5 * i:5 * i + 5], g["cross"][6 * (i - 1):6 * i] if i else None,
                 num_classes, width_, bn_eps) for i in range(3))
        self.out_norm = ConditionalBN(num_classes, width_, bn_eps)
        self.to_rgb = nn.Sequential(nn.Conv2d(width_, channels, 3, padding=1), nn.Tanh(),
                                    nn.BatchNorm2d(channels, affine=False))

    @property
    def record_info(self) -> dict:
        """Goes into the run's record (info.generator)."""
        return {"genotype": self.genotype_name}

    def sample(self, batch_size: int, rng: torch.Generator) -> Sample:
        z = torch.randn(batch_size, 1, self.latent_dim, generator=rng)
        labels = torch.randint(0, self.num_classes, (batch_size, 1), generator=rng)
        return _with_targets(z, labels, torch.ones(batch_size, 1), self.num_classes)

    def forward(self, s: Sample) -> torch.Tensor:
        z, labels = s.z[:, 0], s.labels[:, 0]
        parts = torch.split(z, self.splits, dim=1)
        seeds = [lin(p).view(z.shape[0], self.width, side, side)
                 for lin, p, side in zip(self.inputs, parts, self.sides)]
        x, previous = seeds[0], None
        for i, cell in enumerate(self.cells):
            if i:
                x = x + seeds[i]
            x, previous = cell(x, labels, previous)
        return self.to_rgb(F.leaky_relu(self.out_norm(x, labels), 0.2))
