"""results/baselines.md: every entry of the results model, in tables that hold only comparable numbers.

Per teacher: one table of our runs per convention x schedule x test-set size (CPU and CUDA runs in rows of their
own), then the papers' reported rows in a table of their own, then official-code runs; before them, the teachers'
FP32 top-1 (from the data) and our drops beside the papers' drops on any teacher.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .entries import collapsed, table_keys, teachers_most_run_first
from .format import cell, is_deterministic, links, mean_std, md_table, seeds_label, spread_seeds
from .names import FIDELITY_LABELS, legend, schedule_note

NOT_STATED = "not stated"
SOURCES = [
    ("reproduced", "a dfqbench run here: mean ± std over the Seeds column (one seed: no std; det.: a "
                   "deterministic method, which takes no seed, run once), on the Device "
                   "column, final model (no best epoch picked on the test set); Records links every run's "
                   "record.json"),
    ("reported", "a paper's number, from the Table named (the seed document or the repository document in "
                 "`reported_extra.csv`), with its Notes; Row is its line in the CSV. Seeds and device: as the "
                 "paper states them (not stated in these tables)"),
    ("official", "the method's official code run here (`parity.csv`, beside dfqbench in `parity.md`)"),
]


def _ours_string(cell_rows: pd.DataFrame) -> str:
    parts = []
    for r in cell_rows.sort_values(["convention", "schedule", "device"]).itertuples():
        where = r.convention + (f" [{r.schedule} schedule]" if r.schedule else "") + f" on {r.device or '?'}"
        n = int(r.n_seeds)
        seeds = "deterministic" if is_deterministic(r.deterministic) else f"{n} seed{'s' if n > 1 else ''}"
        parts.append(f"{where}: {mean_std(r.drop_mean, r.drop_std, spread_seeds(n, r.deterministic))} ({seeds})")
    return "; ".join(parts)


def drops_beside_papers(entries: pd.DataFrame) -> pd.DataFrame:
    """One row per (our teacher, method, variant, W, A) we ran x (paper, note) that reports that method, variant
    and bit-width on any teacher: our drop under each convention, schedule and device beside the paper's drop on
    each of its teachers. The paper's note (mixed precision, re-runs, UNVERIFIED) stays on its row."""
    ours = entries[(entries.source == "reproduced") & (entries.method != "fp32")]
    papers = entries[entries.source == "reported"]
    rows = []
    for (model, method, variant, wbit, abit), cell_rows in ours.groupby(
            ["model", "method", "variant", "wbit", "abit"], sort=True):
        p = papers[(papers.method == method) & (papers.variant == variant) & (papers.wbit == wbit)
                   & (papers.abit == abit)]
        mine = _ours_string(cell_rows)
        for (paper, notes), group in p.groupby(["paper", "notes"], sort=True):
            rows.append({"Method": method, "Variant": variant, "W": str(wbit), "A": str(abit), "Our teacher": model,
                         "Our drop (convention [schedule] on device: mean ± std, seeds)": mine, "Paper": paper,
                         "Paper's notes": notes,
                         "Paper's drop (their teacher)": "; ".join(f"{r.model} {r.drop_mean:.2f}"
                                                                    for r in group.itertuples())})
    columns = ["Method", "Variant", "W", "A", "Our teacher", "Our drop (convention [schedule] on device: mean ± "
               "std, seeds)", "Paper", "Paper's notes", "Paper's drop (their teacher)"]
    out = pd.DataFrame(rows, columns=columns)
    if len(out):
        out = out.assign(_w=out.W.astype(int), _a=out.A.astype(int)).sort_values(
            ["Method", "Variant", "_w", "_a", "Paper"], ascending=[True, True, False, False, True], kind="stable")
    return out.drop(columns=["_w", "_a"], errors="ignore").reset_index(drop=True)


def _order(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(_f=df.method != "fp32").sort_values(
        ["_f", "method", "variant", "wbit", "abit", "device", "paper", "notes"],
        ascending=[True, True, True, False, False, True, True, True], kind="stable")


def reproduced_table(rows: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    return pd.DataFrame([{
        "Source": "reproduced", "Method": r.method + FIDELITY_LABELS.get(r.fidelity, ""), "Variant": r.variant,
        "W": f"<={r.wbit} (MP)" if r.mixed_precision else str(r.wbit), "A": str(r.abit),
        "Device": r.device, "Seeds": seeds_label(r.n_seeds, r.deterministic), "FP32": cell(r.fp32_top1),
        "Top-1": mean_std(r.top1_mean, r.top1_std, spread_seeds(r.n_seeds, r.deterministic))
        + (" (collapsed)" if collapsed(r.top1_mean, r.fp32_top1) else ""),
        "Drop": mean_std(r.drop_mean, r.drop_std, spread_seeds(r.n_seeds, r.deterministic)),
        "Wall s": cell(r.wall_s, 0), "Records": links(r.records, out_dir)} for r in _order(rows).itertuples()])


def reported_table(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([{
        "Source": "reported", "Method": r.method, "Variant": r.variant, "W": str(r.wbit), "A": str(r.abit),
        "Device": NOT_STATED, "Seeds": NOT_STATED, "FP32": cell(r.fp32_top1), "Top-1": cell(r.top1_mean),
        "Drop": cell(r.drop_mean), "Paper": r.paper, "Table": r.table, "Notes": r.notes, "Row": r.records}
        for r in _order(rows).itertuples()])


def official_table(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([{
        "Source": "official", "Method": r.method, "Variant": r.variant, "Convention": r.convention,
        "Schedule": r.schedule or "post-training", "W": str(r.wbit), "A": str(r.abit),
        "Device": r.device or NOT_STATED, "Seeds": cell(None if pd.isna(r.n_seeds) else int(r.n_seeds)),
        "Top-1": mean_std(r.top1_mean, r.top1_std, r.n_seeds), "Wall s": cell(r.wall_s, 0), "Code": r.paper,
        "Notes": r.notes, "Row": r.records} for r in _order(rows).itertuples()])


def _heading(convention: str, schedule: str, n_test, full: float) -> str:
    what = f"schedule `{schedule}`" if schedule else "post-training (no schedule)"
    size = "" if n_test == full else f", {int(n_test)} test images (a slice)"
    return f"### Reproduced: convention `{convention}`, {what}{size}"


def teacher_section(model: str, dataset: str, title: str, entries: pd.DataFrame, out_dir: Path,
                    plot: str | None) -> list[str]:
    parts = [f"## {title}: `{model}` / `{dataset}`", ""]
    if legend(entries.method):
        parts += [legend(entries.method), ""]
    ours = entries[entries.source == "reproduced"]
    if ours.empty:
        parts += ["No dfqbench runs for this teacher yet: the papers' numbers only.", ""]
    full = ours.n_test.max() if len(ours) else None
    for conv, sched, n_test in table_keys(ours):
        rows = ours[(ours.convention == conv) & (ours.schedule == sched) & (ours.n_test == n_test)]
        parts += [_heading(conv, sched, n_test, full), "", *schedule_note(sched),
                  md_table(reproduced_table(rows, out_dir)), ""]
    off = entries[entries.source == "official"]
    if len(off):
        parts += ["### Official code run here", "", md_table(official_table(off)), ""]
    papers = entries[entries.source == "reported"]
    if len(papers):
        parts += ["### Reported by the papers (their teachers, conventions and schedules; not comparable to the "
                  "tables above, compare drops)", "", md_table(reported_table(papers)), ""]
    if plot:
        parts += [f"![{model} / {dataset}: top-1 vs bit-width]({plot})", ""]
    return parts


def teachers_table(teachers: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([{"Teacher": r.model, "Data set": r.dataset,
                          "FP32 top-1, our teacher (records)": r.reproduced or "no runs",
                          "FP32 top-1, the papers' teachers (reported rows)": r.reported or "none"}
                         for r in teachers.itertuples()])


def diverged_table(diverged: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """The runs whose training diverged, one row each: where it diverged (the error without its prefix and the
    checkpoint note) and a link to the failed record."""
    rows = []
    for r in diverged.sort_values(["model", "method", "variant", "quant", "wbit", "abit", "seed"]).itertuples():
        where = r.error.split("training diverged: ", 1)[-1].split("; the last good checkpoint", 1)[0]
        where = where.split("; no checkpoint yet", 1)[0]
        rows.append({"Teacher": r.model, "Method": r.method, "Variant": r.variant, "W": str(r.wbit),
                     "A": str(r.abit), "Convention": r.quant, "Schedule": r.schedule, "Device": r.device,
                     "Seed": str(r.seed), "Where": where,
                     "Record": f"[record]({os.path.relpath(r.record, out_dir)})"})
    return pd.DataFrame(rows)


def mixed_table(mixed: pd.DataFrame) -> pd.DataFrame:
    """The cells whose seeds ran with different settings, one row each, with the config keys that differ."""
    return pd.DataFrame([{
        "Teacher": r.model, "Method": r.method, "Variant": r.variant, "Convention": r.quant,
        "Schedule": r.schedule, "Device": r.device, "W": str(r.wbit), "A": str(r.abit),
        "Records": str(len(r.records)), "Settings that differ": ", ".join(f"`{k}`" for k in r.keys)}
        for r in mixed.sort_values(["model", "method", "variant", "quant", "wbit", "abit"]).itertuples()])


def render_baselines(entries: pd.DataFrame, teachers: pd.DataFrame, out_dir: Path, titles: dict,
                     plots: dict, n_runs: int, roots: str, diverged: pd.DataFrame | None = None,
                     mixed: pd.DataFrame | None = None) -> str:
    """`titles`: {(model, dataset): the seed's table title}; `plots`: {(model, dataset): link to the figure};
    `diverged`: entries.collect_diverged's runs, listed after the tables (a cell with no number says why);
    `mixed`: entries.mixed_settings' cells (a mean over records that did not all run the same settings)."""
    counts = entries.source.value_counts()
    parts = ["# Baseline tables", "",
             f"Generated by `make tables` from {n_runs} finished run records under {roots} "
             f"({counts.get('reproduced', 0)} table rows), {counts.get('reported', 0)} reported rows "
             "(`reported.csv`, parsed from the seed document, and `reported_extra.csv`)"
             + (f" and {counts.get('official', 0)} official-code rows (`parity.csv`)" if counts.get("official")
                else "") + ". Top-1 (%) on the full test set unless a heading says otherwise; Drop = FP32 minus "
             "top-1 on the same teacher. Method and Variant are separate: `qimera` + `ait` is AIT on top of "
             "Qimera (`method=qimera_ait`), `gdfq` + `ait` is `method=ait`, `crossdomain` + `real` is "
             "`method=crossdomain method.calib_data=real`.", "",
             "Every row names its Source:", "",
             md_table(pd.DataFrame([{"Source": s, "What the number is": w} for s, w in SOURCES])), "",
             "Only numbers that compare share a table: one per teacher x convention (`quant` preset) x schedule, "
             "our CPU and CUDA runs in separate rows; the papers' numbers in a table of their own after ours, "
             "never in our columns.", "",
             "## Teachers", "",
             "FP32 top-1 (%) as the records and the reported rows give it: the papers' teachers are not ours, so "
             "compare drops, not top-1.", "", md_table(teachers_table(teachers)), ""]
    beside = drops_beside_papers(entries)
    if len(beside):
        parts += ["## Our drops beside the papers' drops, every teacher", "",
                  "Each of our cells beside every drop a paper reports for the same method, variant and "
                  "bit-widths, on whatever teacher it used (most papers report ImageNet only), one row per paper "
                  "and note: a mixed-precision or unverified number says so in its notes.", "",
                  md_table(beside), ""]
    for model, dataset in teachers_most_run_first(entries):
        rows = entries[(entries.model == model) & (entries.dataset == dataset)]
        parts += teacher_section(model, dataset, titles.get((model, dataset), f"{model} ({dataset})"), rows,
                                 out_dir, plots.get((model, dataset)))
    loose = entries[(entries.source == "official") & (entries.model == "")]
    if len(loose):
        parts += ["## Official code run here, teacher not stated in parity.csv", "",
                  md_table(official_table(loose)), ""]
    if diverged is not None and len(diverged):
        parts += ["## Runs whose training diverged", "",
                  "Failed records of a training that went to NaN/inf (the trainer stops and writes no top-1): a "
                  "result at that budget, not a missing run. A cell above without a number for these settings "
                  "has them here.", "", md_table(diverged_table(diverged, out_dir)), ""]
    if mixed is not None and len(mixed):
        parts += ["## Cells whose seeds ran with different settings", "",
                  "A cell above is the mean over its records; these cells' records differ in the config keys "
                  "listed (seed aside). Check that the keys cannot change the number (e.g. a setting of a "
                  "schedule the cell did not run) before reading the mean; a variant run belongs under its own "
                  "name (`method.name=<method>-<variant>`).", "", md_table(mixed_table(mixed)), ""]
    return "\n".join(parts)
