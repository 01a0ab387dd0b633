"""`make tables [RESULTS=dir]`: run records and the papers' numbers -> CSVs, markdown tables and figures.

    python -m dfqbench.tables [RECORD_ROOT ...] [--results results] [--reported results]

Reads every finished `record.json` under the roots (default: the --results folder) into the results model
(dfqbench.results.entries: each number with its source, method and variant, convention, schedule, device,
seeds and records), adds the papers' numbers (`reported.csv`, `reported_extra.csv`) and official-code runs
(`parity.csv`, when there is one) from the --reported folder (default `results/`: a folder of your own runs gets
the paper tables too), and writes into --results:

    runs.csv      one row per run            summary.csv  one row per reproduced table cell (mean, std, n_seeds)
    baselines.md  every number, by teacher x convention x schedule, papers' tables beside
    README.md     the leaderboard: figures, best top-1 per cell in bold
    parity.md     official code beside dfqbench (only with a parity.csv)
    deployed.md   fake-quant beside deployed (ONNX Runtime) top-1 of the export=onnx runs (only when there are any)
    tuning.md     the tuning-robustness study (records under <root>/tuning/, only when there are any)
    ranking.md    the training family's ranking per schedule: seed stability, agreement across schedules
    plots/<model>-<dataset>.png, plots/<model>-<dataset>-time.png   (dfqbench.plots)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd

from .plots import plot_all
from .results import entries as model
from .results.entries import collect_runs, schedule_label  # noqa: F401  (the public names of `make tables`)
from .results.deployed import deployed_rows, render_deployed
from .results.leaderboard import render_leaderboard
from .results.markdown import drops_beside_papers, render_baselines  # noqa: F401
from .results.names import TEACHER_TITLES
from .results.parity import render_parity
from .results.ranking import render_ranking
from .results.tuning import plot_study, render_tuning, study_runs


def build(roots: list[Path], reference: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """-> (runs, entries of every source, the parity rows, the reported rows as read)."""
    runs = collect_runs(roots)
    reported_rows = model.load_reported_rows(reference)
    parity = model.load_parity(reference)
    frames = [f for f in (model.reproduced(runs), model.reported(reported_rows), model.official(parity)) if len(f)]
    entries = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=model.ENTRY_COLUMNS)
    return runs, entries[model.ENTRY_COLUMNS], parity, reported_rows


def titles_of(reported_rows: pd.DataFrame) -> dict[tuple[str, str], str]:
    """{(model, dataset): the table title of the papers' rows (the seed document's, or reported_extra.csv's)},
    over dfqbench.results.names.TEACHER_TITLES for teachers no paper reports on."""
    papers = reported_rows[["model", "dataset", "table"]].drop_duplicates(["model", "dataset"])
    return {**TEACHER_TITLES, **{(m, d): t for m, d, t in papers.itertuples(index=False)}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", type=Path, help="folders searched for record.json (default: --results)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="where CSVs, tables, plots go")
    parser.add_argument("--reported", type=Path, default=Path("results"),
                        help="folder with reported.csv, reported_extra.csv and parity.csv (default: results)")
    args = parser.parse_args(argv)
    roots = args.roots or [args.results]
    out = args.results
    runs, entries, parity, reported_rows = build(roots, args.reported)
    if reported_rows.empty:
        print(f"no reported.csv / reported_extra.csv in {args.reported}: tables without the papers' numbers")
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    summary = entries[entries.source == "reproduced"].drop(columns=["paper", "table", "notes", "mixed_precision"])
    summary = summary.astype({"wbit": int, "abit": int, "n_test": "Int64", "n_seeds": "Int64"})
    summary.round(4).to_csv(out / "summary.csv", index=False)
    teachers = model.teachers(entries)
    titles = titles_of(reported_rows)
    figures = plot_all(entries, out / "plots", titles)
    rel = {k: {kind: os.path.relpath(p, out) for kind, p in v.items()} for k, v in figures.items()}
    where = ", ".join(f"`{r}`" for r in roots)
    diverged = model.collect_diverged(roots)
    mixed = model.mixed_settings(runs)
    (out / "baselines.md").write_text(render_baselines(entries, teachers, out, titles,
                                                       {k: v.get("bits") for k, v in rel.items()}, len(runs), where,
                                                       diverged, mixed))
    (out / "README.md").write_text(render_leaderboard(entries, teachers, titles, rel, len(runs), parity))
    if len(parity):
        (out / "parity.md").write_text(render_parity(parity))
    ranking = render_ranking(runs)
    if ranking:
        (out / "ranking.md").write_text(ranking)
    study = study_runs(roots)
    if len(study):
        plotted = plot_study(study, runs, out / "plots" / "tuning.png")
        (out / "tuning.md").write_text(render_tuning(study, runs, "plots/tuning.png" if plotted else None))
    deployed = [row for root in roots for row in deployed_rows(root)]
    if deployed:
        (out / "deployed.md").write_text(render_deployed(deployed, out))
    print(f"{len(runs)} runs, {len(summary)} table cells, {int((entries.source == 'reported').sum())} reported "
          f"rows, {len(parity)} parity rows -> {out / 'baselines.md'}, {out / 'README.md'}, "
          f"{sum(len(v) for v in figures.values())} figures in {out / 'plots'}")


if __name__ == "__main__":
    main()
