"""The interface every quantization method implements.

A method is one module here plus one `conf/method/<name>.yaml` whose `_target_` names its class; the yaml's
other keys are the constructor's keyword arguments (the paper's settings, documented there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant import Convention, quantize_model


@dataclass
class QuantContext:
    convention: Convention
    wbit: int
    abit: int
    seed: int
    device: torch.device
    input_shape: tuple[int, int, int]  # C, H, W of one normalized input image
    num_classes: int
    progress: bool = True
    info: dict[str, Any] = field(default_factory=dict)  # method-specific facts that go into the record
    # what calibration-data sources need (dfqbench.synth.calib_data); tests may leave them at the defaults
    mean: torch.Tensor = field(default_factory=lambda: torch.zeros(3))  # input normalization, per channel
    std: torch.Tensor = field(default_factory=lambda: torch.ones(3))
    model_sha256: str | None = None  # with cache_dir: synthetic data is cached per teacher
    cache_dir: str | None = None
    train_root: str | None = None  # the data set's training images (ImageFolder), when present
    other_domain_root: str | None = None  # a folder of images from another domain
    calib_list: str | None = None  # a text file naming calibration images (method.calib_data=listed)
    run_dir: Path | None = None  # the run's folder: training methods keep their resumable checkpoint there
    test_eval: Callable[[nn.Module], float] | None = None  # top-1 on the test set: only for flagged best-epoch runs
    compile: str = "none"  # the generator-QAT trainer's torch.compile mode (config `compile`)
    precision: str = "fp32"  # the data-making networks' precision (config `precision`, dfqbench.precision)

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)


FIDELITIES = {
    "reproduction": "settings from the paper and its official code",
    "unofficial-code": "settings from a third party's re-implementation (no official code)",
    "reconstruction": "best-effort reconstruction: only the abstract (or a summary) is public; every setting that "
                      "is not in it is dfqbench's choice, listed under source.inferred",
}
SOURCE_KEYS = ("paper", "code", "fidelity", "inferred")


def check_source(name: str, source: dict | None) -> dict | None:
    """A method yaml's `source:` block (paper, code: repository@commit or none, fidelity, inferred: the settings
    the paper does not give) -> the block, or ValueError naming the bad key or value."""
    if source is None:
        return None
    if not isinstance(source, dict):
        raise ValueError(f"method.source must be a mapping with keys {list(SOURCE_KEYS)}")
    unknown = sorted(set(source) - set(SOURCE_KEYS))
    missing = [k for k in SOURCE_KEYS if k not in source]
    if unknown or missing:
        raise ValueError(f"method.source of {name!r}: unknown keys {unknown}, missing keys {missing}; "
                         f"keys: {list(SOURCE_KEYS)}")
    if source["fidelity"] not in FIDELITIES:
        raise ValueError(f"method.source.fidelity={source['fidelity']!r} is not valid; choose one of: "
                         f"{', '.join(FIDELITIES)}")
    if not isinstance(source["inferred"], list):
        raise ValueError(f"method.source.inferred must be a list of the settings dfqbench had to choose")
    return dict(source)


class Method:
    """Subclasses implement `quantize`; `convention_overrides` are convention fields the method requires;
    `source` (optional) says where the method's settings come from (`check_source`)."""

    quantizes = True  # False for the FP32 reference row
    stochastic = False  # True when the result depends on the seed
    # True: the method reads BatchNorm statistics (activation ranges, synthesis or generator losses, BN folding
    # tricks), so a BN-free model (a vision transformer) is refused before any work by `check_model`
    needs_batchnorm = True

    def __init__(self, name: str, convention_overrides: dict | None = None, source: dict | None = None,
                 **params: Any):
        self.name = name
        self.convention_overrides = dict(convention_overrides or {})
        self.source = check_source(name, source)
        if params:
            raise TypeError(f"method {name!r} got unknown settings: {sorted(params)}")

    @property
    def fidelity(self) -> str:
        return self.source["fidelity"] if self.source else "reproduction"

    def check_convention(self, convention: Convention) -> None:
        """Raise ValueError (one line) when the method cannot run under this convention; checked before any work."""

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError (one line) when the method cannot quantize this model; checked before any work."""
        if self.needs_batchnorm and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError(f"it needs BatchNorm statistics and {type(model).__name__} has no BatchNorm layer; "
                             f"methods for BN-free models (transformers): {', '.join(BN_FREE_METHODS)}")

    def quantize(self, model: nn.Module, ctx: QuantContext) -> nn.Module:
        raise NotImplementedError


class CalibrationMethod(Method):
    """The post-training stage the calibration methods share: their images (synthesized, distilled or loaded:
    `calibration_data`), the quantized copy, one calibration pass over the images (`calibrate`). The images'
    time lands in ctx.info under `time_key`."""

    time_key = "synthesis_time_s"

    def calibration_data(self, model: nn.Module, ctx: QuantContext) -> list[torch.Tensor]:
        raise NotImplementedError

    def calibrate(self, qmodel: nn.Module, batches: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def quantize(self, model, ctx):
        t0 = time.perf_counter()
        batches = [b.to(ctx.device) for b in self.calibration_data(model, ctx)]
        ctx.info[self.time_key] = round(time.perf_counter() - t0, 3)
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        self.calibrate(qmodel, batches)
        return qmodel


# the method yamls (names) whose classes set needs_batchnorm = False: what a BN-free model can run
BN_FREE_METHODS = ("fp32", "crossdomain", "minmax_calib", "percentile_calib", "gaussian_calib", "psaqvit", "psaqvit2")


class PresetSettingsMethod(Method):
    """A method whose settings (`self._settings`, applied by `self._configure(settings)`) an official preset may
    replace: quant.method_settings.<name> of the run's convention (quant=official_aciq, official_ocs, ...)."""

    _settings: dict

    def _configure(self, settings: dict) -> None:
        raise NotImplementedError

    def check_convention(self, convention: Convention) -> None:
        extra = dict(convention.method_settings.get(self.name) or {})
        unknown = sorted(set(extra) - set(self._settings))
        if unknown:
            raise ValueError(f"quant.method_settings.{self.name}: unknown setting(s) {unknown}; valid: "
                             f"{sorted(self._settings)}")
        if extra:
            self._configure({**self._settings, **extra})
