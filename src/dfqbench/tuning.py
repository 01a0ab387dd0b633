"""The tuning-robustness study (Chen et al., "An Empirical Study of Data-Free Quantization's Tuning Robustness",
CVPR Workshops 2022): how far each method's top-1 moves when its key hyper-parameters move around the paper's
values, i.e. how much a user must tune it.

    python -m dfqbench experiment=tuning_robustness [tuning.methods=[zeroq,kw]] [tuning.only=[NAME,...]]
                                                    [tuning.dry_run=true] [...]

conf/experiment/tuning_robustness.yaml lists, per method, its key settings and the values tried around the
paper's (the method yaml's default). One setting moves at a time, the others stay at the paper's values; every
variant and the default itself is one run (seed `tuning.seed`) on the preset's teacher, convention and bits,
named `<method>-tune_default` or `<method>-tune_<setting>_<value>`, its record under `<paths.output_dir>/tuning/`
(kept out of the baseline tables). Finished variants are skipped on a rerun (the runner's fingerprint check).
`make tables` writes `tuning.md` and `plots/tuning.png` from those records (dfqbench.results.tuning).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import ConfigError
from .run_lock import RunInProgress

log = logging.getLogger(__name__)
TUNING_DIR = "tuning"  # under paths.output_dir; dfqbench.results.entries leaves it out of the baseline tables


def _value_text(value) -> str:
    return str(value).replace(" ", "").replace("/", "_")


def variants(spec: dict, methods: list[str] | None = None) -> list[tuple[str, str, str | None, object]]:
    """(method, run name, setting or None for the default, value) for every run of the study, in spec order."""
    unknown = sorted(set(methods or ()) - set(spec))
    if unknown:
        raise ConfigError(f"tuning.methods: {unknown} not in the study; choose from: {', '.join(spec)}")
    out = []
    for method, settings in spec.items():
        if methods and method not in methods:
            continue
        if not isinstance(settings, dict) or not settings:
            raise ConfigError(f"tuning.grid.{method} must map settings to lists of values")
        out.append((method, f"{method}-tune_default", None, None))
        for setting, values in settings.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"tuning.grid.{method}.{setting} must be a non-empty list of values")
            for value in values:
                out.append((method, f"{method}-tune_{setting}_{_value_text(value)}", setting, value))
    return out


def variant_overrides(method: str, name: str, setting: str | None, value) -> list[str]:
    overrides = [f"method={method}", f"method.name={name}"]
    if setting is not None:
        overrides.append(f"++method.{setting}={_value_text(value) if not isinstance(value, str) else value}")
    return overrides


def run_study(cfg: DictConfig, base_overrides: list[str]) -> list[dict]:
    """Run (or skip, when finished) every variant of cfg.tuning; returns one summary dict per variant."""
    from hydra import compose

    from .runner import run, summary

    t = OmegaConf.to_container(cfg.tuning, resolve=True)
    plan = variants(t["grid"], t.get("methods"))
    only = t.get("only")
    if only:  # a rerun of some variants (say, the new values of a grid) that leaves the others' records alone
        unknown = sorted(set(only) - {name for _, name, _, _ in plan})
        if unknown:
            raise ConfigError(f"tuning.only: {unknown} are not variants of this study; choose from: "
                              f"{', '.join(name for _, name, _, _ in plan)}")
        plan = [v for v in plan if v[1] in only]
    keep = [o for o in base_overrides if not o.startswith(("method=", "method.", "tuning.", "seed="))]
    out_root = Path(str(cfg.paths.output_dir)) / TUNING_DIR
    results = []
    for method, name, setting, value in plan:
        overrides = [*keep, *variant_overrides(method, name, setting, value), f"seed={t['seed']}"]
        if t.get("dry_run"):
            print("dfqbench tuning: " + " ".join(overrides))
            continue
        job = compose(config_name="config", overrides=overrides)
        with open_dict(job):
            del job["tuning"]  # the study's grid is not the run's config: changing it must not re-run a variant
        run_dir = out_root / f"{job.model.name}-{job.dataset.name}" / str(job.quant.name) / name / \
            f"w{job.wbit}a{job.abit}-s{job.seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            record = run(job, run_dir, overrides=overrides)
        except ConfigError as exc:
            raise ConfigError(f"tuning variant {name}: {exc}") from None
        except RunInProgress as exc:  # another study (or a lane on the same results) runs it: the rest go on
            print(f"dfqbench tuning: busy: {exc}", file=sys.stderr)
            results.append({"method": method, "setting": setting, "value": value, "top1": None, "busy": True})
            continue
        print(summary(record, run_dir / "record.json"))
        results.append({"method": method, "setting": setting, "value": value, "top1": record.get("top1")})
    return results
