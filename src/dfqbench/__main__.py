"""Command line: ``python -m dfqbench method=M model=X dataset=D quant=C wbit=W abit=A [-m for sweeps]``."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .errors import ConfigError, UnsupportedModel

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("method", "model", "dataset", "quant", "paths")
_SWEEP_FUNCTIONS = ("range(", "glob(", "choice(", "interval(", "tag(", "sort(", "shuffle(")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _values(raw: str) -> list[str] | None:
    """The values of a command-line override, or None for sweep functions and interpolations."""
    if raw.startswith(_SWEEP_FUNCTIONS) or "${" in raw:
        return None
    return [v.strip() for v in raw.split(",")] if "-m" in sys.argv or "--multirun" in sys.argv else [raw]


def precheck(argv: list[str]) -> None:
    """One-line errors for the most common mistakes, before Hydra composes anything."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, raw = arg.lstrip("+~").split("=", 1)
        values = _values(raw)
        if values is None:
            continue
        if key in GROUPS:
            options = group_options(key)
            for value in values:
                if value not in options:
                    raise ConfigError(f"{key}={value} is not a known {key}; choose one of: {', '.join(options)}")
        elif key in ("wbit", "abit"):
            for value in values:
                if not value.lstrip("-").isdigit() or not 2 <= int(value) <= 32:
                    raise ConfigError(f"{key}={value} is not a valid bit-width; use an integer from 2 to 32 "
                                      f"(32 = float)")
        elif key == "seed":
            for value in values:
                if not value.isdigit():
                    raise ConfigError(f"seed={value} is not valid; use a non-negative integer")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from .runner import run, summary  # torch loads here, after the argument checks

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        record = run(cfg, run_dir, overrides=list(hc.overrides.task))
    except ConfigError as exc:
        print(f"dfqbench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except UnsupportedModel as exc:  # the run started; its record says status "failed" with this error
        print(f"dfqbench: error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(summary(record, run_dir / "record.json"))
    return record.get("top1")


def main() -> None:
    try:
        precheck(sys.argv[1:])
    except ConfigError as exc:
        print(f"dfqbench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
