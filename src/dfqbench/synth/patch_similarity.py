"""PSAQ-ViT's synthesis (Li et al., ECCV 2022; zkkli/PSAQ-ViT generate_data.py): images optimized from Gaussian
noise so that, in every attention block, the cosine similarities between patch features spread out (their
differential entropy, from a Gaussian kernel density estimate, is maximized), with a cross-entropy pull towards
random labels and a total-variation prior.

The patch features are each block's `attn @ v` output averaged over heads, without the class token: the input
of the block's output projection `attn.proj`, read by a forward pre-hook (so a fused attention works as well).
The similarities are normalize-then-matmul (the official broadcast `torch.cosine_similarity`, 150x faster on CPU,
equal to 5e-7).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn



@dataclass
class PSAQSettings:
    batch_size: int = 32
    rounds: int = 2  # the official "two epochs": the lr schedule restarts, Adam's state carries over
    iterations: int = 500  # per round
    lr: float = 0.2  # DeiT 0.20, Swin 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    warmup: int = 100  # linear warm-up iterations, then cosine to 0, per round
    jitter: list[int] = field(default_factory=lambda: [2, 4])  # max roll per round (official 15, 30 at 224 px)
    flip: bool = True
    bandwidth: float = 0.01
    kde_points: int = 10
    ce_weight: float = 1.0
    tv_weight: float = 0.05
    tv_target: list[float] = field(default_factory=lambda: [357.0, 429.0])  # U(lo, hi); official 2500-3000 at 224


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules in the timm layout: a `num_heads` count and a Linear output projection `proj`."""
    return [m for m in model.modules() if isinstance(getattr(m, "num_heads", None), int)
            and isinstance(getattr(m, "proj", None), nn.Linear) and hasattr(m, "qkv")]


def check_transformer(model: nn.Module) -> list[nn.Module]:
    """The attention modules, or ValueError: the model is not a transformer in the timm layout."""
    found = attention_modules(model)
    if not found:
        raise ValueError(f"it needs a vision transformer (attention blocks with qkv and proj, the timm layout); "
                         f"{type(model).__name__} has none")
    return found


def kde_entropy(samples: torch.Tensor, bandwidth: float, points: int) -> torch.Tensor:
    """Differential entropy of each row of `samples` [B, S] under a Gaussian-kernel density estimate, integrated
    by the trapezoid rule on `points` points spanning the batch's min..max (the grid carries no gradient), +1e-4
    in the log as the official code; the mean over rows."""
    with torch.no_grad():
        grid = torch.linspace(float(samples.min()), float(samples.max()), points, device=samples.device)
    var = bandwidth ** 2
    diffs = grid.view(1, -1, 1) - samples.unsqueeze(1)  # [B, P, S]
    density = torch.exp(-diffs.pow(2) / (2 * var)).mean(-1) / math.sqrt(2 * math.pi * var)  # [B, P]
    p = density + 1e-4
    return torch.trapz(-p * torch.log(p), grid, dim=-1).mean()


def patch_similarity(features: torch.Tensor) -> torch.Tensor:
    """[B, N, D] patch features -> [B, N * N] pairwise cosine similarities (diagonal included)."""
    f = F.normalize(features, dim=-1, eps=1e-8)
    return (f @ f.transpose(1, 2)).flatten(1)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """The official prior: the sum of the L2 norms of horizontal, vertical and both diagonal pixel differences."""
    return (torch.norm(x[:, :, :, :-1] - x[:, :, :, 1:]) + torch.norm(x[:, :, :-1, :] - x[:, :, 1:, :])
            + torch.norm(x[:, :, 1:, :-1] - x[:, :, :-1, 1:]) + torch.norm(x[:, :, :-1, :-1] - x[:, :, 1:, 1:]))


def cosine_lr(base: float, warmup: int, total: int, it: int) -> float:
    if it < warmup:
        return base * (it + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, total - warmup))) * base


class PatchFeatures:
    """Forward pre-hooks on every attention block's `proj`: after a forward, `features` holds each block's
    attn @ v output averaged over heads, prefix (class) tokens dropped, [B, N, head_dim]. A context manager."""

    def __init__(self, model: nn.Module, prefix_tokens: int = 1):
        self.features: list[torch.Tensor] = []
        self.prefix = prefix_tokens
        self._heads = {a.proj: a.num_heads for a in check_transformer(model)}
        self._handles = []

    def _keep(self, module, args):
        x = args[0]  # [B, N, heads * head_dim]: (attn @ v) with the heads side by side
        b, n, c = x.shape
        heads = self._heads[module]
        self.features.append(x.reshape(b, n, heads, c // heads).mean(2)[:, self.prefix:])

    def __enter__(self) -> "PatchFeatures":
        self._handles = [proj.register_forward_pre_hook(self._keep) for proj in self._heads]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def entropy(self, bandwidth: float, points: int, images: int) -> torch.Tensor:
        """The sum over blocks of the patch-similarity entropy of the last forward of `images` images (and forget
        it). One density per image: a windowed block (Swin: rows = images x windows) pools the similarities of all
        of an image's windows, as the official `sims.view(batch_size, -1)` does."""
        total = sum(kde_entropy(patch_similarity(f).reshape(images, -1), bandwidth, points) for f in self.features)
        self.features.clear()
        return total


def jitter_flip(img: torch.Tensor, lim: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """The official augmentation: a roll by the same random offset on both axes, then a flip with p 0.5."""
    off = int(torch.randint(-lim, lim + 1, (), generator=g))
    x = torch.roll(img, shifts=(off, off), dims=(2, 3))
    return torch.flip(x, dims=(3,)) if flip and float(torch.rand((), generator=g)) > 0.5 else x


@contextlib.contextmanager
def frozen(model: nn.Module):
    """`model` in eval mode with no parameter gradients inside the block; both restored after."""
    grads, was_training = [p.requires_grad for p in model.parameters()], model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), grads):
            p.requires_grad_(flag)
        model.train(was_training)


def psaq_images(model: nn.Module, input_shape, num_classes: int, pixel_lo: torch.Tensor, pixel_hi: torch.Tensor,
                s: PSAQSettings, generator: torch.Generator, device, prefix_tokens: int = 1,
                progress: bool = False) -> torch.Tensor:
    """One batch of `s.batch_size` normalized images; `pixel_lo/hi` [C]: the normalized image's bounds."""
    g = generator
    img = torch.randn((s.batch_size, *input_shape), generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, num_classes, (s.batch_size,), generator=g).to(device)
    lo, hi = float(s.tv_target[0]), float(s.tv_target[1])
    tv_target = lo + (hi - lo) * float(torch.rand((), generator=g))
    lo_px, hi_px = pixel_lo.view(1, -1, 1, 1).to(device), pixel_hi.view(1, -1, 1, 1).to(device)
    opt = torch.optim.Adam([img], lr=s.lr, betas=tuple(s.betas), eps=1e-8)
    with frozen(model), PatchFeatures(model, prefix_tokens) as patches:
        for r in range(s.rounds):
            lim = int(s.jitter[min(r, len(s.jitter) - 1)])
            for it in range(s.iterations):
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(s.lr, s.warmup, s.iterations, it)
                x = jitter_flip(img, lim, s.flip, g)
                logits = model(x)
                entropy = patches.entropy(s.bandwidth, s.kde_points, x.shape[0])
                loss = -entropy + s.ce_weight * F.cross_entropy(logits, labels) + \
                    s.tv_weight * (total_variation(x) - tv_target).abs()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    img.copy_(torch.maximum(torch.minimum(img, hi_px), lo_px))
            if progress:
                print(f"psaqvit round {r + 1}/{s.rounds}: loss {loss.item():.3f} entropy {float(entropy):.3f}",
                      flush=True)
    return img.detach()
