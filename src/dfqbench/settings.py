"""A mixin for the dataclasses that hold a method's settings block (`method.synthesis`, `method.reconstruct`, ...)."""

from __future__ import annotations


class CheckedSettings:
    """`from_dict` builds the dataclass from a config block, refusing unknown keys (with the valid ones named), and
    runs the subclass's `validate(prefix)`; `PREFIX` is the block's config path, used in the messages."""

    PREFIX = "method"

    @classmethod
    def from_dict(cls, values: dict | None, prefix: str | None = None):
        prefix = prefix or cls.PREFIX
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{prefix} has unknown setting(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**values).validate(prefix)
