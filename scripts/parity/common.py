"""What every parity driver shares (scripts/parity/<method>.py): the dfqbench teacher and test set handed to an
official repository's code, the clone's identity, dfqbench runs of the same cell, the record and the
results/parity.csv row.

A driver runs an official repository from its own clone (`--official PATH`): nothing of it is copied here. What
must change to run it on a dfqbench teacher and test set is patched at run time, in the driver's child process,
and listed in the record ("patches").
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARITY_CSV = REPO / "results" / "parity.csv"
CSV_COLUMNS = ["method", "quant", "schedule", "wbit", "abit", "n_seeds", "official_top1_mean", "official_top1_std",
               "dfqbench_top1_mean", "dfqbench_top1_std", "official_s", "dfqbench_s", "official_repo",
               "official_commit", "note", "model", "dataset", "device", "dfqbench_diverged"]
_KEY = ("method", "quant", "schedule", "wbit", "abit", "model", "dataset", "device")


def python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


# --- the official clone ---------------------------------------------------------------------------------------

def clone_identity(path: Path, default_repo: str, marker: str) -> tuple[str, str]:
    """(owner/name, commit) of an official clone; `marker` is a file the repository must have."""
    path = Path(path).expanduser().resolve()
    if not (path / marker).is_file():
        raise SystemExit(f"--official {path}: no {marker} there; point it at a clone of {default_repo}")
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True,
                                text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    repo = default_repo
    try:
        url = subprocess.run(["git", "-C", str(path), "remote", "get-url", "origin"], check=True,
                             capture_output=True, text=True).stdout.strip()
        m = re.search(r"github\.com[:/]([^/]+)/([^/]+?)(?:\.git)?$", url) or re.search(r"([^/+]+)\+([^/]+)/repo$", url)
        if m:
            repo = f"{m.group(1)}/{m.group(2)}"
    except (OSError, subprocess.CalledProcessError):
        pass
    return repo, commit


# --- the dfqbench teacher and test set, for the official code -------------------------------------------------

def compose(overrides: list[str], with_hydra: bool = False):
    """dfqbench's composed config of these overrides (with hydra's own node when `with_hydra`)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from dfqbench.__main__ import CONF_DIR
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)


def teacher_overrides(a) -> list[str]:
    """The dfqbench overrides of a driver's teacher and test set (its --model, --dataset, --teacher, --max-samples)."""
    over = [f"model={a.model}", f"dataset={a.dataset}", *a.teacher]
    if a.max_samples:
        over.append(f"dataset.max_samples={a.max_samples}")
    return over


def teacher_and_data(overrides: list[str]):
    """(cfg, loaded model, EvalSet) exactly as a dfqbench run with these overrides loads them."""
    from dfqbench.data import load_eval_set
    from dfqbench.models import load_model, resolve_weights
    cfg = compose(overrides)
    weights = resolve_weights(cfg.model, cfg.paths.models_dir)
    loaded = load_model(cfg.model, cfg.paths.models_dir, weights)
    norm = cfg.model.normalize or cfg.dataset
    data = load_eval_set(cfg.dataset, norm.mean, norm.std, cfg.paths.cache_dir)
    return cfg, loaded, data


class EvalLoader:
    """A DataLoader stand-in over a dfqbench EvalSet: (normalized images, labels) batches, len() = batches."""

    def __init__(self, data, batch_size: int, device="cpu", channels_last: bool = False):
        self.data, self.batch_size, self.device, self.channels_last = data, batch_size, device, channels_last

    def __len__(self) -> int:
        return math.ceil(self.data.num_samples / self.batch_size)

    def __iter__(self):
        for x, y in self.data.batches(self.batch_size, self.device):
            yield (x if self.channels_last else x.contiguous()), y


def cpu_only_cuda_calls(device) -> None:
    """Without a GPU, the official code's .cuda() calls move to `device` (cpu) instead."""
    import torch
    torch.Tensor.cuda = lambda self, *a, **k: self.to(device)
    torch.nn.Module.cuda = lambda self, *a, **k: self.to(device)


# --- dfqbench runs of the same cell ---------------------------------------------------------------------------

DIVERGED = "TrainingDiverged"  # a failed dfqbench record's error when its training diverged


def diverged(record: dict) -> bool:
    return record.get("status") == "failed" and str(record.get("error", "")).startswith(DIVERGED)


SWEEPS_OUTPUT = "results"  # paths.output_dir of the tables' sweeps (results/sweeps/<subdir>/record.json)


def sweep_record_path(overrides: list[str]) -> Path:
    """Where `python -m dfqbench -m <overrides> paths.output_dir=results` keeps its record: hydra's sweep dir and
    subdir of the composed config (conf/config.yaml), under the repository."""
    cfg = compose([*overrides, f"paths.output_dir={SWEEPS_OUTPUT}"], with_hydra=True)
    return REPO / str(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir) / "record.json"


def run_dfqbench(overrides: list[str], dest: Path, log: Path, allow_diverged: bool = False,
                 in_sweeps: bool = False) -> dict:
    """`python -m dfqbench <overrides>` (force=true) in a scratch run folder; its record is kept as
    `<dest>.record.json` (not record.json: `make tables` does not count these runs twice beside the sweeps';
    results/parity.csv holds their summary), its output appended to `log`. With `in_sweeps` the run is instead the
    tables' own sweep job of the same overrides (`-m`, paths.output_dir=results, no force): a finished one with the
    same run fingerprint is reused by the runner, not computed again, and its record is copied to
    `<dest>.record.json`. With `allow_diverged` a run whose training diverged returns its failed record (a result
    at that budget); any other failure stops."""
    import shutil
    import tempfile
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="parity-dfqbench-") as tmp:
        if in_sweeps:
            path = sweep_record_path(overrides)
            cmd = [python(), "-m", "dfqbench", "-m", *overrides, f"paths.output_dir={SWEEPS_OUTPUT}", "progress=false"]
        else:
            path = Path(tmp) / "record.json"
            cmd = [python(), "-m", "dfqbench", *overrides, f"hydra.run.dir={tmp}", "force=true", "progress=false"]
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        record = json.loads(path.read_text()) if path.exists() else {}
        if proc.returncode != 0 and not (allow_diverged and diverged(record)):
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        shutil.copy(path, dest.with_name(dest.name + ".record.json"))
    return record


def kept_record(kept: Path, label: str) -> dict | None:
    """A kept dfqbench record of a parity cell (`dfqbench-<quant>-s<S>.record.json`), or None when there is none or
    another dfqbench source wrote it (its fingerprint's code digest, records.code_digest): as in the sweeps, a run
    of other code is run again, never reused."""
    if not kept.exists():
        return None
    from dfqbench.records import code_digest
    r = json.loads(kept.read_text())
    code, now = (r.get("fingerprint") or {}).get("code"), code_digest()
    if code != now:
        print(f"{label}: {rel(kept)} was written by another dfqbench source (code {code}, now {now}): running it "
              "again", flush=True)
        return None
    return r


def dfqbench_side(cell: Path, quant: str, seeds, resume: bool, overrides, label: str,
                  accept=lambda record, seed: True, allow_diverged: bool = False, variant: str = "",
                  in_sweeps: bool = False) -> list[dict]:
    """dfqbench's runs of a parity cell, one per seed (`overrides(seed)`): a kept record is reused with --resume
    when `accept` says it ran the cell's settings; a new run that does not is an error. Returns the records;
    with `allow_diverged` a seed whose training diverged is its failed record (no top1). A `variant` (dfqbench
    run with other settings beside the same official seeds) keeps its records as dfqbench-<quant>-<variant>-s<S>.
    `in_sweeps`: each run is the tables' sweep job of the same overrides (run_dfqbench). A kept record written
    by another dfqbench source is run again (kept_record)."""
    ours = []
    for seed in seeds:
        dest = cell / f"dfqbench-{quant}{'-' + variant if variant else ''}-s{seed}"
        kept = dest.with_name(dest.name + ".record.json")
        r = kept_record(kept, f"dfqbench {label} seed {seed}") if resume else None
        if r is not None:
            if accept(r, seed) and (allow_diverged or not diverged(r)):
                ours.append(r)
                print(f"dfqbench {label} seed {seed}: reusing {rel(kept)} ({_outcome(r)})", flush=True)
                continue
        r = run_dfqbench(overrides(seed), dest, cell / "dfqbench.log.txt", allow_diverged, in_sweeps)
        if not accept(r, seed):
            raise SystemExit(f"the dfqbench run of seed {seed} did not run the cell's settings (see {rel(dest)})")
        ours.append(r)
        print(f"dfqbench {label} seed {seed}: {_outcome(r)}", flush=True)
    return ours


def _outcome(record: dict) -> str:
    if diverged(record):
        return "training diverged: " + record["error"].split("training diverged: ", 1)[-1].split(";", 1)[0]
    secs = record.get("quantize_time_s")
    return f"top-1 {record['top1']:.2f}" + (f", quantize {secs:.0f} s" if secs is not None else "")


# --- the child process that runs the official code ------------------------------------------------------------

def run_child(script: Path, args: list[str], log: Path, env: dict | None = None, append: bool = False) -> dict:
    """Run `script --child <args>` in a fresh process (the official code keeps global state: one run per
    process). Its stdout and stderr stream into `log` as it runs (a killed run keeps its log; `append` keeps the
    earlier attempts', each after its own command line); its last stdout line is a JSON result."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python(), str(script), "--child", *args]
    t0 = time.perf_counter()
    with open(log, "a" if append else "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"official run failed (exit {proc.returncode}); see {log}")
    last = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if not last:
        raise SystemExit(f"the official run printed no JSON result; see {log}")
    result = json.loads(last[-1])
    result["process_s"] = round(time.perf_counter() - t0, 3)
    return result


# --- records and results/parity.csv ---------------------------------------------------------------------------

def official_runs(cell: Path, a, label: str, commit: str, wbit: int, abit: int, run_seed,
                  same: dict | None = None) -> tuple[list[dict], bool]:
    """The official side's runs of a post-training cell, one per seed of `a.seeds` (`run_seed(seed)` -> the
    child's result; the seed is added). With --reuse-official an earlier <cell>/official.json of the same commit,
    teacher and `same` fields (the driver's settings, e.g. its flags) gives the seeds it holds: all of them ->
    (its runs, True), the file stays as it is; some -> those are kept and the others run."""
    earlier = {}
    path = cell / "official.json"
    if getattr(a, "reuse_official", False) and path.exists():
        prev = json.loads(path.read_text())
        if prev.get("official_commit") == commit and prev.get("teacher_overrides") == teacher_overrides(a) and all(
                prev.get(k) == v for k, v in (same or {}).items()):
            if prev.get("seeds") == list(a.seeds):
                print(f"official {label} W{wbit}A{abit}: reusing {rel(path)}", flush=True)
                return prev["runs"], True
            earlier = {r["seed"]: r for r in prev["runs"]}
    runs = []
    for seed in a.seeds:
        if seed in earlier:
            runs.append(earlier[seed])
            print(f"official {label} W{wbit}A{abit} seed {seed}: reusing top-1 {earlier[seed]['top1']:.2f}",
                  flush=True)
            continue
        r = run_seed(seed)
        r["seed"] = seed
        runs.append(r)
    return runs, False


def official_summary(cell: Path, a, method: str, label: str, repo: str, commit: str, wbit: int, abit: int,
                     runs: list[dict], reused: bool, seconds: str = "quantize_s",
                     seconds_field: str = "quantize_s_mean", **extra) -> tuple[tuple, tuple]:
    """Top-1 and seconds (each run's `seconds`) mean/std over the official runs of a post-training cell, kept as
    <cell>/official.json with `extra` fields (unless the runs were `reused` from it) and printed. Returns
    ((top-1 mean, std), (seconds mean, std))."""
    top1 = mean_std([r["top1"] for r in runs])
    secs = mean_std([r[seconds] for r in runs if r.get(seconds) is not None])
    first = runs[0]
    if not reused:
        write_json(cell / "official.json", {
            "method": method, "official_repo": repo, "official_commit": commit, "wbit": wbit, "abit": abit,
            "seeds": list(a.seeds), "top1_mean": round(top1[0], 4), "top1_std": round(top1[1], 4),
            seconds_field: round(secs[0], 4), "runs": runs, "model": first["model"], "dataset": first["dataset"],
            "n_test": first["n_test"], "device": first["device"], "teacher_overrides": teacher_overrides(a),
            **extra, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    print(f"official {label} W{wbit}A{abit}: top-1 {top1[0]:.2f} +- {top1[1]:.2f} over seeds {list(a.seeds)}, "
          f"{seconds} {secs[0]:.2f} s ({repo}@{commit[:10]})", flush=True)
    return top1, secs


def batch_check_summary(runs: list[dict]) -> dict:
    """The mean/std of the children's check "dfqbench on the official batch" (ZeroQ, DSG), when every run has it."""
    if not runs or not all("check" in r for r in runs):
        return {}
    chk = mean_std([r["check"]["dfqbench_on_official_batch_top1"] for r in runs])
    return {"dfqbench_on_official_batch_top1_mean": round(chk[0], 4),
            "dfqbench_on_official_batch_top1_std": round(chk[1], 4)}


def same_overrides(overrides):
    """A dfqbench_side `accept`: a kept record ran exactly `overrides(seed)` (run_dfqbench's own two aside)."""
    return lambda record, seed: [o for o in record.get("overrides", [])
                                 if o not in ("force=true", "progress=false")] == overrides(seed)


def post_training_side(cell: Path, quant: str, seeds, resume: bool, overrides, label: str,
                       accept=lambda record, seed: True) -> tuple[tuple, int]:
    """dfqbench's seeds of a post-training cell (dfqbench_side), printed: ((top-1 mean, std), (seconds mean,
    std) of the runs that made their calibration images), and how many those are (a run whose images came from
    dfqbench's calibration cache took ~0 s for them)."""
    ours = dfqbench_side(cell, quant, seeds, resume, overrides, label, accept)
    top1 = mean_std([r["top1"] for r in ours])
    fresh = [r for r in ours if not (r.get("info") or {}).get("calib_cached")]
    secs, n_fresh = mean_std([r["quantize_time_s"] for r in fresh]), len(fresh)
    print(f"dfqbench {label}: top-1 {top1[0]:.2f} +- {top1[1]:.2f}, "
          + (f"quantize {secs[0]:.1f} s" if n_fresh else "images from dfqbench's calibration cache (no seconds)"),
          flush=True)
    return (top1, secs), n_fresh


def write_row(csv_path, *, method: str, quant: str, wbit: int, abit: int, n_seeds: int, official: tuple,
              dfqbench: tuple, repo: str, commit: str, note: str, run: dict, schedule: str = "") -> None:
    """The results/parity.csv row of a cell: `official` / `dfqbench` = ((top-1 mean, std), (seconds mean, std));
    model, dataset and device from an official `run`."""
    (top1, secs), (d_top1, d_secs) = official, dfqbench
    upsert_parity_row({
        "method": method, "quant": quant, "schedule": schedule, "wbit": wbit, "abit": abit, "n_seeds": n_seeds,
        "official_top1_mean": fmt(top1[0]), "official_top1_std": fmt(top1[1]), "dfqbench_top1_mean": fmt(d_top1[0]),
        "dfqbench_top1_std": fmt(d_top1[1]), "official_s": fmt(secs[0]), "dfqbench_s": fmt(d_secs[0]),
        "official_repo": repo, "official_commit": commit, "note": note, "model": run["model"],
        "dataset": run["dataset"], "device": run["device"]}, Path(csv_path))


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def upsert_parity_row(row: dict, path: Path = PARITY_CSV) -> None:
    """Add or replace the row with the same (method, quant, schedule, wbit, abit, model, dataset, device).
    Drivers may run at once: the read-modify-write holds an exclusive lock on `<path>.lock`."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".csv.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _upsert_locked({c: row.get(c, "") for c in CSV_COLUMNS}, path)


def _upsert_locked(row: dict, path: Path) -> None:
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    key = tuple(str(row[k]) for k in _KEY)
    same = [i for i, r in enumerate(rows) if tuple(str(r.get(k, "")) for k in _KEY) == key]
    if same:  # in place: the rows keep their order (and their line numbers in results/parity.md)
        rows[same[0]] = row
        rows = [r for i, r in enumerate(rows) if i not in same[1:]]
    else:
        rows.append(row)
    columns = CSV_COLUMNS + [c for r in rows for c in r if c not in CSV_COLUMNS]
    columns = list(dict.fromkeys(columns))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")  # as committed: LF
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    tmp.replace(path)


def rel(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def fmt(v: float, digits: int = 2) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


SHARED_DEPS = "/tmp/parity-deps"  # packages every official clone needs beyond dfqbench's (progress, tensorboardX, scipy)


def deps_env(*dirs: str) -> dict:
    """The child's environment additions: `dirs` and SHARED_DEPS put before the inherited PYTHONPATH."""
    return {"PYTHONPATH": os.pathsep.join([*dirs, SHARED_DEPS, os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)}


def child_args(a, seed: int, wbit: int | None = None, abit: int | None = None) -> list[str]:
    """What every driver passes its child process: the clone, the teacher and test set, the seed, the threads and
    (when given) the bits; each driver adds its own."""
    args = ["--official", str(Path(a.official).resolve()), "--model", a.model, "--dataset", a.dataset,
            "--seed", str(seed), "--threads", str(a.threads)]
    args += ["--wbit", str(wbit), "--abit", str(abit)] if wbit is not None else []
    args += ["--teacher", *a.teacher] if a.teacher else []
    args += ["--max-samples", str(a.max_samples)] if a.max_samples else []
    return args


def add_child_arguments(p, bits: int | None = None, scratch: bool = False) -> None:
    """The hidden arguments of a driver's child mode (one official run in its own process): --seed, with `bits`
    the default --wbit/--abit, with `scratch` a scratch folder."""
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    if bits is not None:
        p.add_argument("--wbit", type=int, default=bits, help=argparse.SUPPRESS)
        p.add_argument("--abit", type=int, default=bits, help=argparse.SUPPRESS)
    if scratch:
        p.add_argument("--scratch", default="", help=argparse.SUPPRESS)


def add_teacher_arguments(p, model: str = "resnet20_cifar10", teacher_help: str = "") -> None:
    """The teacher and test set both sides run on: --model, --dataset, more dfqbench --teacher overrides,
    --max-samples (a smoke-test subset)."""
    p.add_argument("--model", default=model)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--teacher", nargs="*", default=[],
                   help="more dfqbench overrides for the teacher" + (f" ({teacher_help})" if teacher_help else ""))
    p.add_argument("--max-samples", type=int, default=None, help="dataset.max_samples (default: full test set)")


def add_output_arguments(p, out: Path, reuse_official: bool = True) -> None:
    """Where a calibration driver's cells go (--out, --tag) and its parity.csv row (--csv); with `reuse_official`
    --reuse-official (a kept official.json of the same seeds and commit stands for the official side)."""
    p.add_argument("--out", default=str(out), help=f"records folder (default {rel(out)})")
    p.add_argument("--tag", default="", help="a name for this teacher's folder under --out (default: none)")
    p.add_argument("--csv", default=str(PARITY_CSV), help="the parity table to update (--dfqbench)")
    if reuse_official:
        p.add_argument("--reuse-official", action="store_true",
                       help="take the official side from an existing official.json with the same seeds and commit")


def add_cell_arguments(p, method: str, quant_help: str, overrides_help: str, variant: str) -> None:
    """The arguments every training-method driver shares after its budget and its own knob: the teacher and test
    set, threads/device, the dfqbench side, where records go, which seeds, --resume, and the child's hidden ones.
    `variant` names what else a kept official run must match under --resume (e.g. "lr", "alpha")."""
    add_teacher_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--dfqbench", action="store_true", help="also run dfqbench on the same cell, write parity.csv")
    p.add_argument("--dfqbench-in-sweeps", action="store_true",
                   help="the dfqbench side is the tables' own sweep job of the cell (python -m dfqbench -m ... "
                        "paths.output_dir=results): a finished one is reused, not computed again; its record is "
                        "copied into the cell")
    p.add_argument("--quant", default="gdfq", help=quant_help)
    p.add_argument("--method-overrides", nargs="*", default=[], help=overrides_help)
    p.add_argument("--out", default="", help=f"records folder (default results/parity/{method})")
    p.add_argument("--tag", default="", help="a sub-folder of the cell and a variant of the csv row's method")
    p.add_argument("--csv", default=str(PARITY_CSV))
    p.add_argument("--official-seeds", type=int, nargs="*", default=None, help="official seeds (default --seeds)")
    p.add_argument("--dfqbench-seeds", type=int, nargs="*", default=None, help="dfqbench seeds (default --seeds)")
    p.add_argument("--resume", action="store_true",
                   help=f"keep finished seeds: official-s<S>.json (same code, schedule, bits, {variant}) and "
                        "dfqbench-<quant>-s<S>.record.json (same schedule and bits, same dfqbench source)")
    add_child_arguments(p, scratch=True)
