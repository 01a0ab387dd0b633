"""A method's teacher pool: several pretrained networks beside the run's teacher (MixMix's feature mixing,
DFED's ensemble). A method yaml lists them as model configs under `pool:` (Hydra defaults:
`- /model@pool.vgg8_bn: vgg8_bn_cifar10`); `check_pool` validates that mapping before any work and `load_pool`
builds the members, leaving out the run's own teacher and refusing members without trained weights."""

from __future__ import annotations

from omegaconf import OmegaConf
from torch import nn

from .models import load_model


def check_pool(pool) -> dict:
    if not isinstance(pool, dict) or not pool or any(
            not isinstance(m, dict) or not {"source", "arch"} <= set(m) for m in pool.values()):
        raise ValueError("method.pool must map names to model configs (conf/model/*.yaml, e.g. in the method "
                         "yaml's defaults: `- /model@pool.vgg8_bn: vgg8_bn_cifar10`)")
    return dict(pool)


def load_pool(pool: dict, models_dir: str | None, ctx) -> tuple[list[nn.Module], list[str]]:
    """The pool's models in eval mode (the run's own teacher, same sha256, left out) and their "name:sha256"."""
    models, ids = [], []
    for name, cfg in pool.items():
        loaded = load_model(OmegaConf.create(cfg), models_dir)
        if loaded.weights == "random":  # a pool of untrained nets would teach nothing: refuse
            raise ValueError(f"method.pool.{name}: no weights for {cfg['arch']} (no model.checkpoint, nothing in "
                             f"models_dir, no download); train it (scripts/train_teacher.py) or drop it")
        if loaded.sha256 == ctx.model_sha256:
            continue
        classes = cfg.get("num_classes")
        if classes is not None and int(classes) != ctx.num_classes:
            raise ValueError(f"method.pool.{name}: {classes} classes, the run has {ctx.num_classes}")
        models.append(loaded.model.eval().to(ctx.device))
        ids.append(f"{name}:{loaded.sha256}")
    return models, ids
