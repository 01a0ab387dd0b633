"""Shared fixtures: where the real data and teacher are (../shared beside the repository, or env overrides).

Tests that need ../shared take one of the fixtures `cifar10_root`, `teacher`, `imagenet_samples`. When what they
need is missing, every one of them is skipped with the same reason, which the run prints once at its end (and
`pytest -rs` beside each skipped test); under CI=true the run stops at collection with exit status 1 instead, so
that a CI checkout without ../shared cannot pass by testing nothing (tests/test_shared_missing.py checks both).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from hydra import compose, initialize_config_dir

from dfqbench.__main__ import CONF_DIR
from dfqbench.cpu_allocator import keep_freed_memory

keep_freed_memory()  # as every dfqbench run does (runner.py): the suite's CPU forwards 1.5x faster

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _path(env: str, default: Path) -> Path:
    return Path(os.environ.get(env, str(default)))


CIFAR10_ROOT = _path("DFQ_CIFAR10_ROOT", SHARED / "data" / "cifar10-jpeg")
MODELS_DIR = _path("DFQ_MODELS_DIR", SHARED / "models")
IMAGENET_SAMPLES = _path("DFQ_IMAGENET_SAMPLES", SHARED / "data" / "imagenet-samples")
TEACHER = MODELS_DIR / "resnet20_cifar10.pt"
TEACHER_SHA256 = "841e84dbb23891aa299259242dc8550fae7556f5c54154a04f87f6c39df9f1f9"

# fixture -> (what it is, where it is looked for, the env variable that moves it, whether it is there)
SHARED_FIXTURES = {
    "cifar10_root": ("CIFAR-10 test images", CIFAR10_ROOT / "test", "DFQ_CIFAR10_ROOT",
                     (CIFAR10_ROOT / "test").is_dir()),
    "teacher": ("ResNet-20 teacher", TEACHER, "DFQ_MODELS_DIR", TEACHER.is_file()),
    "imagenet_samples": ("ImageNet samples", IMAGENET_SAMPLES / "val", "DFQ_IMAGENET_SAMPLES",
                         (IMAGENET_SAMPLES / "val").is_dir()),
}
MISSING = {name: spec for name, spec in SHARED_FIXTURES.items() if not spec[3]}
# one reason for every test that needs something missing
SHARED_MISSING_REASON = ("../shared not found: " + "; ".join(f"no {what} at {where} (set {env})"
                                                             for what, where, env, _ in MISSING.values())
                         if MISSING else "")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _needs_missing(item: pytest.Item) -> bool:
    return any(name in MISSING for name in getattr(item, "fixturenames", ()))


@pytest.hookimpl(trylast=True)  # after `-m` / `-k` deselection: only the tests that will run count
def pytest_collection_modifyitems(session, config, items):
    if not MISSING or not in_ci():
        return
    needing = [item for item in items if _needs_missing(item)]
    if needing:
        pytest.exit(f"CI=true and {len(needing)} selected tests need what is missing, {SHARED_MISSING_REASON}",
                    returncode=1)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not MISSING:
        return
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and r.longrepr[2].endswith(SHARED_MISSING_REASON)]
    if skipped:
        terminalreporter.write_sep("=", "dfqbench: ../shared missing", yellow=True, bold=True)
        terminalreporter.write_line(f"{len(skipped)} tests skipped: {SHARED_MISSING_REASON}. Put the shared folder "
                                    f"beside the repository ({SHARED}) or set the variables; under CI=true this "
                                    "is an error.", yellow=True)


def _require(fixture: str) -> None:
    if fixture in MISSING:
        pytest.skip(SHARED_MISSING_REASON)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """One torch thread for the test, then the previous count: the many small ops of synthesis and reconstruction
    loops run ~10x slower when two OpenMP threads share two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    _require("cifar10_root")
    return CIFAR10_ROOT


@pytest.fixture(scope="session")
def teacher() -> Path:
    _require("teacher")
    return TEACHER


@pytest.fixture(scope="session")
def imagenet_samples() -> Path:
    _require("imagenet_samples")
    return IMAGENET_SAMPLES


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def compose_cfg(*overrides: str):
    """The composed config of `python -m dfqbench OVERRIDES`, with progress bars off (later overrides win)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=["progress=false", *overrides])


def run_cli(*args: str, cache: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m dfqbench ARGS` in a subprocess, with progress bars off."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    if cache is not None:
        env["DFQ_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-m", "dfqbench", "progress=false", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_bn_model():
    """Conv-BN-ReLU x2, pooling, Linear(6, 5): random BN running statistics, eval mode (synthesis tests)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()
