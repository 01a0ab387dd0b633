"""A mixin for the dataclasses that hold a method's settings block (`method.synthesis`, `method.reconstruct`, ...)."""

from __future__ import annotations

import math


def refuse_unknown(values, known, prefix: str) -> None:
    """A ValueError if `values` (a config block's keys) holds a key not in `known`, naming them and the valid ones."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{prefix} has unknown setting(s) {unknown}; valid: {', '.join(sorted(known))}")


class CheckedSettings:
    """`from_dict` builds the dataclass from a config block, refusing unknown keys (with the valid ones named), and
    runs the subclass's `validate(prefix)`; `PREFIX` is the block's config path, used in the messages."""

    PREFIX = "method"

    @classmethod
    def from_dict(cls, values: dict | None, prefix: str | None = None):
        prefix = prefix or cls.PREFIX
        values = dict(values or {})
        refuse_unknown(values, cls.__dataclass_fields__, prefix)
        return cls(**values).validate(prefix)


def check_int(key: str, value, low: int = 1) -> int:
    """`value` if it is an integer >= `low` (a bool is not one), else a ValueError naming `key` (the config path)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}={value!r} must be an integer >= {low}")
    return value


def check_number(key: str, value, low: float = 0.0, strict: bool = False) -> float:
    """`value` if it is a finite number > `low` (`strict`) or >= `low`, else a ValueError naming `key`."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low
            or (strict and value == low)):
        raise ValueError(f"{key}={value!r} must be a number {'>' if strict else '>='} {low:g}")
    return value
