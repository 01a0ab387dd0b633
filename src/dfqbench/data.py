"""Evaluation data: CIFAR-10/100 (ImageFolder root or torchvision download folder) and ImageNet (ImageFolder val).

Small data sets are decoded once into a uint8 tensor and cached on disk (decoding 10,000 JPEGs costs seconds;
a run evaluates twice). Large ones stream through a DataLoader.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from .errors import ConfigError

_TORCHVISION = {"cifar10": (datasets.CIFAR10, "cifar-10-batches-py"),
                "cifar100": (datasets.CIFAR100, "cifar-100-python")}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class EvalSet:
    name: str
    num_samples: int
    mean: torch.Tensor  # [1, C, 1, 1]
    std: torch.Tensor
    images: torch.Tensor | None = None  # uint8 [N, C, H, W], in memory
    labels: torch.Tensor | None = None
    loader_dataset: object = None  # a torch Dataset of (float image in [0, 1], label) when streaming
    num_workers: int = 0

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalized float batches (channels_last) and labels."""
        if self.images is not None:
            for i in range(0, self.num_samples, batch_size):
                x = self.images[i:i + batch_size].to(device).float().div_(255)
                yield self._normalize(x, device), self.labels[i:i + batch_size].to(device)
            return
        loader = DataLoader(self.loader_dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                            multiprocessing_context=_worker_context(self.num_workers))
        for x, y in loader:
            yield self._normalize(x.to(device), device), y.to(device)

    def _normalize(self, x: torch.Tensor, device) -> torch.Tensor:
        x = (x - self.mean.to(device)) / self.std.to(device)
        return x.contiguous(memory_format=torch.channels_last)


def load_eval_set(cfg, mean, std, cache_dir: str | None) -> EvalSet:
    """`cfg` is the `dataset` config node."""
    root = Path(os.path.expanduser(str(cfg.root)))
    mean_t = torch.tensor(list(mean), dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).reshape(1, -1, 1, 1)
    split_dir = _find_split_dir(root, list(cfg.split_dirs))
    if split_dir is not None:
        dataset = datasets.ImageFolder(str(split_dir), transform=_transform(cfg))
        source = f"imagefolder:{split_dir.resolve()}"
        _check_classes(cfg, dataset.classes, split_dir)
    elif cfg.name in _TORCHVISION:
        cls, folder = _TORCHVISION[cfg.name]
        if not (root / folder).is_dir() and not cfg.download:
            raise ConfigError(_missing_message(cfg, root, folder))
        try:
            dataset = cls(str(root), train=False, download=bool(cfg.download), transform=_transform(cfg))
        except Exception as exc:  # a failed download or a corrupt archive
            raise ConfigError(f"could not load {cfg.name} from {root}: {exc}") from exc
        source = f"torchvision:{(root / folder).resolve()}"
    else:
        raise ConfigError(_missing_message(cfg, root, None))
    indices = _subset_indices(len(dataset), cfg.max_samples)
    if indices is not None:
        dataset = Subset(dataset, indices)
    if not cfg.in_memory:
        return EvalSet(cfg.name, len(dataset), mean_t, std_t, loader_dataset=dataset, num_workers=cfg.num_workers)
    images, labels = _cached_tensors(dataset, source, indices, cache_dir, cfg.num_workers)
    return EvalSet(cfg.name, len(labels), mean_t, std_t, images=images, labels=labels)


def _find_split_dir(root: Path, names: list[str]) -> Path | None:
    for name in names:
        candidate = root / name
        if candidate.is_dir() and any(p.is_dir() for p in candidate.iterdir()):
            return candidate
    return None


def _check_classes(cfg, classes: list[str], split_dir: Path) -> None:
    if cfg.num_classes and len(classes) != cfg.num_classes:
        raise ConfigError(f"{split_dir} has {len(classes)} class folders but dataset={cfg.name} needs "
                          f"{cfg.num_classes}; point dataset.root at the right data set")


def _missing_message(cfg, root: Path, torchvision_folder: str | None) -> str:
    dirs = " or ".join(f"{root}/{d}/<class>/<image>" for d in cfg.split_dirs)
    hint = f"expected {dirs} (ImageFolder)"
    if torchvision_folder:
        hint += f", or {root}/{torchvision_folder} (torchvision); add dataset.download=true to download it"
    return (f"{cfg.name} evaluation data not found under dataset.root={root}: {hint}. "
            f"Set dataset.root=PATH or the environment variable {cfg.root_env}")


def _worker_context(num_workers: int):
    """Inside joblib's loky workers (hydra/launcher=local_parallel) the default start method is loky's, which
    DataLoader workers cannot use: take fork there (the Linux default elsewhere); None keeps torch's choice."""
    method = multiprocessing.get_start_method(allow_none=True)  # allow_none: do not fix the default here
    if num_workers and method is not None and method not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def _transform(cfg):
    steps = []
    if cfg.resize:
        steps += [transforms.Resize(int(cfg.resize)), transforms.CenterCrop(int(cfg.image_size))]
    return transforms.Compose(steps + [transforms.PILToTensor()])


def _subset_indices(n: int, max_samples) -> list[int] | None:
    """An evenly strided, deterministic slice: class-sorted folders keep every class represented."""
    if not max_samples or max_samples >= n:
        return None
    return [(i * n) // max_samples for i in range(int(max_samples))]


def _cached_tensors(dataset, source: str, indices, cache_dir, num_workers):
    key = hashlib.sha256(f"{source}|{indices}".encode()).hexdigest()[:16]
    path = Path(os.path.expanduser(cache_dir)) / "data" / f"{key}.pt" if cache_dir else None
    if path is not None and path.exists():
        blob = torch.load(path, weights_only=True)
        return blob["images"], blob["labels"]
    loader = DataLoader(dataset, batch_size=500, shuffle=False, num_workers=num_workers,
                        multiprocessing_context=_worker_context(num_workers),
                        collate_fn=lambda items: (torch.stack([torch.as_tensor(x) for x, _ in items]),
                                                  torch.tensor([y for _, y in items])))
    xs, ys = zip(*loader)
    images, labels = torch.cat(xs), torch.cat(ys)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": images, "labels": labels}, tmp)
        os.replace(tmp, path)
    return images, labels
