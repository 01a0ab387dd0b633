"""Optional experiment loggers (`logger=none|wandb`): the local record.json is the result, a logger mirrors it.

`logger=wandb` logs a written record's numbers and its resolved config to Weights & Biases. wandb is an optional
extra (`pip install 'dfqbench[wandb]'`), imported only here and only when chosen. `logger.mode` follows wandb:
`disabled` (the default, from $WANDB_MODE when set), `offline` (a run folder under the run dir, no account or
network; `wandb sync` uploads it later) or `online` (needs `wandb login` or $WANDB_API_KEY).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .errors import ConfigError

_SUMMARY_TEXT = ("status", "error", "config_hash", "checkpoint_sha256", "git_commit")


def _name(cfg) -> str:
    logger = cfg.get("logger")
    return str(logger.get("name", "none")) if logger else "none"


def check_available(cfg) -> None:
    """Before any work: a one-line error when the chosen logger's package is missing."""
    if _name(cfg) == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb needs the wandb package: pip install 'dfqbench[wandb]' "
                          "(or use logger=none)")


def log_record(cfg, record: dict, run_dir: Path) -> None:
    """Mirror a record that is already on disk; a logging failure warns and never loses the result."""
    if _name(cfg) != "wandb":
        return
    try:
        _log_wandb(cfg.logger, record, run_dir)
    except Exception as exc:  # the network, the account, wandb itself: the local record stands
        print(f"dfqbench: warning: wandb logging failed ({type(exc).__name__}: {exc}); the record is in "
              f"{run_dir}", file=sys.stderr)


def _log_wandb(conf, record: dict, run_dir: Path) -> None:
    import wandb

    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    name = (f"{record['method']}-{record['model']}-{record['dataset']}-{record['quant']}-"
            f"w{record['wbit']}a{record['abit']}-s{record['seed']}")
    run = wandb.init(mode=conf.mode, project=conf.project, entity=conf.entity, group=conf.group,
                     tags=list(conf.tags or []) or None, name=name, job_type=record["method"],
                     dir=str(conf.dir or run_dir), config=record["config"], reinit="finish_previous",
                     settings=wandb.Settings(console="off", silent=True))
    try:
        run.log(scalars)
        run.summary.update({**scalars, **{k: str(record[k]) for k in _SUMMARY_TEXT if record.get(k)}})
    finally:
        run.finish()
