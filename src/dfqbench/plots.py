"""The figures `make tables` writes under results/plots/ (matplotlib, Agg).

`<model>-<dataset>.png`: top-1 vs bit-width (W = A), one panel per family (post-training, training) x
convention x schedule, so that a panel holds only numbers that compare; conventions or schedules with fewer
than MIN_PANEL methods share an "other" panel whose legend names them. One colour + marker per method and
variant (the same in every panel of a figure), mean over seeds with the std as error bars, CUDA runs hollow and
dashed, a slight x offset per series so that error bars do not hide each other. The top-1 axis is spaced by
log(drop from FP32), so W5A5 gaps stay visible beside W3A3 ones; collapsed runs (top-1 below half the FP32)
do not stretch it: a red triangle at the bottom edge, with the values written above. The papers' numbers get a
panel of their own (their teachers differ), never mixed with ours.
`<model>-<dataset>-time.png`: drop vs wall time per run, at the uniform bit-width with the most runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter

from .results.entries import collapsed
from .results.names import display

# 20 colours that stay apart on white (Kelly / Tableau), 12 markers: a method keeps both across the panels
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#000000", "#000080", "#800000", "#008080", "#808000", "#ff1493", "#7f7f7f", "#b8860b", "#4b0082",
           "#32cd32", "#a0522d"]
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "p", "h"]
MIN_PANEL = 3  # methods a convention x schedule needs for a panel of its own
PANEL_HEIGHT = 3.4
LEGEND_ROWS = 22  # legend entries per column


def style_map(keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, str]]:
    """(method, variant) -> (colour, marker), in the order given: any 20 consecutive keys differ in colour and
    any 12 in marker, and no two keys share both."""
    return {k: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i, k in enumerate(dict.fromkeys(keys))}


def _uniform(df: pd.DataFrame) -> pd.DataFrame:
    keep = (df.wbit == df.abit) & (df.wbit < 32) & ~df.mixed_precision.astype(bool)
    return df[keep & (df.method != "fp32")]


def panels(ours: pd.DataFrame) -> list[tuple[str, pd.DataFrame, bool]]:
    """Reproduced entries of one teacher -> [(title, rows, is_other_panel)]: per family, one panel per
    convention x schedule with MIN_PANEL methods or more, then one for the rest."""
    out = []
    for family in ("post-training", "training"):
        fam = ours[ours.family == family]
        if fam.empty:
            continue
        sizes = fam.groupby(["convention", "schedule"]).apply(lambda g: len(set(zip(g.method, g.variant))))
        main = [k for k, n in sizes.items() if n >= MIN_PANEL]
        for conv, sched in sorted(main, key=lambda k: -sizes[k]):
            rows = fam[(fam.convention == conv) & (fam.schedule == sched)]
            out.append((f"{family}, convention {conv}" + (f", schedule {sched}" if sched else ""), rows, False))
        rest = fam[~pd.Series(list(zip(fam.convention, fam.schedule)), index=fam.index).isin(main)]
        if len(rest):
            title = f"{family}, other conventions / schedules (in brackets)" if main else f"{family}"
            out.append((title, rest, bool(main)))
    return out


def _label(row, other: bool) -> str:
    label = display(row.method, row.variant)
    if other:
        label += f" [{row.convention}" + (f", {row.schedule}" if row.schedule else "") + "]"
    return label + (f" ({row.device})" if row.device and row.device != "cpu" else "")


def _jitter(i: int, n: int) -> float:
    """x offset of series i of n, so that error bars at one bit-width do not hide each other (0.3 wide in all)."""
    return 0.3 * (i / (n - 1) - 0.5) if n > 1 else 0.0


DROP_TICKS = (0.0, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80)
HEADROOM = 0.5  # top-1 points above the FP32 line the axis can show (a quantized model may beat its teacher)


def drop_axis(ax, fp32: float, kept: list, collapsed_below: bool) -> None:
    """A top-1 axis spaced by log(FP32 + HEADROOM - top-1): a 0.2-point gap near the teacher reads as clearly as
    a 10-point gap at 3 bits. Ticks are top-1 values at round drops; limits from the kept (not collapsed)
    points, with room at the bottom for the collapsed markers."""
    top = fp32 + HEADROOM

    def forward(y):
        return -np.log10(np.clip(top - np.asarray(y, dtype=float), 1e-3, None))

    def inverse(t):
        return top - 10 ** (-np.asarray(t, dtype=float))

    values = np.concatenate([np.asarray(v, dtype=float) for v in kept] + [np.array([fp32])])
    values = values[np.isfinite(values)]
    worst = max(float(fp32 - values.min()), 0.3)  # the largest drop shown
    lo = max(fp32 - worst * (3.0 if collapsed_below else 1.25), 0.0)
    hi = min(max(float(values.max()), fp32) + 0.1, top - 0.05)
    ax.set_yscale("function", functions=(forward, inverse))
    ax.set_ylim(lo, hi)
    ticks = [fp32 - d for d in DROP_TICKS if lo <= fp32 - d <= hi]
    ax.set_yticks(ticks, [f"{t:.1f}" if t != fp32 else f"{t:.2f}" for t in ticks])
    ax.yaxis.set_minor_locator(FixedLocator([]))


def _draw_series(ax, rows, color, marker, label, cuda, x_offset, linestyle="-"):
    """One line (mean, std error bars) over the series' kept points -> (legend handle, its collapsed rows)."""
    rows = rows.sort_values("wbit")
    bad = collapsed(rows.top1_mean, rows.fp32_top1)
    ok = rows[~bad]
    style = {"color": color, "marker": marker, "markerfacecolor": "none" if cuda else color,
             "linestyle": "--" if cuda else linestyle, "label": label}
    if ok.empty:  # only collapsed points: a legend entry all the same
        return ax.plot([], [], **style)[0], rows[bad]
    handle = ax.errorbar(ok.wbit + x_offset, ok.top1_mean, yerr=ok.top1_std.fillna(0.0).to_numpy(dtype=float),
                         markersize=6, capsize=3, linewidth=1.3, **style)
    return handle, rows[bad]


def _mark_collapsed(ax, points: list[tuple[float, float, str, str]]):
    """Collapsed points: a red triangle at the bottom edge, and one label per bit-width listing them."""
    if not points:
        return
    lo, hi = ax.get_ylim()
    y = ax.transData.inverted().transform(ax.transAxes.transform((0, 0.04)))[1]  # 4 % above the bottom edge
    by_bits: dict[int, list[str]] = {}
    for x, value, text, color in sorted(points):
        ax.plot([x], [y], marker="v", color="red", markeredgecolor=color, markersize=9, linestyle="none",
                clip_on=False)
        by_bits.setdefault(int(round(x)), []).append(f"{text} {value:.1f}")
    for bits, texts in by_bits.items():
        ax.annotate("collapsed:\n" + "\n".join(texts[:4]) + (f"\n+{len(texts) - 4} more" if len(texts) > 4 else ""),
                    (bits, y), xytext=(0, 8), textcoords="offset points", fontsize=6.5, color="red", ha="center",
                    va="bottom", linespacing=1.0)


def _panel_ours(ax, title, rows, other, styles, fp32):
    series = list(rows.groupby(["method", "variant", "convention", "schedule", "device"], sort=False))
    n = len(series)
    handles, bad_points, kept = [], [], []
    for i, (_, s) in enumerate(series):
        first = s.iloc[0]
        color, marker = styles[(first.method, first.variant)]
        offset = _jitter(i, n)
        h, bad = _draw_series(ax, s, color, marker, _label(first, other), first.device == "cuda", offset)
        handles.append(h)
        ok = s[~collapsed(s.top1_mean, s.fp32_top1)]
        kept += [ok.top1_mean + ok.top1_std.fillna(0), ok.top1_mean - ok.top1_std.fillna(0)]
        bad_points += [(b.wbit + offset, b.top1_mean, display(b.method, b.variant), color) for b in bad.itertuples()]
    if not np.isnan(fp32):
        handles.append(ax.axhline(fp32, color="black", linewidth=1, label=f"FP32 {fp32:.2f}"))
    drop_axis(ax, fp32 if not np.isnan(fp32) else float(rows.fp32_top1.max()), kept, bool(bad_points))
    _mark_collapsed(ax, bad_points)
    _finish(ax, title, rows.wbit, handles)


def _panel_papers(ax, rows, styles, alone: bool):
    handles, bad_points, kept = [], [], []
    groups = list(rows.groupby(["method", "variant", "paper", "notes"], sort=True))
    seen: dict[tuple[str, str], int] = {}
    for i, ((method, variant, paper, notes), s) in enumerate(groups):
        color, marker = styles[(method, variant)]
        dash = ["-", "--", ":", "-."][seen.get((method, variant), 0) % 4]
        seen[(method, variant)] = seen.get((method, variant), 0) + 1
        label = f"{display(method, variant)}: {paper}" + (f", {notes}" if notes else "")
        offset = _jitter(i, len(groups))
        h, bad = _draw_series(ax, s, color, marker, label if len(label) <= 60 else label[:57] + "...", False,
                              offset, linestyle=dash)
        handles.append(h)
        ok = s[~collapsed(s.top1_mean, s.fp32_top1)]
        kept.append(ok.top1_mean)
        kept.append(ok.fp32_top1)
        bad_points += [(b.wbit + offset, b.top1_mean, display(b.method, b.variant), color) for b in bad.itertuples()]
    fp32s = rows.fp32_top1.round(2).value_counts()
    for j, (value, count) in enumerate(fp32s.items()):
        handles.append(ax.axhline(value, color="gray", linestyle=":", linewidth=1,
                                  label=f"FP32 (papers) {value:.2f}" + (f", {count} rows" if len(fp32s) > 1 else "")))
    drop_axis(ax, float(fp32s.index.max()), kept, bool(bad_points))
    _mark_collapsed(ax, bad_points)
    _finish(ax, "reported by the papers (their teachers, conventions, schedules)"
            + ("" if alone else ": not comparable to the panels above"), rows.wbit, handles)


def _finish(ax, title, bits, handles):
    bits = sorted(set(int(b) for b in bits))
    ax.set_xticks(bits, [f"W{b}A{b}" for b in bits])
    ax.set_xlim(min(bits) - 0.4, max(bits) + 0.4)
    ax.set_ylabel("top-1 (%), log-drop spacing")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, handlelength=2.5, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              ncol=1 + (len(handles) - 1) // LEGEND_ROWS, frameon=False)


def _canvas(n_rows: int, height: float = PANEL_HEIGHT, right: float = 0.6) -> tuple[Figure, list]:
    """A column of n_rows panels, each with room on its right (1 - right) for its legend."""
    fig = Figure(figsize=(12.0, height * n_rows + 1.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, 1, squeeze=False)[:, 0]
    fig.subplots_adjust(left=0.07, right=right, top=1 - 0.95 / fig.get_figheight(),
                        bottom=0.45 / fig.get_figheight(), hspace=0.45)
    return fig, list(axes)


def teacher_figure(title: str, entries: pd.DataFrame) -> Figure | None:
    """One teacher's entries (every source) -> top-1 vs bit-width, or None when there is nothing to draw."""
    ours = entries[entries.source == "reproduced"]
    if len(ours):
        ours = ours[ours.n_test == ours.n_test.max()]  # a test slice never shares a panel with the full set
    ours = _uniform(ours)
    papers = _uniform(entries[entries.source == "reported"])
    groups = panels(ours)
    if not groups and papers.empty:
        return None
    keys = [k for _, rows, _ in groups for k in zip(rows.method, rows.variant)] + list(zip(papers.method,
                                                                                           papers.variant))
    styles = style_map(keys)
    fig, axes = _canvas(len(groups) + (not papers.empty))
    fp32 = float(ours.fp32_top1.mean()) if len(ours) else float("nan")
    for ax, (panel_title, rows, other) in zip(axes, groups):
        _panel_ours(ax, f"{panel_title} (dfqbench runs)", rows, other, styles, fp32)
    if not papers.empty:
        _panel_papers(axes[-1], papers, styles, alone=not groups)
    axes[-1].set_xlabel("bit-width (weights = activations); mean ± std over seeds")
    fig.suptitle(title, fontsize=12, y=1 - 0.25 / fig.get_figheight())
    return fig


def _save(fig: Figure | None, path: Path) -> bool:
    if fig is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True


def plot_teacher(title: str, entries: pd.DataFrame, path: Path) -> bool:
    """teacher_figure() into `path`; False (and no file) when there is nothing to draw."""
    return _save(teacher_figure(title, entries), path)


def time_bits(ours: pd.DataFrame) -> tuple[int, int] | None:
    """The uniform bit-width with the most reproduced entries (ties: the lower one)."""
    u = _uniform(ours)
    if u.empty:
        return None
    counts = u.groupby("wbit").size()
    best = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    return int(best), int(best)


def _panel_time(ax, title: str, rows: pd.DataFrame, other: bool, styles: dict):
    bad = collapsed(rows.top1_mean, rows.fp32_top1)
    ok = rows[~bad]
    spread = ok.drop_std.fillna(0)
    top = float((ok.drop_mean + spread).max()) if len(ok) else 1.0
    ylim = (min(0.0, float((ok.drop_mean - spread).min()) if len(ok) else 0.0) - 0.2, top * 1.1 + 0.2)
    handles = []
    for row in rows.sort_values(["method", "variant", "schedule", "device"]).itertuples():
        color, marker = styles[(row.method, row.variant)]
        face = "none" if row.device == "cuda" else color
        label = _label(row, True) if other else _label(row, False) + (f" [{row.schedule}]" if row.schedule else "")
        if collapsed(row.top1_mean, row.fp32_top1):
            handles.append(ax.plot([row.wall_s], [ylim[1]], marker="^", color="red", markeredgecolor=color,
                                   markersize=9, clip_on=False, linestyle="none",
                                   label=f"{label}: drop {row.drop_mean:.1f}, collapsed")[0])
            ax.annotate(f"{display(row.method, row.variant)} {row.drop_mean:.1f} (collapsed)", (row.wall_s, ylim[1]),
                        xytext=(-6, -10), textcoords="offset points", fontsize=7, color="red", ha="right")
            continue
        yerr = [0.0 if pd.isna(row.drop_std) else row.drop_std]
        handles.append(ax.errorbar([row.wall_s], [row.drop_mean], yerr=yerr, color=color, marker=marker,
                                   markerfacecolor=face, markersize=7, capsize=3, linestyle="none", label=label))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_ylim(*ylim)
    ax.set_ylabel("drop (FP32 - top-1)")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              ncol=1 + (len(handles) - 1) // LEGEND_ROWS)


def time_figure(title: str, entries: pd.DataFrame) -> Figure | None:
    """Drop vs wall time, one point per reproduced entry at time_bits(); one panel per convention with
    MIN_PANEL methods or more, then the rest (families share a panel: the point is what each costs)."""
    ours = entries[(entries.source == "reproduced") & entries.wall_s.notna()]
    bits = time_bits(ours)
    if bits is None:
        return None
    rows = _uniform(ours)
    rows = rows[(rows.wbit == bits[0]) & (rows.n_test == rows.n_test.max())]
    by_conv = rows.groupby("convention").apply(lambda g: len(set(zip(g.method, g.variant))))
    main = sorted((c for c, n in by_conv.items() if n >= MIN_PANEL), key=lambda c: -by_conv[c])
    groups = [(f"convention {c}", rows[rows.convention == c], False) for c in main]
    rest = rows[~rows.convention.isin(main)]
    if len(rest):
        groups.append(("other conventions (in brackets)", rest, True))
    styles = style_map([k for _, r, _ in groups for k in zip(r.method, r.variant)])
    fig, axes = _canvas(len(groups), height=4.2)
    for ax, (panel_title, r, other) in zip(axes, groups):
        _panel_time(ax, f"W{bits[0]}A{bits[1]}, {panel_title}: filled = CPU, hollow = CUDA", r, other, styles)
    axes[-1].set_xlabel("wall time per run (s, log scale; includes the test-set evaluation)")
    fig.suptitle(title, fontsize=12, y=1 - 0.25 / fig.get_figheight())
    return fig


def plot_time(title: str, entries: pd.DataFrame, path: Path) -> bool:
    return _save(time_figure(title, entries), path)


def plot_all(entries: pd.DataFrame, out_dir: Path, titles: dict | None = None) -> dict[tuple[str, str], dict]:
    """Per teacher: {(model, dataset): {"bits": path, "time": path}} for the figures drawn."""
    paths: dict[tuple[str, str], dict] = {}
    for (model, dataset), rows in entries.groupby(["model", "dataset"], sort=True):
        if not model:
            continue
        title = f"{(titles or {}).get((model, dataset), model)}: {model} / {dataset}"
        drawn = {}
        if plot_teacher(title, rows, out_dir / f"{model}-{dataset}.png"):
            drawn["bits"] = out_dir / f"{model}-{dataset}.png"
        if plot_time(title, rows, out_dir / f"{model}-{dataset}-time.png"):
            drawn["time"] = out_dir / f"{model}-{dataset}-time.png"
        if drawn:
            paths[(model, dataset)] = drawn
    return paths
