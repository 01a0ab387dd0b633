"""FP32 teachers from pytorchcv, torchvision or timm, from a local checkpoint or the zoo's download; plus
dfqbench's own architectures (source `dfqbench`: dfqbench.archs, the teacher pool's VGG-BN and MobileNetV2 and
the 1-D stand-in for a speech model), whose weights only come from a checkpoint.

Weights are looked up in this order: `model.checkpoint`, then `<paths.models_dir>/<arch>.pt`, then the zoo's
pretrained download (`model.pretrained=true`), else random initialization. Every run records a sha256: of the
checkpoint file when one is used, otherwise of the loaded state_dict's tensors.

`resolve_weights` finds (and hashes) the weights without building the model, so that a run can check its input
and decide whether a finished record matches before anything heavy loads; `load_model` then builds it.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .archs import ARCHS
from .errors import ConfigError

SOURCES = ("pytorchcv", "torchvision", "timm", "dfqbench")
REPO_DIR = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_DIR / "conf"
# pytorchcv names end in the data set their weights were trained on (resnet20_cifar100); no such tag: ImageNet-1k
_PYTORCHCV_DATASET_TAGS = ("cifar10", "cifar100", "svhn", "cub", "voc", "ade20k", "cityscapes", "coco",
                           "widerface")


@dataclass
class LoadedModel:
    model: nn.Module
    sha256: str
    weights: str  # "checkpoint", "pretrained" or "random"
    checkpoint: str | None


@dataclass
class Weights:
    """Where a run's teacher weights come from, known before the model is built."""
    source: str  # "checkpoint", "pretrained" or "random"
    checkpoint: Path | None
    sha256: str | None  # of the checkpoint file; None for zoo or random weights (known once built)

    @property
    def identity(self) -> str:
        """What the run fingerprint records of the weights: the file's sha256, else where the weights come from."""
        return self.sha256 or self.source

    def describe(self, cfg) -> str:
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint.resolve()} (sha256 {self.sha256})"
        if self.source == "pretrained":
            return f"{cfg.source}'s pretrained weights of {cfg.arch} (downloaded or cached by {cfg.source})"
        return f"random initialization of {cfg.arch} (seeded by seed=)"


def model_datasets(cfg) -> tuple[list[str] | None, str]:
    """The data sets a teacher belongs to (None: not known) and where that comes from: `model.dataset` (set by
    every preset of conf/model/), else a pytorchcv name's tag (resnet20_cifar10; no tag: imagenet)."""
    declared = cfg.get("dataset")
    if declared:
        return ([str(declared)] if isinstance(declared, str) else [str(d) for d in declared]), "model.dataset"
    if cfg.get("source") == "pytorchcv" and not _missing(cfg, "arch"):
        tag = str(cfg.arch).rsplit("_", 1)[-1]
        return [tag if tag in _PYTORCHCV_DATASET_TAGS else "imagenet"], f"the pytorchcv name {cfg.arch}"
    return None, ""


def models_for_dataset(dataset: str) -> list[str]:
    """The model presets (conf/model/*.yaml) whose `dataset:` names this data set."""
    from omegaconf import OmegaConf

    names = []
    for path in sorted(CONF_DIR.glob("model/*.yaml")):
        declared = OmegaConf.load(path).get("dataset")
        if declared and dataset in ([declared] if isinstance(declared, str) else list(declared)):
            names.append(path.stem)
    return names


def check_model_dataset(model_cfg, dataset_name: str) -> None:
    """ConfigError when the teacher was trained for another data set (model=resnet18 dataset=cifar10)."""
    datasets_, why = model_datasets(model_cfg)
    if datasets_ is None or dataset_name in datasets_:
        return
    others = models_for_dataset(dataset_name)
    hint = f", or a {dataset_name} teacher: model={'|'.join(others)}" if others else ""
    where = "" if why == "model.dataset" else f" (from {why}; model.dataset=NAME says otherwise)"
    raise ConfigError(f"model={model_cfg.name} is a teacher for dataset={'|'.join(datasets_)}{where}, not "
                      f"dataset={dataset_name}; use dataset={datasets_[0]}{hint}")


def _missing(cfg, key: str) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, key)


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
        if not path.is_absolute() and not path.is_file() and (REPO_DIR / path).is_file():
            path = REPO_DIR / path  # a checkpoint committed with the code (models/...), run from another folder
        if not path.is_file():
            raise ConfigError(f"checkpoint not found: model.checkpoint={path}; give the path of an FP32 state_dict "
                              f"file, or drop model.checkpoint to use model.pretrained=true (download)")
        return path.absolute()  # absolute: a caller may change folders before it reads the file again
    if models_dir:
        for suffix in (".pt", ".pth"):
            path = Path(os.path.expanduser(str(models_dir))) / f"{cfg.arch}{suffix}"
            if path.is_file():
                return path.absolute()
    return None


def resolve_weights(cfg, models_dir: str | None = None) -> Weights:
    """Check the source and architecture, find the checkpoint and hash it (checked against `model.sha256`):
    everything but building the model. Bad input is a ConfigError."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"model.source={cfg.source!r} is not valid; choose one of: {', '.join(SOURCES)}")
    _check_arch(str(cfg.arch), _known_archs(cfg.source), cfg.source)
    checkpoint = find_checkpoint(cfg, models_dir)
    if checkpoint is None:
        return Weights("pretrained" if cfg.pretrained else "random", None, None)
    try:
        digest = file_sha256(checkpoint)
        with open(checkpoint, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read checkpoint {checkpoint}: {exc.strerror or exc}") from None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip file, or a pickle (old)
        raise ConfigError(f"cannot read checkpoint {checkpoint}: not a file written by torch.save "
                          f"({_load_error(None, checkpoint) or 'it starts with ' + repr(head)}); give "
                          f"model.checkpoint=PATH of an FP32 state_dict file")
    if cfg.sha256 and digest != str(cfg.sha256).lower():
        raise ConfigError(f"checkpoint {checkpoint} has sha256 {digest}, not model.sha256={cfg.sha256}; "
                          f"refusing to run on unexpected weights")
    return Weights("checkpoint", checkpoint, digest)


def load_model(cfg, models_dir: str | None = None, weights: Weights | None = None) -> LoadedModel:
    """`cfg` is the `model` config node; `weights` as `resolve_weights` found them (found here when None)."""
    if weights is None:
        weights = resolve_weights(cfg, models_dir)
    if weights.checkpoint is not None:
        model = _build(cfg, pretrained=False)
        _load_state_dict(model, weights.checkpoint)
        return LoadedModel(model, weights.sha256, "checkpoint", str(weights.checkpoint))
    if weights.source == "pretrained":
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
    except Exception as exc:  # a text file: KeyError(101); a pickled module: "Weights only load failed ..."
        raise ConfigError(f"cannot read checkpoint {path}: not a state_dict saved by torch.save "
                          f"({_load_error(exc, path)}); give model.checkpoint=PATH of an FP32 state_dict "
                          f"file") from None
    for key in ("state_dict", "model", "net"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict (a dict of tensor "
                          f"names to tensors); give model.checkpoint=PATH of an FP32 state_dict file")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint {path} does not fit model.arch={type(model).__name__}: "
                          f"{str(exc).splitlines()[0]} ...") from exc


def _load_error(exc: Exception | None, path: Path) -> str:
    """Why torch.load failed (or would), in words: its own messages are a bare number (KeyError(101)) or a page
    long. Without an exception: "" unless the file is text."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        if not head:
            return "it is empty"
        head.decode("utf-8")
        if b"\0" not in head:
            return "it is a text file"
    except (OSError, UnicodeDecodeError):
        pass
    if exc is None:
        return ""
    text = str(exc).strip()
    if isinstance(exc, KeyError) or not text:
        return f"{type(exc).__name__} {text}".strip()
    if "Weights only load failed" in text:
        return "it holds more than tensors, e.g. a whole pickled model; save model.state_dict() instead"
    return text.splitlines()[0]


def _known_archs(source: str) -> list[str]:
    if source == "dfqbench":
        return list(ARCHS)
    if source == "pytorchcv":
        from pytorchcv.model_provider import _models

        return list(_models)
    if source == "torchvision":
        import torchvision

        return torchvision.models.list_models()
    import timm

    return timm.list_models()


def _build(cfg, pretrained: bool) -> nn.Module:
    arch = str(cfg.arch)
    if cfg.source == "dfqbench":
        if pretrained:
            raise ConfigError(f"model.arch={arch!r} (source dfqbench) has no download; give model.checkpoint=PATH "
                              f"(the committed models/{arch}.pt) or model.pretrained=false (random weights)")
        return ARCHS[arch](num_classes=int(cfg.num_classes))
    try:
        if cfg.source == "pytorchcv":
            from pytorchcv.model_provider import get_model

            return get_model(arch, pretrained=pretrained)
        if cfg.source == "torchvision":
            import torchvision

            if pretrained:
                return torchvision.models.get_model(arch, weights="DEFAULT")
            return torchvision.models.get_model(arch, weights=None, num_classes=cfg.num_classes)
        import timm

        kwargs = {} if pretrained else {"num_classes": cfg.num_classes}
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # network failure during a download, mostly
        raise ConfigError(f"could not build {cfg.source} model {arch!r} (pretrained={pretrained}): "
                          f"{str(exc).splitlines()[0]}; offline, give model.checkpoint=PATH or "
                          f"DFQ_MODELS_DIR") from exc


def _check_arch(arch: str, known: list[str], source: str) -> None:
    # timm names may carry a pretrained tag: resnet18.a1_in1k, swin_small_patch4_window7_224.ms_in1k
    base = arch.split(".", 1)[0] if source == "timm" else arch
    if base not in known:
        close = difflib.get_close_matches(base, known, n=5)
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.arch={arch!r} is not a {source} architecture{hint}")
