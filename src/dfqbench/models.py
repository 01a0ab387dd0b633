"""FP32 teachers from pytorchcv, torchvision or timm, from a local checkpoint or the zoo's download.

Weights are looked up in this order: `model.checkpoint`, then `<paths.models_dir>/<arch>.pt`, then the zoo's
pretrained download (`model.pretrained=true`), else random initialization. Every run records a sha256: of the
checkpoint file when one is used, otherwise of the loaded state_dict's tensors.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

SOURCES = ("pytorchcv", "torchvision", "timm")


@dataclass
class LoadedModel:
    model: nn.Module
    sha256: str
    weights: str  # "checkpoint", "pretrained" or "random"
    checkpoint: str | None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def find_checkpoint(cfg, models_dir: str | None) -> Path | None:
    if cfg.checkpoint:
        path = Path(os.path.expanduser(str(cfg.checkpoint)))
        if not path.is_file():
            raise ConfigError(f"checkpoint not found: model.checkpoint={path}; give the path of an FP32 state_dict "
                              f"file, or drop model.checkpoint to use model.pretrained=true (download)")
        return path
    if models_dir:
        for suffix in (".pt", ".pth"):
            path = Path(os.path.expanduser(str(models_dir))) / f"{cfg.arch}{suffix}"
            if path.is_file():
                return path
    return None


def load_model(cfg, models_dir: str | None = None) -> LoadedModel:
    """`cfg` is the `model` config node."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"model.source={cfg.source!r} is not valid; choose one of: {', '.join(SOURCES)}")
    checkpoint = find_checkpoint(cfg, models_dir)
    if checkpoint is not None:
        digest = file_sha256(checkpoint)
        if cfg.sha256 and digest != str(cfg.sha256).lower():
            raise ConfigError(f"checkpoint {checkpoint} has sha256 {digest}, not model.sha256={cfg.sha256}; "
                              f"refusing to run on unexpected weights")
        model = _build(cfg, pretrained=False)
        _load_state_dict(model, checkpoint)
        return LoadedModel(model, digest, "checkpoint", str(checkpoint))
    if cfg.pretrained:
        model = _build(cfg, pretrained=True)
        weights = "pretrained"
    else:
        model = _build(cfg, pretrained=False)
        weights = "random"
    digest = state_dict_sha256(model)
    if cfg.sha256 and digest != str(cfg.sha256).lower():
        raise ConfigError(f"{weights} weights of {cfg.arch} have state_dict sha256 {digest}, not "
                          f"model.sha256={cfg.sha256}; refusing to run on unexpected weights")
    return LoadedModel(model, digest, weights, None)


def _load_state_dict(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    for key in ("state_dict", "model", "net"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint {path} does not fit model.arch={type(model).__name__}: "
                          f"{str(exc).splitlines()[0]} ...") from exc


def _build(cfg, pretrained: bool) -> nn.Module:
    arch = str(cfg.arch)
    try:
        if cfg.source == "pytorchcv":
            from pytorchcv.model_provider import _models, get_model

            _check_arch(arch, list(_models), "pytorchcv")
            return get_model(arch, pretrained=pretrained)
        if cfg.source == "torchvision":
            import torchvision

            _check_arch(arch, torchvision.models.list_models(), "torchvision")
            if pretrained:
                return torchvision.models.get_model(arch, weights="DEFAULT")
            return torchvision.models.get_model(arch, weights=None, num_classes=cfg.num_classes)
        import timm

        _check_arch(arch, timm.list_models(), "timm")
        kwargs = {} if pretrained else {"num_classes": cfg.num_classes}
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # network failure during a download, mostly
        raise ConfigError(f"could not build {cfg.source} model {arch!r} (pretrained={pretrained}): "
                          f"{str(exc).splitlines()[0]}; offline, give model.checkpoint=PATH or "
                          f"DFQ_MODELS_DIR") from exc


def _check_arch(arch: str, known: list[str], source: str) -> None:
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5)
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.arch={arch!r} is not a {source} architecture{hint}")
