"""AdvKD's generator (the unofficial re-implementation da2so/Data-Free_Network_Quantization_With_Adversarial_
Knowledge_Distillation, network/generator.py): unconditional, z -> Linear -> 8 ngf x (S/8)^2, then three
(nearest x2 upsampling, 3x3 conv, BN, ReLU) stages 8->4->2->1 ngf, a 3x3 conv to the image channels, tanh and
an affine-free BN. Five times ResNet-20's multiply-adds per 32x32 image at ngf 64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from ...settings import check_int
from .base import GENERATORS, Sample, _check_shape


@register(GENERATORS, "dcgan3")
class DCGAN3(nn.Module):
    def __init__(self, num_classes: int, image_shape, teacher_fc: torch.Tensor | None = None,
                 latent_dim: int = 512, ngf: int = 64):
        super().__init__()
        channels, size = _check_shape(image_shape)
        if size % 8:
            raise ValueError(f"generator dcgan3 needs an image size divisible by 8, not {size}")
        self.latent_dim, ngf = check_int("latent_dim", latent_dim), check_int("ngf", ngf)
        self.init_size = size // 8
        self.fc = nn.Linear(latent_dim, ngf * 8 * self.init_size ** 2)

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.stages = nn.ModuleList([stage(ngf * 8, ngf * 4), stage(ngf * 4, ngf * 2), stage(ngf * 2, ngf)])
        self.head = nn.Sequential(nn.Conv2d(ngf, channels, 3, padding=1), nn.Tanh(),
                                  nn.BatchNorm2d(channels, affine=False))

    def sample(self, batch_size: int, rng: torch.Generator) -> Sample:
        return Sample(torch.randn(batch_size, 1, self.latent_dim, generator=rng), None, None, None)

    def forward(self, s: Sample) -> torch.Tensor:
        h = self.fc(s.z[:, 0]).view(s.z.shape[0], -1, self.init_size, self.init_size)
        for stage in self.stages:
            h = stage(F.interpolate(h, scale_factor=2))
        return self.head(h)
