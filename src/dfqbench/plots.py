"""Top-1 vs bit-width, one PNG per model x data set, written by `make tables` under results/plots/.

Our runs: one line per method x convention (color = method, line style = convention; mean over seeds, std as
error bars) and our FP32 teacher as a solid
horizontal line. The papers' reported numbers (reported.csv + reported_extra.csv): hollow gray markers, one
shape per paper, and their FP32 teacher dotted. Only W = A cells are drawn (mixed precision and W4A8 rows are in the tables).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_MARKERS = "sD^vP*X<>phd8H"
_STYLES = {"gdfq": "-", "brecq": "--", "dfq": ":"}


def _uniform(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df.wbit == df.abit) & (df.wbit < 32)]


def plot_model(title: str, ours: pd.DataFrame, paper: pd.DataFrame, path: Path) -> bool:
    """Draw one model x data set; False (and no file) when there is nothing to draw."""
    quantized = _uniform(ours[ours.method != "fp32"])
    reported = _uniform(paper[~paper.mixed_precision.astype(str).isin(["True", "true"])])
    if quantized.empty and reported.empty:
        return False
    fig = Figure(figsize=(8, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles = []  # legend order: ours, our FP32, the papers, their FP32
    colors = {m: f"C{i % 10}" for i, m in enumerate(sorted(set(quantized.method)))}
    for (method, quant), rows in quantized.groupby(["method", "quant"]):
        rows = rows.sort_values("wbit")
        handles.append(ax.errorbar(rows.wbit, rows.top1_mean, yerr=rows.top1_std.fillna(0.0), marker="o",
                                   capsize=3, color=colors[method], linestyle=_STYLES.get(quant, "-."),
                                   label=f"{method} [{quant}] (ours)"))
    if not ours.empty:
        fp32 = ours.fp32_top1.mean()
        handles.append(ax.axhline(fp32, color="black", linewidth=1, label=f"FP32 (ours) {fp32:.2f}"))
    for i, ((label, venue), rows) in enumerate(reported.groupby(["method_label", "venue"], sort=False)):
        handles.append(ax.scatter(rows.wbit, rows.top1, marker=_MARKERS[i % len(_MARKERS)], facecolors="none",
                                  edgecolors="0.3", s=45, label=f"{label} ({venue}), paper"))
    if not reported.empty:
        fp32 = reported.fp32_top1.median()
        handles.append(ax.axhline(fp32, color="gray", linestyle=":", linewidth=1,
                                  label=f"FP32 (papers) {fp32:.2f}"))
    bits = sorted(set(quantized.wbit) | set(reported.wbit))
    ax.set_xticks(bits, [f"W{b}A{b}" for b in bits])
    ax.set_xlabel("bit-width (weights = activations)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, handlelength=3, loc="center left", bbox_to_anchor=(1.01, 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True


def plot_all(summary: pd.DataFrame, reported: pd.DataFrame, out_dir: Path) -> dict[tuple[str, str], Path]:
    """One PNG per model x data set found in either frame: {(model, dataset): path}."""
    keys = pd.concat([summary[["model", "dataset"]], reported[["model", "dataset"]]]).drop_duplicates()
    paths = {}
    for model, dataset in keys.itertuples(index=False):
        ours = summary[(summary.model == model) & (summary.dataset == dataset)]
        paper = reported[(reported.model == model) & (reported.dataset == dataset)]
        title = paper.table.iloc[0] if len(paper) else f"{model} ({dataset})"
        path = out_dir / f"{model}-{dataset}.png"
        if plot_model(f"{title}: {model} / {dataset}", ours, paper, path):
            paths[(model, dataset)] = path
    return paths
