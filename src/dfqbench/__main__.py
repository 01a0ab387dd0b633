"""Command line: ``python -m dfqbench method=M model=X dataset=D quant=C wbit=W abit=A [-m for sweeps]``.

`--help` is dfqbench's page (conf/hydra/help/dfqbench.yaml), `--hydra-help` Hydra's. A run logs what it resolved
(teacher, data, device, output folder) on stderr and into <run dir>/dfqbench.log; errors are one line on stderr
and, with their traceback, in that log file.
"""

from __future__ import annotations

import difflib
import functools
import logging
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import hydra_files, sweep
from .errors import ConfigError, UnsupportedModel
from .run_lock import RunInProgress
from .train.errors import TrainingDiverged

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("method", "model", "dataset", "quant", "schedule", "paths", "logger", "experiment")
_SWEEP_FUNCTIONS = ("range(", "glob(", "choice(", "interval(", "tag(", "sort(", "shuffle(")
DEFAULT_SCHEDULE = "cpu"
# the run's log file only (conf/hydra/job_logging/dfqbench.yaml): what the console already shows as one line
_logfile = logging.getLogger("dfqbench.logfile")


def schedule_tag(name: str | None) -> str:
    """Run-folder suffix of a training method's schedule (conf/config.yaml's hydra dirs): none for the default
    schedule, `-<name>` for any other, so that a cell run on two schedules keeps two records. Methods that do
    not train pass no name (their folders never change with `schedule=`)."""
    return "" if not name or name == DEFAULT_SCHEDULE else f"-{name}"


def precision_tag(name: str | None) -> str:
    """Run-folder suffix of the config's `precision`: none for fp32, `-<name>` for another (its numbers differ)."""
    return "" if not name or name == "fp32" else f"-{name}"


OmegaConf.register_new_resolver("dfq_schedule_tag", schedule_tag, replace=True)
OmegaConf.register_new_resolver("dfq_precision_tag", precision_tag, replace=True)
OmegaConf.register_new_resolver("dfq_hydra_subdir", hydra_files.output_subdir, replace=True)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _values(raw: str) -> list[str] | None:
    """The values of a command-line override, or None for sweep functions and interpolations.

    Commas always split: an experiment preset may switch to multirun without -m (`hydra.mode: MULTIRUN`)."""
    if raw.startswith(_SWEEP_FUNCTIONS) or "${" in raw:
        return None
    return [v.strip() for v in raw.split(",")]


def precheck(argv: list[str]) -> None:
    """One-line errors for the most common mistakes, before Hydra composes anything.

    Only dfqbench's own groups are checked; `hydra/launcher=...` and other `hydra.*` arguments are Hydra's."""
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
    check_keys(argv)


def check_keys(argv: list[str]) -> None:
    """A setting of a group's preset that the preset does not have (`method.iteratons=100`, `quant.fold_scope=...`
    where the preset leaves it at its default) is a one-line error naming the keys it has and, for a key that only
    some presets list, the `++` form that sets it either way; Hydra's own message is five lines about a struct.

    The config is composed once per value of the group the key belongs to (the other groups at their first
    value), without the settings themselves. Experiment presets choose their groups in the sweep's params, which
    composing does not see: with `experiment=` the check is left to Hydra."""
    args = [a for a in argv if not a.startswith("-") and "=" in a]
    settings = [a for a in args if a[0] not in "+~" and "." in a.split("=", 1)[0]
                and a.split(".", 1)[0] in GROUPS]
    if not settings or any(a.split("=", 1)[0] == "experiment" for a in args):
        return
    choices = {a.split("=", 1)[0]: (_values(a.split("=", 1)[1]) or [None]) for a in args
               if a.split("=", 1)[0] in GROUPS}
    for setting in settings:
        path = setting.split("=", 1)[0].split(".")
        for value in choices.get(path[0], [None]):
            picked = {g: (value if g == path[0] else vs[0]) for g, vs in choices.items()}
            cfg = _composed(tuple(f"{g}={v}" for g, v in picked.items() if v is not None))
            preset = f"{path[0]}={cfg.hydra.runtime.choices.get(path[0])}"
            node = OmegaConf.to_container(cfg[path[0]], resolve=False)  # a mandatory `???` value is a key too
            for depth, key in enumerate(path[1:], start=1):
                if not isinstance(node, dict) or key not in node:
                    where = ".".join(path[:depth])
                    keys = sorted(node) if isinstance(node, dict) else []
                    close = difflib.get_close_matches(key, keys, n=1)
                    hint = f"did you mean {where}.{close[0]}? " if close else ""
                    raise ConfigError(
                        f"{setting}: {preset} has no key {key!r} under {where}; {hint}its keys: {', '.join(keys)}"
                        f" (++{setting} sets a key whether the preset lists it or not)")
                node = node[key]


@functools.cache
def _composed(group_args: tuple[str, ...]) -> DictConfig:
    """The root config with these group choices and nothing else, and its `hydra` node (the choices made): Hydra's
    compose API, cleared afterwards."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        try:
            return compose(config_name="config", overrides=list(group_args), return_hydra_config=True)
        finally:
            GlobalHydra.instance().clear()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | dict | None:
    """One run. In a sweep it returns the job's outcome (dfqbench.sweep): a run that fails leaves its failed
    record and the other jobs go on. Bad input (ConfigError) is a one-line error and exit status 2: at once with
    the serial launcher, at the end of the sweep with the parallel ones (their other jobs are already out)."""
    from .method_overrides import apply_per_setting
    from .runner import build_method, run, summary  # torch loads here, after the argument checks

    if _interrupted:  # a library swallowed the KeyboardInterrupt (a finalizer, say): start no further job
        raise KeyboardInterrupt(_interrupted[0])
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    in_sweep = hc.mode == RunMode.MULTIRUN
    _logfile.info("command: python -m dfqbench %s", " ".join(hc.overrides.task))
    if cfg.get("tuning") is not None:  # experiment=tuning_robustness: the study's runs, one after another
        from .tuning import run_study
        try:
            outcomes = run_study(cfg, list(hc.overrides.task))
        except ConfigError as exc:
            _error(exc)
            sys.exit(2)
        if any(o.get("busy") for o in outcomes):
            sys.exit(1)  # some variants were left to the process computing them
        return None
    try:
        apply_per_setting(cfg, list(hc.overrides.task))  # the method's data-set/teacher/bit-width settings
        if in_sweep and cfg.get("skip_redundant"):
            reason = sweep.redundant_reason(cfg, build_method(cfg))
            if reason:
                print(f"dfqbench: not run ({reason}): {' '.join(hc.overrides.task)}",
                      file=sys.stderr)
                sweep.discard_job_dir(run_dir)
                return {"status": "redundant"}
        record = run(cfg, run_dir, overrides=list(hc.overrides.task))
    except ConfigError as exc:
        _error(exc)
        if in_sweep and hc.runtime.choices.get("hydra/launcher") != "basic":
            return {"status": "refused", "error": str(exc)}
        sys.exit(2)
    except RunInProgress as exc:  # another process computes this folder: nothing is written here
        _error(exc)
        if not in_sweep:
            sys.exit(1)
        return {"status": "busy", "error": str(exc), "run_dir": str(run_dir)}
    except (UnsupportedModel, TrainingDiverged) as exc:  # the run started; its record says "failed" with this
        _error(exc)
        if not in_sweep:
            sys.exit(1)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "run_dir": str(run_dir)}
    except Exception as exc:  # likewise, with a traceback; in a sweep the other jobs go on
        if _interrupted:  # the interrupt surfaced as another exception
            raise KeyboardInterrupt(_interrupted[0]) from exc
        _logfile.exception("the run failed: %s: %s", type(exc).__name__, exc)
        if not in_sweep:
            raise
        traceback.print_exc()
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "run_dir": str(run_dir)}
    text = summary(record, run_dir / "record.json")
    print(text)
    _logfile.info("%s", text)
    if in_sweep:
        return {"status": "skipped" if record.get("skipped") else "done", "top1": record.get("top1"),
                "run_dir": str(run_dir)}
    return record.get("top1")


def _error(exc: Exception) -> None:
    """One line on stderr; the run's log file gets it with its traceback (where it was raised)."""
    print(f"dfqbench: error: {exc}", file=sys.stderr)
    _logfile.error("error: %s", exc, exc_info=exc)


_interrupted: list[str] = []  # the signal's name once SIGTERM or SIGINT arrived


def _interrupt(signum, frame):
    _interrupted.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(_interrupted[0])


def main() -> None:
    try:
        precheck(sys.argv[1:])
    except ConfigError as exc:
        print(f"dfqbench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    # SIGTERM (kill, a job scheduler) stops like Ctrl-C: the launchers stop their workers, no record is half written.
    # The flag makes that hold even where a library turns the KeyboardInterrupt into another error or swallows it.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        hydra_main()
    except KeyboardInterrupt:
        _interrupted.append("SIGINT")
    except SystemExit:
        if not _interrupted:
            raise
    if _interrupted:
        print(f"dfqbench: interrupted ({_interrupted[0]}); run the same command again to finish: finished runs "
              f"are skipped", file=sys.stderr)
        sys.exit(130)
    if sweep.unfinished:  # a sweep in which some job failed, was refused or was busy: after its summary line
        sys.exit(2 if any(o["status"] == "refused" for o in sweep.unfinished) else 1)


if __name__ == "__main__":
    main()
