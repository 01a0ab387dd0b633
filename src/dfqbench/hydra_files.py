"""Keep a finished run folder's `.hydra` files those of the run its record.json holds.

Hydra writes a job's config.yaml, hydra.yaml and overrides.yaml before dfqbench can tell whether the job reuses a
finished record, so a sweep over finished runs (one that extends a table, a parity driver's `--dfqbench-in-sweeps`)
used to overwrite them with its own command. In a folder that already holds a record Hydra now writes them to
`.hydra-pending` (conf/config.yaml `hydra.output_subdir`, resolved by `output_subdir`); the runner then moves them
in when it computes the run again (`adopt`) and drops them when it reuses the record or refuses the input
(`drop`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

CURRENT, PENDING = ".hydra", ".hydra-pending"
RECORD_NAME = "record.json"  # records.RECORD_NAME, without importing records (and torch) at config time


def output_subdir(run_dir: str) -> str:
    """Where Hydra writes this job's files: PENDING in a folder that holds a record, else CURRENT."""
    return PENDING if (Path(run_dir) / RECORD_NAME).exists() else CURRENT


def adopt(run_dir: Path) -> None:
    """The run is computed again: its pending files become its files."""
    pending = run_dir / PENDING
    if pending.is_dir():
        shutil.rmtree(run_dir / CURRENT, ignore_errors=True)
        pending.rename(run_dir / CURRENT)


def drop(run_dir: Path) -> None:
    """Nothing is computed: the files of the record's own run stay."""
    shutil.rmtree(run_dir / PENDING, ignore_errors=True)
