"""Calibration data sources, selectable by name: `method.calib_data=<source>` in every calibration-based method.

A source turns (model, QuantContext, number of images, batch size) into a list of normalized image batches on
`ctx.device`. Synthetic sources that optimize images (distill, dsg, genie) are cached on disk per (teacher
weights, source settings, seed): they do not depend on the bit-width or the convention, so a sweep computes them
once. The "Is in-domain data really needed?" study is `method=crossdomain method.calib_data=...`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from ..errors import ConfigError
from ..records import code_digest

# name -> "module:function" (imported on use, so heavy sources cost nothing until chosen)
SOURCES: dict[str, str] = {
    "distill": "dfqbench.synth.calib_data:distill_source",  # ZeroQ BN-statistics distillation
    "real": "dfqbench.synth.calib_data:real_source",  # the teacher's own training images (the upper bound)
    "listed": "dfqbench.synth.calib_data:listed_source",  # the images a file names, in its order (a run's own set)
    "other_domain": "dfqbench.synth.calib_data:other_domain_source",  # images of another data set, resized
    "uniform_noise": "dfqbench.synth.calib_data:uniform_noise_source",  # pixels ~ U(0, 1)
    "gaussian_noise": "dfqbench.synth.calib_data:gaussian_noise_source",  # pixels ~ N(0.5, 0.25^2), clipped
    "randn": "dfqbench.synth.calib_data:randn_source",  # N(0, 1) in the normalized space (PSAQ-ViT's baseline)
    "procedural": "dfqbench.synth.calib_data:procedural_source",  # dead-leaves shapes over smooth noise
    "dsg": "dfqbench.synth.dsg:dsg_source",  # DSG: slack BN alignment + layer-wise sample enhancement
    "genie": "dfqbench.synth.genie:genie_source",  # Genie: generator + learnable latents, BN statistics
    "intraq": "dfqbench.synth.labelled:intraq_source",  # IntraQ: soft labels + intra-class cosine margins
    "hast": "dfqbench.synth.labelled:hast_source",  # HAST: focal-weighted CE on hard samples
    "kw": "dfqbench.synth.kw:kw_source",  # The Knowledge Within: BN statistics matched by Gaussian KL
    "gznq": "dfqbench.synth.gznq:gznq_source",  # GZNQ (reconstruction): generator, BN-distribution KL
}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def check_source(name: str, key: str = "method.calib_data") -> str:
    if name not in SOURCES:
        raise ValueError(f"{key}={name!r} is not a known calibration source; choose one of: "
                         f"{', '.join(SOURCES)}")
    return name


def source_function(source: str) -> Callable:
    module, _, func = SOURCES[check_source(source)].partition(":")
    return getattr(importlib.import_module(module), func)


def calibration_batches(source: str, model, ctx, num_images: int, batch_size: int) -> list[torch.Tensor]:
    """`num_images` normalized images from `source`, in batches of at most `batch_size`, on ctx.device."""
    fn = source_function(source)
    ctx.info["calib_data"] = source
    ctx.info["calib_images"] = num_images
    return [b.to(ctx.device) for b in fn(model, ctx, num_images, batch_size)]


def cached(ctx, name: str, settings: dict, compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    """Load the batches made by (teacher, source `name`, settings, seed, synthesis code) from the cache, or
    compute and store."""
    cache_dir = getattr(ctx, "cache_dir", None)
    if not cache_dir or not getattr(ctx, "model_sha256", None):
        return compute()
    # the synthesis code is part of the key: a change to it (a loss, a gradient) makes new batches
    precision = getattr(ctx, "precision", "fp32")  # in the key only where it is not the default: old keys hold
    key = hashlib.sha256(json.dumps({"model": ctx.model_sha256, "source": name, "settings": settings,
                                     "seed": ctx.seed, "shape": list(ctx.input_shape),
                                     "code": code_digest("synth"),
                                     **({} if precision == "fp32" else {"precision": precision})},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(os.path.expanduser(str(cache_dir))) / "calib" / f"{name}-{key}.pt"
    if path.exists():
        ctx.info["calib_cached"] = True
        return list(torch.load(path, weights_only=True))
    batches = [b.detach().cpu() for b in compute()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(batches, tmp)
    os.replace(tmp, path)
    return batches


def _split(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [images[i:i + batch_size].contiguous(memory_format=torch.channels_last)
            for i in range(0, len(images), batch_size)]


def _normalize(pixels: torch.Tensor, ctx) -> torch.Tensor:
    """[0, 1] pixels -> the teacher's input normalization."""
    return (pixels - ctx.mean.view(1, -1, 1, 1)) / ctx.std.view(1, -1, 1, 1)


# ---- sources -------------------------------------------------------------------------------------------------

def distill_source(model, ctx, num_images: int, batch_size: int) -> list[torch.Tensor]:
    from .bn_distill import DistillSettings, distill_bn_data

    settings = DistillSettings(batch_size=batch_size, num_batches=math.ceil(num_images / batch_size))
    batches = cached(ctx, "distill", vars(settings), lambda: distill_bn_data(
        model, ctx.input_shape, settings, ctx.generator(), ctx.device, ctx.progress))
    return _split(torch.cat(batches)[:num_images], batch_size)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)


def _load_images(files: list[Path], num_images: int, ctx, what: str, shuffle: bool = True) -> torch.Tensor:
    from PIL import Image

    if not files:
        raise ConfigError(f"calibration source {what}: no images found")
    order = torch.randperm(len(files), generator=ctx.generator())[:num_images] if shuffle else \
        torch.arange(min(num_images, len(files)))
    size = ctx.input_shape[1:]
    out = []
    for i in order.tolist():
        with Image.open(files[i]) as im:
            x = torch.from_numpy(__import__("numpy").asarray(im.convert("RGB"), dtype="uint8").copy())
        x = x.permute(2, 0, 1).float().div(255).unsqueeze(0)
        if tuple(x.shape[2:]) != tuple(size):  # shorter side to size, centre crop (ImageNet-style)
            scale = max(size[0] / x.shape[2], size[1] / x.shape[3])
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False,
                              recompute_scale_factor=True)
            top, left = (x.shape[2] - size[0]) // 2, (x.shape[3] - size[1]) // 2
            x = x[:, :, top:top + size[0], left:left + size[1]]
        out.append(x)
    return _normalize(torch.cat(out), ctx)


def real_source(model, ctx, num_images: int, batch_size: int) -> list[torch.Tensor]:
    """Training images of the teacher's own data set (not data-free: the reference the study compares to)."""
    root = Path(os.path.expanduser(str(ctx.train_root or "")))
    if not ctx.train_root or not root.is_dir():
        raise ConfigError(f"method.calib_data=real needs the training images: dataset.train_root={ctx.train_root} "
                          f"is not a folder (ImageFolder layout)")
    return _split(_load_images(_image_files(root), num_images, ctx, f"real ({root})"), batch_size)


def listed_source(model, ctx, num_images: int, batch_size: int) -> list[torch.Tensor]:
    """The first `num_images` images named in the text file paths.calib_list (one path per line, absolute or
    relative to the training images' folder), in the file's order: a calibration set fixed outside dfqbench (an
    official run's drawn images, a paper's published list). Its sha256 goes into the record."""
    listing = Path(os.path.expanduser(str(ctx.calib_list or "")))
    if not ctx.calib_list or not listing.is_file():
        raise ConfigError(f"method.calib_data=listed needs paths.calib_list, a text file of image paths (one per "
                          f"line): {ctx.calib_list!r} is not a file (or set DFQ_CALIB_LIST)")
    root = Path(os.path.expanduser(str(ctx.train_root or ".")))
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    files = [Path(n) if Path(n).is_absolute() else root / n for n in names]
    missing = [str(f) for f in files[:num_images] if not f.is_file()]
    if missing:
        raise ConfigError(f"paths.calib_list={str(listing)!r} names {len(missing)} image(s) that do not exist, "
                          f"e.g. {missing[0]!r} (relative paths are read under dataset.train_root={ctx.train_root})")
    if len(files) < num_images:
        raise ConfigError(f"paths.calib_list={str(listing)!r} names {len(files)} images; the method asks for "
                          f"{num_images}")
    ctx.info["calib_list_sha256"] = hashlib.sha256(listing.read_bytes()).hexdigest()
    return _split(_load_images(files, num_images, ctx, f"listed ({listing})", shuffle=False), batch_size)


def other_domain_source(model, ctx, num_images: int, batch_size: int) -> list[torch.Tensor]:
    root = Path(os.path.expanduser(str(ctx.other_domain_root or "")))
    if not ctx.other_domain_root or not root.is_dir():
        raise ConfigError(f"method.calib_data=other_domain needs a folder of images: "
                          f"paths.other_domain_root={ctx.other_domain_root} is not a folder "
                          f"(or set DFQ_OTHER_DOMAIN_ROOT)")
    return _split(_load_images(_image_files(root), num_images, ctx, f"other_domain ({root})"), batch_size)


def uniform_noise_source(model, ctx, num_images: int, batch_size: int) -> list[torch.Tensor]:
    pixels = torch.rand((num_images, *ctx.input_shape), generator=ctx.generator())
    return _split(_normalize(pixels, ctx), batch_size)


def gaussian_noise_source(model, ctx, num_images: int, batch_size: int) -> list[torch.Tensor]:
    pixels = (0.5 + 0.25 * torch.randn((num_images, *ctx.input_shape), generator=ctx.generator())).clamp(0, 1)
    return _split(_normalize(pixels, ctx), batch_size)


def randn_source(model, ctx, num_images: int, batch_size: int) -> list[torch.Tensor]:
    """N(0, 1) in the teacher's normalized input space, not clipped (PSAQ-ViT's Gaussian-noise mode)."""
    return _split(torch.randn((num_images, *ctx.input_shape), generator=ctx.generator()), batch_size)


def procedural_source(model, ctx, num_images: int, batch_size: int) -> list[torch.Tensor]:
    """Dead-leaves images (random coloured discs and rectangles, occluding each other) over smooth colour noise:
    edges, flat regions and a natural-image-like 1/f spectrum, with no object of any class."""
    g = ctx.generator()
    c, h, w = ctx.input_shape
    low = torch.rand((num_images, c, max(2, h // 8), max(2, w // 8)), generator=g)
    pixels = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    for _ in range(24):  # shapes per image, painted back to front
        cy, cx = torch.rand(num_images, 1, 1, generator=g) * h, torch.rand(num_images, 1, 1, generator=g) * w
        r = (0.03 + 0.3 * torch.rand(num_images, 1, 1, generator=g) ** 2) * min(h, w)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        rect = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r * (0.3 + torch.rand(num_images, 1, 1, generator=g)))
        shape = torch.where(torch.rand(num_images, 1, 1, generator=g) < 0.5, disc, rect).unsqueeze(1)
        colour = torch.rand(num_images, c, 1, 1, generator=g)
        pixels = torch.where(shape, colour.expand_as(pixels), pixels)
    return _split(_normalize(pixels, ctx), batch_size)
