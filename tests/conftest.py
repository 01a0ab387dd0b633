"""Shared fixtures: where the real data and teacher are (../shared beside the repository, or env overrides)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _path(env: str, default: Path) -> Path:
    return Path(os.environ.get(env, str(default)))


CIFAR10_ROOT = _path("DFQ_CIFAR10_ROOT", SHARED / "data" / "cifar10-jpeg")
MODELS_DIR = _path("DFQ_MODELS_DIR", SHARED / "models")
IMAGENET_SAMPLES = _path("DFQ_IMAGENET_SAMPLES", SHARED / "data" / "imagenet-samples")
TEACHER = MODELS_DIR / "resnet20_cifar10.pt"
TEACHER_SHA256 = "841e84dbb23891aa299259242dc8550fae7556f5c54154a04f87f6c39df9f1f9"


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    if not (CIFAR10_ROOT / "test").is_dir():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10_ROOT} (set DFQ_CIFAR10_ROOT)")
    return CIFAR10_ROOT


@pytest.fixture(scope="session")
def teacher() -> Path:
    if not TEACHER.is_file():
        pytest.skip(f"teacher checkpoint not found at {TEACHER} (set DFQ_MODELS_DIR)")
    return TEACHER


@pytest.fixture(scope="session")
def imagenet_samples() -> Path:
    if not (IMAGENET_SAMPLES / "val").is_dir():
        pytest.skip(f"ImageNet samples not found at {IMAGENET_SAMPLES} (set DFQ_IMAGENET_SAMPLES)")
    return IMAGENET_SAMPLES


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_cli(*args: str, cache: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m dfqbench ARGS` in a subprocess, with progress bars off."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    if cache is not None:
        env["DFQ_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-m", "dfqbench", "progress=false", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
