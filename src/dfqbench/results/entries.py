"""The results model: one row ("entry") per number a table shows, whatever its source.

    source      reproduced (a dfqbench run here) | reported (a paper's table) | official (official code run here)
    method, variant, config    e.g. qimera, ait, qimera_ait (config: the dfqbench `method=`; "" for a paper row)
    convention  the `quant` preset ("" for a paper row: the paper's own)
    schedule    the training schedule ("" for post-training methods and paper rows)
    device      cpu | cuda ("" where the source does not say)
    n_seeds     seeds the mean is over (NaN where the paper does not say)
    deterministic   a dfqbench run whose method takes no seed (Method.stochastic false): one run stands for every
                seed, so its cell has no std (False for the other sources)
    fp32_top1, top1_mean, top1_std, drop_mean, drop_std   top-1 (%) and FP32 minus top-1, over the seeds
    paper, table, notes        for a paper row: the paper, the table it comes from, its note
    records     where the number is: record.json paths (";"-separated), or "<csv file>:<line>"
    fidelity    for a dfqbench run, where its method's settings come from (dfqbench.methods.base.FIDELITIES):
                reproduction, unofficial-code or reconstruction (abstract only); "" for the other sources

Reproduced entries group finished runs by every field above but the numbers, so CPU and CUDA runs, conventions,
schedules and test-set sizes never share a mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .. import records
from ..reported import COLUMNS as REPORTED_COLUMNS
from .names import split_reported, split_run_method

RUN_COLUMNS = ["model", "dataset", "method", "variant", "config", "quant", "schedule", "device", "wbit", "abit",
               "seed", "fp32_top1", "top1", "top5", "drop", "n_test", "checkpoint_sha256", "config_hash",
               "wall_time_s", "quantize_time_s", "git_commit", "record", "fidelity", "mixed_precision", "stochastic"]
ENTRY_COLUMNS = ["source", "model", "dataset", "family", "method", "variant", "config", "convention", "schedule",
                 "device", "wbit", "abit", "mixed_precision", "n_test", "n_seeds", "deterministic", "fp32_top1",
                 "top1_mean", "top1_std", "drop_mean", "drop_std", "wall_s", "quantize_s", "paper", "table", "notes",
                 "records", "fidelity"]
_GROUP = ["model", "dataset", "method", "variant", "config", "quant", "schedule", "device", "wbit", "abit",
          "n_test", "fidelity"]
REPORTED_FILES = ("reported.csv", "reported_extra.csv")
PARITY_FILE = "parity.csv"
PARITY_COLUMNS = ["method", "quant", "schedule", "wbit", "abit", "n_seeds", "official_top1_mean",
                  "official_top1_std", "dfqbench_top1_mean", "dfqbench_top1_std", "official_s", "dfqbench_s",
                  "official_repo", "official_commit", "note"]


def collapsed(top1, fp32):
    """A run (or mean) collapsed: its top-1 is below half its teacher's FP32 top-1 (elementwise on arrays)."""
    return np.asarray(top1, dtype=float) < np.asarray(fp32, dtype=float) / 2


def table_keys(rows: pd.DataFrame) -> list[tuple[str, str, float]]:
    """The (convention, schedule, n_test) tables of one teacher's reproduced entries, in reading order: the full
    test set first, post-training before training, then the conventions with the most methods."""
    keys = []
    for (conv, sched, n_test), g in rows.groupby(["convention", "schedule", "n_test"], sort=False):
        keys.append(((-n_test, sched != "", -len(set(zip(g.method, g.variant))), conv, sched), (conv, sched, n_test)))
    return [k for _, k in sorted(keys)]


def teachers_most_run_first(entries: pd.DataFrame) -> list[tuple[str, str]]:
    """Every (model, dataset) of `entries`, those with our cells first, the one with the most cells leading (the
    shared teacher heads a page, not the alphabet's first), ties by name."""
    keys = entries[entries.model != ""][["model", "dataset"]].drop_duplicates()
    ours = entries[entries.source == "reproduced"].groupby(["model", "dataset"]).size()
    return sorted(map(tuple, keys.values.tolist()), key=lambda md: (-int(ours.get(md, 0)), md))


def schedule_label(record: dict) -> str:
    """The training schedule of a training method's run ("" for the others), and the best-epoch-on-test label."""
    info = record.get("info") or {}
    label = str(info.get("schedule") or "")
    if info.get("best_epoch_on_test"):
        label += " (best epoch on TEST)"
    return label


SUPERSEDED = "superseded"  # <root>/superseded/...: records kept for the record, made by code since fixed
TUNING = "tuning"  # <root>/tuning/...: the tuning-robustness study's variants (dfqbench.tuning), a table of their own


def _records(root: Path, leave_out: tuple[str, ...]):
    """(path, record) of every readable record.json under root, in path order, outside the `leave_out` folders."""
    for path in sorted(Path(root).rglob("record.json")):
        if set(leave_out) & set(path.relative_to(root).parts):
            continue
        try:
            yield path, json.loads(path.read_text())
        except (OSError, ValueError):
            continue


def finished_records(root: Path, leave_out: tuple[str, ...] = (SUPERSEDED, TUNING)):
    """(path, record) of every finished record.json under root, in path order; `superseded/` and `tuning/`
    folders left out (unless `leave_out` says otherwise)."""
    return ((p, r) for p, r in _records(root, leave_out) if r.get("status") == "done")


DIVERGED = "TrainingDiverged"  # a failed record's error when its training diverged (dfqbench.train.errors)


def diverged_records(root: Path, leave_out: tuple[str, ...] = (SUPERSEDED, TUNING)):
    """(path, record) of every failed record.json under root whose training diverged: a result (the recipe is
    unstable at that budget), not a missing run; other failures are left out."""
    return ((p, r) for p, r in _records(root, leave_out)
            if r.get("status") == "failed" and str(r.get("error", "")).startswith(DIVERGED))


def collect_diverged(roots: list[Path]) -> pd.DataFrame:
    """One row per diverged run under the roots (tuning/ and superseded/ left out): the cell, seed, error."""
    rows = []
    for root in roots:
        for path, record in diverged_records(root):
            method, variant = split_run_method(str(record.get("method")))
            rows.append({**{k: record.get(k) for k in ("model", "dataset", "quant", "wbit", "abit", "seed")},
                         "method": method, "variant": variant,
                         "schedule": str(((record.get("config") or {}).get("schedule") or {}).get("name") or ""),
                         "device": str(record.get("device") or ""), "error": str(record.get("error")),
                         "record": str(path)})
    return pd.DataFrame(rows, columns=["model", "dataset", "method", "variant", "quant", "schedule", "wbit",
                                       "abit", "seed", "device", "error", "record"])


def collect_runs(roots: list[Path]) -> pd.DataFrame:
    """Every finished record.json under the roots, one row per run (a config computed twice, e.g. in two sweep
    roots, counts once per device); records under a `superseded/` folder are left out."""
    rows = []
    for root in roots:
        for path, record in finished_records(root):
            method, variant = split_run_method(str(record.get("method")))
            rows.append({**{k: record.get(k) for k in RUN_COLUMNS}, "method": method, "variant": variant,
                         "config": record.get("method"), "schedule": schedule_label(record),
                         "device": str(record.get("device") or ""), "record": str(path),
                         "fidelity": record.get("fidelity") or "reproduction",
                         "mixed_precision": bool((record.get("info") or {}).get("mixed_precision")),
                         "stochastic": bool(record.get("stochastic", True))})  # unknown: assume it takes a seed
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    return df.drop_duplicates(subset=["config_hash", "checkpoint_sha256", "n_test", "device"], keep="last")


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True, default=str)
    return out


def _settings(record_path: str) -> dict[str, str]:
    """A record's hashed config (records.hashed_config) without its seed, flattened to dotted keys."""
    config = records.hashed_config(json.loads(Path(record_path).read_text()).get("config") or {})
    return _flat({k: v for k, v in config.items() if k != "seed"})


def mixed_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """The cells of `reproduced` (one mean over seeds each) whose records ran with different settings, and the
    config keys whose values differ between them: a run with non-default method settings under the default
    method name would otherwise be averaged into the method's cell unseen (name a variant method.name=m-<v>)."""
    rows = []
    for key, g in runs.groupby(_GROUP, dropna=False, sort=True):
        if len(g) < 2:
            continue
        flats = [_settings(p) for p in g.record]
        differ = sorted(k for k in set().union(*flats) if len({f.get(k) for f in flats}) > 1)
        if differ:
            rows.append({**dict(zip(_GROUP, key)), "keys": differ, "records": sorted(g.record)})
    return pd.DataFrame(rows, columns=[*_GROUP, "keys", "records"])


def reproduced(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of every (teacher, method, variant, convention, schedule, device, bits, n_test)."""
    if runs.empty:
        return pd.DataFrame(columns=ENTRY_COLUMNS)
    g = runs.groupby(_GROUP, dropna=False, sort=True)
    out = g.agg(n_seeds=("seed", "nunique"), fp32_top1=("fp32_top1", "mean"), top1_mean=("top1", "mean"),
                top1_std=("top1", "std"), drop_mean=("drop", "mean"), drop_std=("drop", "std"),
                wall_s=("wall_time_s", "mean"), quantize_s=("quantize_time_s", "mean"),
                records=("record", lambda r: ";".join(sorted(r))),
                mixed_precision=("mixed_precision", "any"),
                deterministic=("stochastic", lambda s: not s.astype(bool).any())).reset_index()
    out = out.rename(columns={"quant": "convention"})
    out["source"] = "reproduced"
    out["family"] = out.schedule.map(lambda s: "training" if s else "post-training")
    for col in ("paper", "table", "notes"):
        out[col] = ""
    return out[ENTRY_COLUMNS]


def load_reported_rows(reference: Path) -> pd.DataFrame:
    """reported.csv and reported_extra.csv as they are, with the file and line each row comes from."""
    frames = []
    for name in REPORTED_FILES:
        path = Path(reference) / name
        if path.exists():
            df = pd.read_csv(path, keep_default_na=False)
            frames.append(df.assign(file=name, line=range(2, len(df) + 2)))
    if not frames:
        return pd.DataFrame(columns=REPORTED_COLUMNS + ["file", "line"])
    df = pd.concat(frames, ignore_index=True)
    return df.astype({"wbit": int, "abit": int, "fp32_top1": float, "top1": float})


def _paper_notes(row) -> str:
    mixed = str(row.mixed_precision) in ("True", "true", "1")
    return "; ".join(x for x in ("mixed precision" if mixed else "", str(row.notes)) if x)


def reported(rows: pd.DataFrame) -> pd.DataFrame:
    """The papers' numbers as entries. A cell (teacher, method, variant, bits) that a paper gives twice without a
    note saying which is which (the seed's CIFAR-10 ACQ rows) is flagged in the notes rather than guessed."""
    if rows.empty:
        return pd.DataFrame(columns=ENTRY_COLUMNS)
    out = pd.DataFrame({"source": "reported", "model": rows.model, "dataset": rows.dataset, "family": "",
                        "config": "", "convention": "", "schedule": "", "device": "", "wbit": rows.wbit,
                        "abit": rows.abit, "mixed_precision": rows.mixed_precision.astype(str).isin(["True", "true"]),
                        "n_test": float("nan"), "n_seeds": float("nan"), "deterministic": False,
                        "fp32_top1": rows.fp32_top1,
                        "top1_mean": rows.top1, "top1_std": float("nan"), "drop_mean": rows.fp32_top1 - rows.top1,
                        "drop_std": float("nan"), "wall_s": float("nan"), "quantize_s": float("nan"),
                        "paper": rows.method_label + " (" + rows.venue + ")",
                        "table": [_table(r) for r in rows.itertuples()],
                        "notes": [_paper_notes(r) for r in rows.itertuples()],
                        "records": rows.file + ":" + rows.line.astype(str), "fidelity": ""})
    split = [split_reported(m, n) for m, n in zip(rows.method, rows.notes)]
    out.insert(4, "method", [m for m, _ in split])
    out.insert(5, "variant", [v for _, v in split])
    out = _merge_repeats(out)
    cell = ["model", "dataset", "method", "variant", "wbit", "abit", "paper"]
    blank = out[out.notes == ""]
    unnamed = blank.index[blank.duplicated(cell, keep=False)]
    counts = blank.loc[unnamed].groupby(cell).records.transform("size")
    out.loc[unnamed, "notes"] = [f"one of {n} rows this paper gives for this cell with no note: which one is a "
                                 f"variant is not stated" for n in counts]
    return out[ENTRY_COLUMNS]


def _merge_repeats(out: pd.DataFrame) -> pd.DataFrame:
    """One entry for a number both CSVs give (reported_extra.csv repeats some seed rows under their own method
    name): the same teacher, method, variant, bits and FP32 / top-1; tables, notes and rows joined."""
    same = ["model", "dataset", "method", "variant", "wbit", "abit", "mixed_precision", "fp32_top1", "top1_mean"]
    if not out.duplicated(same).any():
        return out

    def join(values):
        return "; ".join(dict.fromkeys(v for v in values if v))

    agg = {c: "first" for c in out.columns if c not in same}
    agg.update({c: join for c in ("table", "notes", "records")})  # the paper: the first file's label
    return out.groupby(same, sort=False, dropna=False).agg(agg).reset_index()[out.columns]


def _table(row) -> str:
    source = str(row.source)
    if source.startswith("seed"):
        return f"seed document, {row.table}"
    return source  # reported_extra.csv: the document the number was read from


def load_parity(reference: Path) -> pd.DataFrame:
    """results/parity.csv (official code beside dfqbench, same cell), with its line numbers; empty if absent.
    Optional columns: model, dataset, device."""
    path = Path(reference) / PARITY_FILE
    if not path.exists():
        return pd.DataFrame(columns=PARITY_COLUMNS + ["model", "dataset", "device", "line"])
    df = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in PARITY_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    for col in ("model", "dataset", "device"):
        if col not in df.columns:
            df[col] = ""
    for col in ("official_top1_mean", "official_top1_std", "dfqbench_top1_mean", "dfqbench_top1_std",
                "official_s", "dfqbench_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df.assign(line=range(2, len(df) + 2))


def official(parity: pd.DataFrame) -> pd.DataFrame:
    """The official-code numbers of parity.csv as entries (the dfqbench side of each row is a reproduced entry
    already, from its records)."""
    if parity.empty:
        return pd.DataFrame(columns=ENTRY_COLUMNS)
    split = [split_run_method(str(m)) for m in parity.method]
    out = pd.DataFrame({
        "source": "official", "model": parity.model, "dataset": parity.dataset,
        "family": parity.schedule.map(lambda s: "training" if s else "post-training"),
        "method": [m for m, _ in split], "variant": [v for _, v in split], "config": parity.method,
        "convention": parity.quant, "schedule": parity.schedule, "device": parity.device,
        "wbit": parity.wbit.astype(int), "abit": parity.abit.astype(int), "mixed_precision": False,
        "n_test": float("nan"), "n_seeds": pd.to_numeric(parity.n_seeds, errors="coerce"), "deterministic": False,
        "fp32_top1": float("nan"), "top1_mean": parity.official_top1_mean, "top1_std": parity.official_top1_std,
        "drop_mean": float("nan"), "drop_std": float("nan"), "wall_s": parity.official_s,
        "quantize_s": float("nan"),
        "paper": parity.official_repo + "@" + parity.official_commit.astype(str).str[:10], "table": "",
        "notes": parity.note, "records": PARITY_FILE + ":" + parity.line.astype(str), "fidelity": ""})
    return out[ENTRY_COLUMNS]


def teachers(entries: pd.DataFrame) -> pd.DataFrame:
    """The FP32 top-1 of each teacher, from the data: ours (every reproduced entry's fp32_top1) and the papers'
    (every reported row's), each distinct value with how many entries give it."""
    rows = []
    for (model, dataset), cell in entries.groupby(["model", "dataset"], sort=True):
        row = {"model": model, "dataset": dataset}
        for source in ("reproduced", "reported"):
            values = cell[(cell.source == source)].fp32_top1.dropna().round(2)
            noun = "row" if source == "reported" else "cell"
            row[source] = ", ".join(f"{v:.2f}" + (f" ({n} {noun}{'s' if n > 1 else ''})" if values.nunique() > 1
                                                   else "")
                                    for v, n in values.value_counts().sort_index().items())
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "dataset", "reproduced", "reported"])
