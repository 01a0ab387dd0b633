"""Genie's distilled data (Jeon et al., CVPR 2023): images from a small generator with learnable latents.

Per batch: a fresh generator G (latent -> Linear -> 128 x (H/4) x (W/4) -> BN -> x2 upsample -> conv 128->64 ->
BN -> LeakyReLU(0.2) -> x2 upsample -> conv 64->C -> tanh -> BN without affine) and latents z ~ N(0, 1), both
trained by Adam (z: lr 0.1 with ReduceLROnPlateau(patience 100, min_lr 1e-4); G: lr 0.01 x 0.95 every 100 steps)
to make the teacher's BatchNorm inputs match the running statistics: squared L2 distance between the batch's
per-channel mean and std at each BN input and (running_mean, sqrt(running_var + 1e-6)), divided by the number of
channels, plus an input prior (each image's channel mean/std against 0/1, divided by the batch size). No labels.
"Swing": every strided conv of the teacher sees its input shifted by a random -1..+1 pixels (reflect padding)
at each step. The images are the generator's output at the last step, in the teacher's normalized input space.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import UnsupportedModel

_EPS = 1e-6


@dataclass
class GenieSettings:
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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{prefix}.{key}={value!r} must be an integer >= 1")
        for key in ("lr_z", "lr_g", "min_lr"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{prefix}.{key}={value!r} must be a number >= 0")
        if isinstance(self.g_decay, bool) or not isinstance(self.g_decay, (int, float)) or not 0 < self.g_decay <= 1:
            raise ValueError(f"{prefix}.g_decay={self.g_decay!r} must be in (0, 1]")
        if not isinstance(self.swing, bool):
            raise ValueError(f"{prefix}.swing={self.swing!r} must be true or false")
        return self

    @classmethod
    def from_dict(cls, values: dict | None, prefix: str = "method.distill") -> "GenieSettings":
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{prefix} has unknown setting(s) {unknown}; valid: "
                             f"{', '.join(sorted(cls.__dataclass_fields__))}")
        return cls(**values).validate(prefix)


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


def _l2(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance divided by the first dimension of `value` (channels for BN, images for the prior)."""
    return (value - target).pow(2).sum() / value.shape[0]


def _swing_hook(generator: torch.Generator):
    def hook(module, inputs):
        x = inputs[0]
        if x.shape[-1] < 2 or x.shape[-2] < 2:
            return None
        dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
        padded = F.pad(x, [1, 1, 1, 1], mode="reflect")
        return (padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]],) + tuple(inputs[1:])
    return hook


def distill_genie_data(model: nn.Module, image_shape: tuple[int, int, int], num_images: int, batch_size: int,
                       settings: GenieSettings, seed: int, device: torch.device,
                       progress: bool = False) -> list[torch.Tensor]:
    model = model.eval().to(device)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise UnsupportedModel("Genie's distillation needs a model with BatchNorm2d layers")
    rng = torch.Generator().manual_seed(seed)
    captured: dict[nn.Module, torch.Tensor] = {}
    handles = [bn.register_forward_pre_hook(lambda mod, inp: captured.__setitem__(mod, inp[0])) for bn in bns]
    if settings.swing:
        handles += [m.register_forward_pre_hook(_swing_hook(rng)) for m in model.modules()
                    if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    targets = [(bn.running_mean.detach(), torch.sqrt(bn.running_var.detach() + _EPS)) for bn in bns]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    batches = []
    try:
        for b, start in enumerate(range(0, num_images, batch_size)):
            size = min(batch_size, num_images - start)
            with torch.random.fork_rng(devices=[]):  # G's initialization from the seed, the global RNG untouched
                torch.manual_seed(seed * 1_000_003 + b)
                gen = Generator(image_shape, settings.latent_dim).to(device).train()
            z = torch.randn(size, settings.latent_dim, generator=rng).to(device).requires_grad_(True)
            opt_z = torch.optim.Adam([z], lr=settings.lr_z)
            sched_z = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, patience=settings.patience,
                                                                 min_lr=settings.min_lr)
            opt_g = torch.optim.Adam(gen.parameters(), lr=settings.lr_g)
            sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=settings.g_decay)
            steps = tqdm(range(settings.iterations), desc=f"genie batch {b + 1}/{math.ceil(num_images / batch_size)}",
                         disable=not progress, leave=False)
            for it in steps:
                opt_z.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                captured.clear()
                x = gen(z).contiguous(memory_format=torch.channels_last)
                model(x)
                loss = bn_loss(captured, bns, targets) + prior_loss(x)
                loss.backward()
                opt_z.step()
                opt_g.step()
                sched_z.step(loss.item())
                if (it + 1) % 100 == 0:
                    sched_g.step()
                    steps.set_postfix(loss=f"{loss.item():.3f}")
            batches.append(x.detach())
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return batches


def bn_loss(captured, bns, targets) -> torch.Tensor:
    loss = 0.0
    for bn, (mean_t, std_t) in zip(bns, targets):
        std, mean = torch.std_mean(captured[bn], dim=[0, 2, 3])
        loss = loss + _l2(mean_t, mean) + _l2(std_t, std)
    return loss


def prior_loss(x: torch.Tensor) -> torch.Tensor:
    std, mean = torch.std_mean(x, dim=[2, 3])
    return _l2(torch.zeros_like(mean[0]), mean) + _l2(torch.ones_like(std[0]), std)


def genie_source(model, ctx, num_images: int, batch_size: int,
                 settings: GenieSettings | None = None) -> list[torch.Tensor]:
    """The `genie` calibration source: cached per (teacher, settings, number of images, batch size, seed)."""
    from .calib_data import cached

    settings = settings or GenieSettings()
    key = {**asdict(settings), "num_images": num_images, "batch_size": batch_size}
    batches = cached(ctx, "genie", key, lambda: distill_genie_data(
        model, tuple(ctx.input_shape), num_images, batch_size, settings, ctx.seed, ctx.device, ctx.progress))
    return [b.to(ctx.device).contiguous(memory_format=torch.channels_last) for b in batches]
