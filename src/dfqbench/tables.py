"""Aggregate run records into CSV and the markdown baseline tables (`make tables`).

    python -m dfqbench.tables [RECORD_ROOT ...] [--results results]

Reads every `record.json` under the roots (default: `results/`), keeps finished runs, and writes
`results/runs.csv` (one row per run), `results/summary.csv` (mean/std over seeds) and `results/baselines.md`:
one table per model x data set, rows method x W-bit x A-bit x convention, our FP32 / quantized / drop beside the
papers' reported FP32 / quantized / drop (from `reported.csv` + `reported_extra.csv`), each table followed by its
top-1 vs bit-width plot (`results/plots/<model>-<dataset>.png`, dfqbench.plots).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from .plots import plot_all
from .reported import load_reported

RUN_COLUMNS = ["model", "dataset", "method", "quant", "schedule", "wbit", "abit", "seed", "fp32_top1", "top1", "top5",
               "drop", "n_test", "checkpoint_sha256", "config_hash", "wall_time_s", "quantize_time_s", "git_commit",
               "record"]
# a test slice never mixes with the full set, nor a schedule with another
_GROUP = ["model", "dataset", "method", "quant", "schedule", "wbit", "abit", "n_test"]


def collect_runs(roots: list[Path]) -> pd.DataFrame:
    rows = []
    for root in roots:
        for path in sorted(root.rglob("record.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("status") != "done":
                continue
            rows.append({**{k: record.get(k) for k in RUN_COLUMNS}, "schedule": schedule_label(record),
                         "record": str(path)})
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    # the same config computed twice (e.g. in two sweep roots) counts once
    return df.drop_duplicates(subset=["config_hash", "checkpoint_sha256", "n_test"], keep="last")


def schedule_label(record: dict) -> str:
    """The training schedule of a training method's run ("" for the others), and the best-epoch-on-test label."""
    info = record.get("info") or {}
    label = str(info.get("schedule") or "")
    if info.get("best_epoch_on_test"):
        label += " (best epoch on TEST)"
    return label


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    if runs.empty:
        return pd.DataFrame(columns=_GROUP + ["seeds", "fp32_top1", "top1_mean", "top1_std", "drop_mean",
                                              "drop_std"])
    g = runs.groupby(_GROUP, dropna=False)
    out = g.agg(seeds=("seed", "nunique"), fp32_top1=("fp32_top1", "mean"), top1_mean=("top1", "mean"),
                top1_std=("top1", "std"), drop_mean=("drop", "mean"), drop_std=("drop", "std")).reset_index()
    return out


def _fmt(value, digits=2) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _ours(row) -> dict:
    spread = f" ± {row.top1_std:.2f}" if row.seeds > 1 else ""
    drop_spread = f" ± {row.drop_std:.2f}" if row.seeds > 1 else ""
    return {"Convention": row.quant, "Schedule": row.schedule, "FP32 (ours)": _fmt(row.fp32_top1),
            "Quantized (ours)": _fmt(row.top1_mean) + spread, "Drop (ours)": _fmt(row.drop_mean) + drop_spread,
            "Seeds": str(int(row.seeds))}


def _paper(row) -> dict:
    notes = "; ".join(x for x in (row.notes, "mixed precision" if row.mixed_precision in (True, "True") else "",
                                  row.source if not str(row.source).startswith("seed") else "") if x)
    return {"FP32 (paper)": _fmt(row.fp32_top1), "Quantized (paper)": _fmt(row.top1),
            "Drop (paper)": _fmt(row.fp32_top1 - row.top1), "Paper": f"{row.method_label} ({row.venue})",
            "Notes": notes}


_HEADER = ["Method", "W", "A", "Convention", "Schedule", "FP32 (ours)", "Quantized (ours)", "Drop (ours)", "Seeds",
           "FP32 (paper)", "Quantized (paper)", "Drop (paper)", "Paper", "Notes"]


def model_table(ours: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Rows method x W x A: each of our conventions beside the paper's number when the paper gives exactly one;
    several reported variants of a cell get rows of their own."""
    keys = pd.concat([ours[["method", "wbit", "abit"]], paper[["method", "wbit", "abit"]]]).drop_duplicates()
    seed_order = {m: i for i, m in enumerate(dict.fromkeys(paper.method))}
    ran = set(ours.method)
    keys = keys.assign(_o=keys.method.map(  # FP32 first, then methods we ran, then reported-only ones
        lambda m: (0 if m == "fp32" else 1 if m in ran else 2, seed_order.get(m, -1))))
    keys = keys.sort_values(["_o", "method", "wbit", "abit"], ascending=[True, True, False, False])
    rows = []
    for key in keys.itertuples():
        o = ours[(ours.method == key.method) & (ours.wbit == key.wbit) & (ours.abit == key.abit)]
        p = paper[(paper.method == key.method) & (paper.wbit == key.wbit) & (paper.abit == key.abit)]
        base = {"Method": key.method, "W": str(key.wbit), "A": str(key.abit)}
        shared = _paper(next(p.itertuples())) if len(p) == 1 else {}
        for row in o.itertuples():
            rows.append({**base, **_ours(row), **shared})
        if len(p) > 1 or (len(p) == 1 and o.empty):
            rows += [{**base, **_paper(row)} for row in p.itertuples()]
    return pd.DataFrame(rows, columns=_HEADER, dtype=object).fillna("")


def drops_beside_papers(summary: pd.DataFrame, reported: pd.DataFrame) -> pd.DataFrame:
    """One row per (our model, method, W, A) we ran that some paper reports on any model: our drop under each
    convention beside every reported drop of that method and bit-width (most papers report ImageNet only)."""
    rows = []
    ours = summary[summary.method != "fp32"]
    for (model, method, wbit, abit), cell in ours.groupby(["model", "method", "wbit", "abit"], sort=False):
        p = reported[(reported.method == method) & (reported.wbit == wbit) & (reported.abit == abit)]
        if p.empty:
            continue
        mine = ", ".join(f"{r.quant}{f' [{r.schedule} schedule]' if r.schedule else ''} {_fmt(r.drop_mean)}"
                         + (f" ± {r.drop_std:.2f}" if r.seeds > 1 else "")
                         for r in cell.sort_values("quant").itertuples())
        theirs = "; ".join(  # notes only where a row is not the paper's own (a re-run by another paper)
            f"{r.model} {_fmt(r.fp32_top1 - r.top1)}" + (f" ({r.notes})" if "re-run" in str(r.notes) else "")
            for r in p.itertuples())
        rows.append({"Method": method, "W": str(wbit), "A": str(abit), "Our model": model,
                     "Drop (ours, by convention)": mine, "Drop (papers, their teacher)": theirs})
    columns = ["Method", "W", "A", "Our model", "Drop (ours, by convention)", "Drop (papers, their teacher)"]
    out = pd.DataFrame(rows, columns=columns)
    return out.sort_values(["Method", "W", "A"], ascending=[True, False, False]) if len(out) else out


def render_markdown(summary: pd.DataFrame, reported: pd.DataFrame, plots: dict | None = None) -> str:
    """`plots`: {(model, dataset): path relative to the markdown file}, linked under each table."""
    parts = ["# Baseline tables", "",
             "Generated by `make tables` from the run records under `results/` and the papers' reported numbers "
             "(`results/reported.csv`, parsed from the seed document, plus `results/reported_extra.csv`). "
             "Ours: top-1 (%) on the full test set, mean ± std over seeds, final model (no best-epoch "
             "selection). Drops are FP32 minus quantized on the same teacher. Papers used other teachers "
             "(ResNet-20 CIFAR-10: 93.89 / 94.03 FP32, ours 87.66 on the JPEG copy): compare drops, not "
             "absolute numbers. Conventions: see README (`gdfq` = C1, `brecq` = C2).", ""]
    beside = drops_beside_papers(summary, reported)
    if len(beside):
        parts += ["## Our drops beside the papers' drops, every teacher", "",
                  "Most papers report ImageNet teachers only: this puts each of our cells beside every drop a "
                  "paper reports for the same method and bit-widths, on whatever teacher it used.", "",
                  beside.to_markdown(index=False, disable_numparse=True), ""]
    tables = pd.concat([summary[["model", "dataset"]], reported[["model", "dataset"]]]).drop_duplicates()
    have_ours = set(map(tuple, summary[["model", "dataset"]].values.tolist()))
    tables = sorted(map(tuple, tables.values.tolist()), key=lambda md: (md not in have_ours, md))
    for model, dataset in tables:
        ours = summary[(summary.model == model) & (summary.dataset == dataset)]
        paper = reported[(reported.model == model) & (reported.dataset == dataset)]
        title = paper.table.iloc[0] if len(paper) else f"{model} ({dataset})"
        parts += [f"## {title}: `{model}` / `{dataset}`", ""]
        if ours.empty:
            parts += ["No dfqbench runs yet for this model; reported numbers only.", ""]
        parts += [model_table(ours, paper).to_markdown(index=False, disable_numparse=True), ""]
        if (plots or {}).get((model, dataset)):
            parts += [f"![{model} / {dataset}: top-1 vs bit-width]({plots[(model, dataset)]})", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", type=Path, help="folders searched for record.json (default: results)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="where CSVs and tables are written")
    args = parser.parse_args(argv)
    roots = args.roots or [args.results]
    runs = collect_runs(roots)
    summary = summarize(runs)
    reported = load_reported(args.results)
    args.results.mkdir(parents=True, exist_ok=True)
    runs.to_csv(args.results / "runs.csv", index=False)
    summary.round(4).to_csv(args.results / "summary.csv", index=False)
    plots = plot_all(summary, reported, args.results / "plots")
    links = {key: path.relative_to(args.results).as_posix() for key, path in plots.items()}
    (args.results / "baselines.md").write_text(render_markdown(summary, reported, links))
    print(f"{len(runs)} runs, {len(summary)} table cells, {len(reported)} reported rows -> "
          f"{args.results / 'baselines.md'}, {len(plots)} plots in {args.results / 'plots'}")


if __name__ == "__main__":
    main()
