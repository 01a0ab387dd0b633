"""Name -> class registries: a method yaml picks generators and loss terms by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable


def register(registry: dict[str, type], name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        registry[name] = cls
        return cls
    return add


def lookup(registry: dict[str, type], name: str, what: str) -> type:
    if name not in registry:
        raise ValueError(f"{what}: unknown name {name!r}; choose one of: {', '.join(sorted(registry))}")
    return registry[name]


def build(registry: dict[str, type], name: str, what: str, settings: dict | None, **context):
    """Instantiate `registry[name](**context, **settings)`; unknown settings are a one-line ValueError."""
    cls = lookup(registry, name, what)
    settings = dict(settings or {})
    accepted = set(inspect.signature(cls).parameters) - set(context)
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise ValueError(f"{what}={name}: unknown setting(s) {unknown}; valid: {sorted(accepted)}")
    return cls(**context, **settings)
