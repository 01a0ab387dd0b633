"""Sweeps (Hydra multirun): each job's outcome, the redundant cells of a preset's product, the closing summary.

Every launcher (basic, joblib, submitit local or SLURM) calls Hydra's `run_job` in the process that does the
work, and `run_job` calls the callbacks' `on_job_end` there: `SweepSummary` writes the job's outcome to
`<sweep dir>/.dfqbench-outcomes/<sweep id>/<job number>.json` (a filesystem the launcher already shares), and
`on_multirun_end`, in the process that started the sweep, prints one summary line and removes that folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback

from . import hydra_files, records

OUTCOMES_DIR = ".dfqbench-outcomes"
# refused: bad input (ConfigError), no record; busy: another process was computing the run folder (run_lock)
STATUSES = ("done", "skipped", "redundant", "failed", "refused", "busy")
UNFINISHED = ("failed", "refused", "busy")
unfinished: list[dict] = []  # failed, refused and busy jobs, set in the launching process at the end of a sweep


def redundant_reason(cfg, method) -> str | None:
    """Why this cell of a preset's product is not run: it would repeat another cell's computation, or the method
    cannot run under the cell's convention (None: it is run)."""
    if not method.quantizes and (cfg.wbit, cfg.abit) != (32, 32):
        return f"{method.name} is the float teacher, recorded once as W32A32"
    if method.quantizes and (cfg.wbit, cfg.abit) == (32, 32):
        return "W32A32 is the fp32 cell"
    pairs = cfg.get("bit_pairs")
    if method.quantizes and pairs and f"W{cfg.wbit}A{cfg.abit}" not in [str(p).upper() for p in pairs]:
        return f"W{cfg.wbit}A{cfg.abit} is not one of the preset's bit_pairs {list(pairs)}"
    if not method.stochastic and cfg.seed != 0:
        return f"{method.name} is deterministic: seed 0 stands for every seed"
    from .runner import build_convention  # torch: loaded only when a sweep job runs

    convention = build_convention(cfg, method, check_method=False)  # bad input: ConfigError, the job is refused
    try:
        method.check_convention(convention)
    except ValueError as exc:
        return f"not applicable: {str(exc).splitlines()[0]}"
    return None


def discard_job_dir(run_dir: Path) -> None:
    """Remove the folder Hydra made for a job that ran nothing, if it holds only Hydra's own files."""
    entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
    if all(p.name in (hydra_files.CURRENT, hydra_files.PENDING) or p.suffix == ".log" for p in entries):
        shutil.rmtree(run_dir, ignore_errors=True)


class SweepSummary(Callback):
    """Configured in conf/config.yaml (`hydra.callbacks.sweep_summary`); does nothing for single runs."""

    def __init__(self) -> None:
        self.outcome_dir: str | None = None

    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_id = f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
        self.outcome_dir = str(Path(str(config.hydra.sweep.dir)).resolve() / OUTCOMES_DIR / sweep_id)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if self.outcome_dir is None:
            return
        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
            outcome = dict(job_return.return_value)
        elif job_return.status == JobStatus.COMPLETED:
            outcome = {"status": "done"}
        else:  # an exception the task function did not turn into a failed outcome
            exc = job_return._return_value
            outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        outcome["overrides"] = list(job_return.overrides or [])
        records.write_json_atomic(Path(self.outcome_dir) / f"{config.hydra.job.num}.json", outcome)

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.outcome_dir is None:
            return
        folder = Path(self.outcome_dir)
        paths = sorted(folder.glob("*.json"), key=lambda path: int(path.stem))
        outcomes = [o for o in map(records.read_record, paths) if o]
        counts = {s: sum(o.get("status") == s for o in outcomes) for s in STATUSES}
        unfinished[:] = [o for o in outcomes if o.get("status") in UNFINISHED]
        print(f"dfqbench: sweep finished: {len(outcomes)} jobs: {counts['done']} computed, {counts['skipped']} "
              f"skipped (finished before), {counts['redundant']} redundant, {counts['failed']} failed, "
              f"{counts['refused']} refused (bad input), {counts['busy']} busy (another process computes them) -> {Path(str(config.hydra.sweep.dir)).resolve()}",
              flush=True)
        for o in unfinished:
            print(f"dfqbench: {o['status']}: {' '.join(o['overrides'])}: {o.get('error')}", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()  # only when no other sweep is writing there
        except OSError:
            pass
