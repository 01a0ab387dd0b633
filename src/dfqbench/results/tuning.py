"""tuning.md and plots/tuning.png: the tuning-robustness study's records (dfqbench.tuning) as a table and a plot.

A study record's method is `<method>-tune_default` or `<method>-tune_<setting>_<value>`; its varied setting and
value are read from its `overrides` (the `++method.<setting>=<value>` item). Per (teacher, convention, bits) and
method: the default's top-1, the worst and the best variant, the spread (max - min over the default and every
variant), the variants whose training diverged (a failed record of TrainingDiverged: a result of the study, not
a missing run; other failures are left out), the device(s) the runs used, and, beside it, the seed std of the
same cell's baseline records (3 seeds, default settings): a spread within a few seed stds says the method needs
little tuning; a large one says its paper's values matter.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .entries import TUNING, diverged_records, finished_records
from .format import cell, md_table
from .names import split_run_method

KEYS = ["model", "dataset", "quant", "wbit", "abit"]


def _setting(record: dict) -> tuple[str, str]:
    for item in record.get("overrides") or ():
        if item.startswith("++method."):
            key, value = item[len("++method."):].split("=", 1)
            return key, value
    return "", ""


COLUMNS = [*KEYS, "method", "setting", "value", "top1", "fp32_top1", "diverged", "device", "record"]


def study_runs(roots: list[Path]) -> pd.DataFrame:
    """One row per study record under <root>/tuning/ that finished or diverged: method, setting ("" = default),
    value, top-1 (NaN where it diverged), diverged, device."""
    rows = []
    for root in roots:
        folder = Path(root) / TUNING
        if not folder.is_dir():
            continue
        found = [(p, r, False) for p, r in finished_records(folder, leave_out=())]
        found += [(p, r, True) for p, r in diverged_records(folder, leave_out=())]
        for path, r, diverged in found:
            method, variant = split_run_method(str(r.get("method")))
            if not variant.startswith("tune_"):
                continue
            setting, value = _setting(r)
            rows.append({**{k: r.get(k) for k in KEYS}, "method": method, "setting": setting, "value": value,
                         "top1": float("nan") if diverged else r.get("top1"), "fp32_top1": r.get("fp32_top1"),
                         "diverged": diverged, "device": str(r.get("device") or "").split(":")[0],
                         "record": str(path)})
    return pd.DataFrame(rows, columns=COLUMNS).astype({"diverged": bool})


def seed_std(runs: pd.DataFrame, row) -> tuple[float | None, int]:
    """The std over seeds of the baseline records of the same cell (teacher, method without variant, bits,
    convention), and their number."""
    if runs.empty:
        return None, 0
    same = runs[(runs.model == row.model) & (runs.dataset == row.dataset) & (runs.method == row.method)
                & (runs.variant == "") & (runs.quant == row.quant) & (runs.wbit == row.wbit)
                & (runs.abit == row.abit)]
    if same.schedule.nunique() > 1:  # a training method: the default (cpu) schedule's runs
        same = same[same.schedule == "cpu"]
    n = same.seed.nunique()
    return (float(same.top1.std()) if n > 1 else None), int(n)


def summary_table(study: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    out = []
    for key, g in study.groupby([*KEYS, "method"], sort=True):
        row = pd.Series(dict(zip([*KEYS, "method"], key)))
        failed = g[g.diverged]
        g = g[~g.diverged]
        default = g[g.setting == ""].top1
        variants = g[g.setting != ""]
        worst, best = variants.loc[variants.top1.idxmin()] if len(variants) else None, \
            variants.loc[variants.top1.idxmax()] if len(variants) else None
        std, n = seed_std(runs, row)
        spread = g.top1.max() - g.top1.min()
        out.append({
            "Teacher": row.model, "Convention": row.quant, "W": str(row.wbit), "A": str(row.abit),
            "Method": row.method, "Variants": str(len(variants)),
            "Default top-1": cell(default.iloc[0]) if len(default) else "not run",
            "Worst variant": f"{worst.setting}={worst.value}: {worst.top1:.2f}" if worst is not None else "",
            "Best variant": f"{best.setting}={best.value}: {best.top1:.2f}" if best is not None else "",
            "Spread": cell(spread),
            "Diverged": "; ".join(f"{r.setting}={r.value}" if r.setting else "default" for r in failed.itertuples()),
            "Device": ", ".join(sorted(set(g.device) | set(failed.device))),
            "Seed std (baseline records)": f"{std:.2f} ({n} seeds)" if std is not None else "no 3-seed record",
            "Spread / seed std": cell(spread / std, 1) if std else ""})
    return pd.DataFrame(out)


def detail_table(study: pd.DataFrame) -> pd.DataFrame:
    out = []
    for key, g in study[study.setting != ""].groupby([*KEYS, "method", "setting"], sort=True):
        values = "; ".join(f"{r.value}: {'diverged' if r.diverged else f'{r.top1:.2f}'}"
                           for r in g.sort_values("value").itertuples())
        default = study[(study.method == key[5]) & (study.setting == "") & ~study.diverged & (study.quant == key[2])
                        & (study.wbit == key[3]) & (study.model == key[0])].top1
        out.append({"Teacher": key[0], "Convention": key[2], "W": str(key[3]), "A": str(key[4]),
                    "Method": key[5], "Setting": key[6],
                    "Default": cell(default.iloc[0]) if len(default) else "not run", "Variants (value: top-1)": values})
    return pd.DataFrame(out)


def plot_study(study: pd.DataFrame, runs: pd.DataFrame, path: Path) -> bool:
    """One row per method: every variant's top-1 as a dot, the default as a black bar with its seed std band."""
    if study.empty:
        return False
    cells = list(study.groupby([*KEYS, "method"], sort=True))
    fig = Figure(figsize=(8, 0.45 * len(cells) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labels = []
    for i, (key, g) in enumerate(cells):
        row = pd.Series(dict(zip([*KEYS, "method"], key)))
        labels.append(f"{row.method} ({row.quant} W{row.wbit}A{row.abit})")
        default = g[(g.setting == "") & ~g.diverged].top1
        if len(default):
            std, _ = seed_std(runs, row)
            if std:
                ax.fill_betweenx([i - 0.3, i + 0.3], default.iloc[0] - std, default.iloc[0] + std, color="0.85")
            ax.plot([default.iloc[0]] * 2, [i - 0.3, i + 0.3], color="black", lw=2)
        v = g[(g.setting != "") & ~g.diverged]
        ax.scatter(v.top1, [i] * len(v), s=18, color="#1f77b4", zorder=3)
    ax.set_yticks(range(len(cells)), labels)
    ax.set_xlabel("top-1 (%): dots = one setting moved, bar = paper's settings, grey = +- seed std")
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def render_tuning(study: pd.DataFrame, runs: pd.DataFrame, plot: str | None) -> str:
    n = len(study)
    parts = ["# Tuning robustness", "",
             f"Generated by `make tables` from {n} records of `python -m dfqbench experiment=tuning_robustness` "
             "(conf/experiment/tuning_robustness.yaml; the study of Chen et al., CVPR Workshops 2022): each "
             "method's key settings moved one at a time around the paper's values (seed 0 each), the others at "
             "the paper's. Spread = best minus worst top-1 over the default and its variants that finished; "
             "Diverged = variants whose training diverged (NaN loss: no top-1, not counted in the spread); the "
             "seed std comes from the same cell's 3-seed baseline records, so Spread / seed std near 1-2 is "
             "within seed noise. Device: where the runs ran.",
             "", md_table(summary_table(study, runs)), ""]
    if plot:
        parts += [f"![tuning robustness]({plot})", ""]
    detail = detail_table(study)
    if len(detail):
        parts += ["## Every variant", "", md_table(detail), ""]
    return "\n".join(parts)
