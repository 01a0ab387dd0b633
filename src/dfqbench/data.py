"""Evaluation data: CIFAR-10/100 (ImageFolder root or torchvision download folder) and ImageNet (ImageFolder val).

Small data sets are decoded once into a uint8 tensor and cached on disk (decoding 10,000 JPEGs costs seconds;
a run evaluates twice). Large ones stream through a DataLoader.

`data_identity` names the test set a run evaluates without decoding it (the folder, its file names and sizes):
the run fingerprint carries it, and the decoded-set cache is keyed by it. An unreadable folder or image is a
one-line ConfigError, never a traceback.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import ConfigError

_TORCHVISION = {"cifar10": (datasets.CIFAR10, "cifar-10-batches-py"),
                "cifar100": (datasets.CIFAR100, "cifar-100-python")}
_IMAGE_SUFFIXES = IMG_EXTENSIONS  # what ImageFolder reads
_ERROR_PREFIX = re.compile(r"^(?:[\w.]+\.)?ConfigError: ")


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
        for x, y in _one_line_errors(loader):
            yield self._normalize(x.to(device), device), y.to(device)

    def _normalize(self, x: torch.Tensor, device) -> torch.Tensor:
        x = (x - self.mean.to(device)) / self.std.to(device)
        return x.contiguous(memory_format=torch.channels_last)


def locate(cfg) -> tuple[str, Path]:
    """Where the test split is: ("imagefolder", <root>/<split>) or ("torchvision", <root>/<archive folder>).
    Missing or unreadable: ConfigError. With `download`, a missing torchvision folder is downloaded here."""
    root = Path(os.path.expanduser(str(cfg.root)))
    split_dir = _find_split_dir(root, list(cfg.split_dirs))
    if split_dir is not None:
        return "imagefolder", split_dir
    if cfg.name not in _TORCHVISION:
        raise ConfigError(_missing_message(cfg, root, None))
    cls, folder = _TORCHVISION[cfg.name]
    if not _is_dir(root / folder):
        if not cfg.download:
            raise ConfigError(_missing_message(cfg, root, folder))
        try:
            cls(str(root), train=False, download=True)
        except Exception as exc:  # a failed download or a corrupt archive
            raise ConfigError(f"could not download {cfg.name} into {root}: {str(exc).splitlines()[0]}") from None
    return "torchvision", root / folder


def data_identity(cfg) -> dict:
    """The test set's identity, cheap (no image is opened): its folder, how many files and bytes it holds, and a
    digest of every file's relative path and size. Class folders are checked against `dataset.num_classes` and
    for readability here, before anything loads."""
    kind, folder = locate(cfg)
    if kind == "imagefolder":
        classes = _class_dirs(folder)
        _check_classes(cfg, [c.name for c in classes], folder)
        groups = [(c, _files_under(c)) for c in classes]
        empty = [c.name for c, files in groups if not any(p.lower().endswith(_IMAGE_SUFFIXES) for p, _ in files)]
        if empty:
            raise ConfigError(f"{folder} has class folders without images ({', '.join(empty[:5])}"
                              f"{', ...' if len(empty) > 5 else ''}): each needs image files "
                              f"({' '.join(_IMAGE_SUFFIXES)}); point dataset.root at a complete {cfg.name} copy")
        files = [item for _, items in groups for item in items]
    else:
        files = _files_under(folder)
    h = hashlib.sha256()
    for path, size in sorted(files):
        h.update(f"{path}\t{size}\n".encode())
    return {"kind": kind, "root": str(folder.resolve()), "files": len(files), "bytes": sum(s for _, s in files),
            "digest": h.hexdigest()[:16]}


def describe_identity(identity: dict) -> str:
    size = identity["bytes"]
    size = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"
    return f"{identity['root']} ({identity['files']} files, {size}, digest {identity['digest']})"


def load_eval_set(cfg, mean, std, cache_dir: str | None, identity: dict | None = None) -> EvalSet:
    """`cfg` is the `dataset` config node; `identity` as `data_identity` gave it (computed here when None)."""
    if identity is None:
        identity = data_identity(cfg)
    kind, folder = locate(cfg)
    mean_t = torch.tensor(list(mean), dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).reshape(1, -1, 1, 1)
    if kind == "imagefolder":
        try:
            dataset = datasets.ImageFolder(str(folder), transform=_transform(cfg), loader=load_image)
        except (OSError, ValueError) as exc:  # a folder that changed since data_identity looked
            raise ConfigError(f"cannot read {cfg.name} test images in {folder}: {str(exc).splitlines()[0]}") from None
    else:
        cls, _ = _TORCHVISION[cfg.name]
        try:
            dataset = cls(str(folder.parent), train=False, download=False, transform=_transform(cfg))
        except Exception as exc:  # a corrupt archive
            raise ConfigError(f"could not load {cfg.name} from {folder}: {str(exc).splitlines()[0]}") from None
    # the identity's digest, not only the path: a folder whose files changed is decoded again
    source = f"{kind}:{identity['root']}:{identity['digest']}"
    indices = _subset_indices(len(dataset), cfg.max_samples)
    if indices is not None:
        dataset = Subset(dataset, indices)
    if not cfg.in_memory:
        return EvalSet(cfg.name, len(dataset), mean_t, std_t, loader_dataset=dataset, num_workers=cfg.num_workers)
    images, labels = _cached_tensors(dataset, source, indices, cache_dir, cfg.num_workers)
    return EvalSet(cfg.name, len(labels), mean_t, std_t, images=images, labels=labels)


def load_image(path: str) -> Image.Image:
    """ImageFolder's loader, with a one-line ConfigError naming the file that cannot be read or decoded."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as exc:  # OSError (truncated, unreadable), PIL.UnidentifiedImageError, SyntaxError, ...
        raise ConfigError(f"cannot read test image {path}: {_first_line(exc)}; replace or remove the file") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _one_line_errors(loader):
    """Iterate a DataLoader; a ConfigError raised in a worker process arrives with the worker's traceback in
    its message: keep its last line."""
    try:
        yield from loader
    except ConfigError as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise ConfigError(_ERROR_PREFIX.sub("", lines[-1]) if lines else "cannot read the test images") from None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot read {path}: {exc.strerror or exc}; check its permissions or point dataset.root "
                       f"elsewhere")


def _find_split_dir(root: Path, names: list[str]) -> Path | None:
    for name in names:
        candidate = root / name
        if not _is_dir(candidate):
            continue
        try:
            if any(p.is_dir() for p in candidate.iterdir()):
                return candidate
        except OSError as exc:  # PermissionError
            raise _unreadable(candidate, exc) from None
    return None


def _class_dirs(folder: Path) -> list[Path]:
    try:
        return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name)
    except OSError as exc:
        raise _unreadable(folder, exc) from None


def _files_under(folder: Path) -> list[tuple[str, int]]:
    """Every file under folder (links followed, as ImageFolder does) as (path relative to folder's parent, size);
    an unreadable folder or file: ConfigError."""
    found = []
    stack = [str(folder)]
    base = len(str(folder.parent)) + 1
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir():
                        stack.append(entry.path)
                    else:
                        found.append((entry.path[base:], entry.stat().st_size))
        except OSError as exc:  # PermissionError: a folder (or a file) that cannot be read
            raise _unreadable(Path(exc.filename or current), exc) from None
    return found


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
    xs, ys = zip(*_one_line_errors(loader))
    images, labels = torch.cat(xs), torch.cat(ys)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": images, "labels": labels}, tmp)
        os.replace(tmp, path)
    return images, labels
