"""A method's (or a convention's) settings that depend on the run's data set, teacher or bit-width, applied before
it is built.

The official code of a method often changes its settings by data set (Qimera mixes K = 2 classes on CIFAR-10 but
10 on CIFAR-100; HAST's feature weight is 1000 on CIFAR-10, 2000 on CIFAR-100). A method yaml lists them under
`per_setting`, a mapping name -> {when: {...}, set: {...}}:

    per_setting:
      cifar100: {when: {dataset: cifar100}, set: {generator: {mix_classes: 10}}}
      cifar100_w5: {when: {dataset: cifar100, wbit: 5}, set: {generator: {mix_classes: 50}}}

`when` matches the run's `dataset` (dataset.name), `model` (model.name), `wbit`, `abit` and `schedule`
(schedule.name: a CPU-budget setting of a method whose paper step is too costly there); every entry whose
conditions all hold is merged into `method`, in order (a yaml that extends another adds or replaces entries by
name). A key the user sets on the command line (`method.generator.mix_classes=3`) wins over every entry. The
merged settings are what the run's config, hash and record hold; `per_setting` itself is removed.

A quant preset may list its own `per_setting`, merged into `quant` the same way (the ACIQ code keeps a 1000-way
classifier at 8 bit: `quant=official_aciq` sets that on ImageNet); `quant.` keys of the command line win there.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import ConfigError

WHEN_KEYS = ("dataset", "model", "wbit", "abit", "schedule")
GROUPS = ("method", "quant")  # the config groups that may hold a `per_setting`


def _run_values(cfg: DictConfig) -> dict:
    schedule = cfg.get("schedule")
    return {"dataset": str(cfg.dataset.name), "model": str(cfg.model.name), "wbit": cfg.wbit, "abit": cfg.abit,
            "schedule": str(schedule.get("name")) if schedule is not None else ""}


def _leaves(tree, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix]
    return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]


def _user_keys(overrides: list[str] | None, group: str) -> list[str]:
    """The `<group>.` keys set on the command line (without the group prefix and any +/~ marker)."""
    keys = []
    for item in overrides or ():
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith(group + "."):
            keys.append(key[len(group) + 1:])
    return keys


def _overridden(leaf: str, user_keys: list[str]) -> bool:
    return any(leaf == k or leaf.startswith(k + ".") or k.startswith(leaf + ".") for k in user_keys)


def apply_per_setting(cfg: DictConfig, overrides: list[str] | None = None) -> list[str]:
    """Merge the matching `method.per_setting` (and `quant.per_setting`) entries into cfg.method (cfg.quant), in
    place, and drop `per_setting`; returns the names of the entries applied. Idempotent: a config without
    `per_setting` is left as it is."""
    return [name for group in GROUPS for name in _apply_group(cfg, group, overrides)]


def _apply_group(cfg: DictConfig, group: str, overrides: list[str] | None) -> list[str]:
    if group not in cfg or not isinstance(cfg[group], DictConfig) or "per_setting" not in cfg[group]:
        return []
    entries = OmegaConf.to_container(cfg[group].per_setting, resolve=True) or {}
    if not isinstance(entries, dict):
        raise ConfigError(f"{group}.per_setting must map names to {{when: ..., set: ...}}, "
                          f"not {type(entries).__name__}")
    run = _run_values(cfg)
    user = _user_keys(overrides, group)
    applied = []
    with open_dict(cfg):
        del cfg[group]["per_setting"]
        for name, entry in entries.items():
            if not isinstance(entry, dict) or set(entry) - {"when", "set"} or not isinstance(entry.get("set"), dict):
                raise ConfigError(f"{group}.per_setting.{name} must be {{when: {{...}}, set: {{...}}}}")
            when = entry.get("when") or {}
            unknown = sorted(set(when) - set(WHEN_KEYS))
            if unknown:
                raise ConfigError(f"{group}.per_setting.{name}.when: unknown key(s) {unknown}; "
                                  f"valid: {list(WHEN_KEYS)}")
            if any(str(run[k]) != str(v) for k, v in when.items()):
                continue
            for leaf in _leaves(entry["set"]):
                if _overridden(leaf, user):
                    continue
                value = entry["set"]
                for part in leaf.split("."):
                    value = value[part]
                OmegaConf.update(cfg[group], leaf, value, force_add=True)
            applied.append(str(name))
    return applied
