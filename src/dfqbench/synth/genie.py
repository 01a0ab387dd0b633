"""Genie's distilled data (Jeon et al., CVPR 2023): images from a small generator with learnable latents.

Per batch: a fresh generator G (latent -> Linear -> 128 x (H/4) x (W/4) -> BN -> x2 upsample -> conv 128->64 ->
BN -> LeakyReLU(0.2) -> x2 upsample -> conv 64->C -> tanh -> BN without affine) and latents z ~ N(0, 1), both
trained by Adam (z: lr 0.1 with ReduceLROnPlateau(patience 100, min_lr 1e-4); G: lr 0.01 x 0.95 every 100 steps)
to make the teacher's BatchNorm inputs match the running statistics: squared L2 distance between the batch's
per-channel mean and std at each BN input and (running_mean, sqrt(running_var + 1e-6)), divided by the number of
channels, plus an input prior (each image's channel mean/std against 0/1, divided by the batch size). No labels.
"Swing": every strided conv of the teacher sees its input shifted by a random -1..+1 pixels (reflect padding)
at each step. The images are the generator's output at the last step, in the teacher's normalized input space.
The loop is the shared one (`bn_loop`); this module holds the generator, its batch state, swing and the loss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .bn_loop import Synthesis, moment_distance, synthesize_batches
from ..settings import CheckedSettings, check_int, check_number


@dataclass
class GenieSettings(CheckedSettings):
    PREFIX = "method.distill"
    iterations: int = 4000  # per batch (the paper's)
    latent_dim: int = 256
    lr_z: float = 0.1
    lr_g: float = 0.01
    g_decay: float = 0.95  # G's lr x g_decay every 100 steps
    patience: int = 100  # ReduceLROnPlateau on z
    min_lr: float = 1e-4
    swing: bool = True

    def validate(self, prefix: str = "method.distill") -> "GenieSettings":
        for key in ("iterations", "latent_dim", "patience"):
            value = getattr(self, key)
            check_int(f"{prefix}.{key}", value)
        for key in ("lr_z", "lr_g", "min_lr"):
            check_number(f"{prefix}.{key}", getattr(self, key))
        if isinstance(self.g_decay, bool) or not isinstance(self.g_decay, (int, float)) or not 0 < self.g_decay <= 1:
            raise ValueError(f"{prefix}.g_decay={self.g_decay!r} must be in (0, 1]")
        if not isinstance(self.swing, bool):
            raise ValueError(f"{prefix}.swing={self.swing!r} must be true or false")
        return self



class Generator(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 256, c1: int = 128, c2: int = 64):
        super().__init__()
        channels, height, width = image_shape
        self.size = (height, width)
        self.init = (math.ceil(height / 4), math.ceil(width / 4))
        self.c1 = c1
        self.linear = nn.Linear(latent_dim, c1 * self.init[0] * self.init[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(c1), nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
            nn.Conv2d(c2, channels, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.body(self.linear(z).view(len(z), self.c1, *self.init))
        return out[:, :, :self.size[0], :self.size[1]]  # sizes that are not multiples of 4


def _swing_hook(generator: torch.Generator):
    def hook(module, inputs):
        x = inputs[0]
        if x.shape[-1] < 2 or x.shape[-2] < 2:
            return None
        dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
        padded = F.pad(x, [1, 1, 1, 1], mode="reflect")
        return (padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]],) + tuple(inputs[1:])
    return hook


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std over the batch and positions, [C]."""
    std, mean = torch.std_mean(x, dim=[0, 2, 3])
    return mean, std


def image_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's per-channel mean and (unbiased) std, [N, C]."""
    std, mean = torch.std_mean(x, dim=[2, 3])
    return mean, std


class GeneratorBatch:
    """A batch drawn from a fresh generator G(z): z by Adam with ReduceLROnPlateau, G by Adam with its lr times
    g_decay every 100 steps. The result is the last step's images (drawn before that step's update)."""

    def __init__(self, gen: Generator, z: torch.Tensor, settings: GenieSettings):
        self.gen, self.z = gen, z.requires_grad_(True)
        self.opt_z = torch.optim.Adam([self.z], lr=settings.lr_z)
        self.sched_z = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt_z, patience=settings.patience,
                                                                  min_lr=settings.min_lr)
        self.opt_g = torch.optim.Adam(gen.parameters(), lr=settings.lr_g)
        self.sched_g = torch.optim.lr_scheduler.ExponentialLR(self.opt_g, gamma=settings.g_decay)
        self.last: torch.Tensor | None = None

    def images(self) -> torch.Tensor:
        self.last = self.gen(self.z).contiguous(memory_format=torch.channels_last)
        return self.last

    def zero_grad(self) -> None:
        self.opt_z.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)

    def step(self, index: int, loss: float) -> None:
        self.opt_z.step()
        self.opt_g.step()
        self.sched_z.step(loss)
        if (index + 1) % 100 == 0:
            self.sched_g.step()

    def result(self) -> torch.Tensor:
        return self.last.detach()


class GenieSynthesis(Synthesis):
    what = "Genie's distillation"
    name = "genie"

    def __init__(self, image_shape: tuple[int, int, int], num_images: int, batch_size: int, settings: GenieSettings,
                 seed: int, device: torch.device):
        self.image_shape, self.num_images, self.batch_size = image_shape, num_images, batch_size
        self.settings, self.seed, self.device = settings, seed, device
        self.rng = torch.Generator().manual_seed(seed)  # latents and swing shifts
        self.num_batches, self.iterations = math.ceil(num_images / batch_size), settings.iterations

    def prepare(self, model, taps) -> list:
        if not self.settings.swing:
            return []
        return [m.register_forward_pre_hook(_swing_hook(self.rng)) for m in model.modules()
                if isinstance(m, nn.Conv2d) and max(m.stride) > 1]

    def new_batch(self, index: int) -> GeneratorBatch:
        size = min(self.batch_size, self.num_images - index * self.batch_size)
        with torch.random.fork_rng(devices=[]):  # G's initialization from the seed, the global RNG untouched
            torch.manual_seed(self.seed * 1_000_003 + index)
            gen = Generator(self.image_shape, self.settings.latent_dim).to(self.device).train()
        z = torch.randn(size, self.settings.latent_dim, generator=self.rng).to(self.device)
        return GeneratorBatch(gen, z, self.settings)

    def loss(self, batch, x, logits, taps) -> torch.Tensor:
        """Batch statistics at every BN input (divided by the channels), plus each image's against 0 / 1."""
        return moment_distance(taps.pairs(), batch_moments) + moment_distance([(x, (0.0, 1.0))], image_moments)


def distill_genie_data(model: nn.Module, image_shape: tuple[int, int, int], num_images: int, batch_size: int,
                       settings: GenieSettings, seed: int, device: torch.device,
                       progress: bool = False) -> list[torch.Tensor]:
    synthesis = GenieSynthesis(image_shape, num_images, batch_size, settings, seed, device)
    return synthesize_batches(model, synthesis, device, progress)


def genie_source(model, ctx, num_images: int, batch_size: int,
                 settings: GenieSettings | None = None) -> list[torch.Tensor]:
    """The `genie` calibration source: cached per (teacher, settings, number of images, batch size, seed)."""
    from .calib_data import cached

    settings = settings or GenieSettings()
    key = {**asdict(settings), "num_images": num_images, "batch_size": batch_size}
    batches = cached(ctx, "genie", key, lambda: distill_genie_data(
        model, tuple(ctx.input_shape), num_images, batch_size, settings, ctx.seed, ctx.device, ctx.progress))
    return [b.to(ctx.device).contiguous(memory_format=torch.channels_last) for b in batches]
