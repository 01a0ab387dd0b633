"""results/README.md: the page to look at. Per teacher, the figures and one grid per convention x schedule
(rows: method, variant, device; columns: bit-widths) with the best top-1 of each column in bold; the papers'
numbers in a folded grid of their own (drops: their teachers differ), lowest drop in bold."""

from __future__ import annotations

import pandas as pd

from .entries import collapsed, table_keys, teachers_most_run_first
from .format import md_table, mean_std, seeds_label, spread_seeds
from .glance import teacher_glance
from .names import FIDELITY_LABELS, display, legend, schedule_note
from .parity import parity_summary


def _bits(df: pd.DataFrame) -> list[tuple[int, int]]:
    pairs = set(zip(df.wbit.astype(int), df.abit.astype(int)))
    # W = A first, from high to low bits, then the others
    return sorted(pairs, key=lambda p: (p[0] != p[1], -p[0], -p[1]))


def _bold_best(values: dict, best) -> dict:
    return {k: (f"**{v}**" if k in best else v) for k, v in values.items()}


def grid(rows: pd.DataFrame, value: str, higher_is_better: bool, row_keys: list[str]) -> pd.DataFrame:
    """A pivot of entries: one line per row_keys, one column per bit-width, 'mean ± std (n)'; the best entry of
    each column (two rows or more; mixed-precision rows never count) in bold."""
    bits = _bits(rows)
    best = set()
    for w, a in bits:
        col = rows[(rows.wbit == w) & (rows.abit == a) & ~rows.mixed_precision.astype(bool)]
        if col[value].notna().sum() < 2:
            continue
        target = col[value].max() if higher_is_better else col[value].min()
        best |= {(tuple(r[k] for k in row_keys), (w, a)) for _, r in col[col[value] == target].iterrows()}
    out = []
    for key, line in rows.groupby(row_keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        entry = dict(zip(row_keys, key))
        label = display(entry["method"], entry["variant"]) + FIDELITY_LABELS.get(entry.get("fidelity"), "")
        head = {"Method": label, **{k.capitalize(): entry[k] for k in row_keys
                                    if k not in ("method", "variant", "fidelity")}}
        cells = {}
        for w, a in bits:
            c = line[(line.wbit == w) & (line.abit == a)]
            texts = []
            for r in c.itertuples():
                seeds = seeds_label(r.n_seeds, r.deterministic)
                text = mean_std(getattr(r, value), r.top1_std if value == "top1_mean" else r.drop_std,
                                spread_seeds(r.n_seeds, r.deterministic))
                text += f" ({seeds})" if seeds else ""
                text += " collapsed" if collapsed(r.top1_mean, r.fp32_top1) else ""
                texts.append(text + (" (MP)" if r.mixed_precision else ""))
            cells[(w, a)] = " / ".join(texts)
        cells = _bold_best(cells, {b for k, b in best if k == key})
        out.append({**head, **{f"W{w}A{a}": cells[(w, a)] for w, a in bits}})
    return pd.DataFrame(out)


def teacher_board(model: str, dataset: str, title: str, entries: pd.DataFrame, teachers: pd.DataFrame,
                  figures: dict, parity: pd.DataFrame | None = None) -> list[str]:
    t = teachers[(teachers.model == model) & (teachers.dataset == dataset)]
    fp32 = (f"FP32 top-1: {t.reproduced.iloc[0] or 'no runs'} (our teacher, from the records); "
            f"{t.reported.iloc[0] or 'none'} (the papers' teachers).") if len(t) else ""
    parts = [f"## {title}: `{model}` / `{dataset}`", "", fp32, ""]
    if legend(entries.method):  # before the rankings: it says which rows are not data-free
        parts += [legend(entries.method), ""]
    mine = parity[parity.model.astype(str) == model] if parity is not None and len(parity) else pd.DataFrame()
    parts += teacher_glance(entries[entries.source == "reproduced"], mine)
    for kind, alt in (("bits", "top-1 vs bit-width per family"), ("time", "drop vs wall time")):
        if figures.get(kind):
            parts += [f"![{model}: {alt}]({figures[kind]})", ""]
    ours = entries[(entries.source == "reproduced") & (entries.method != "fp32")]
    for conv, sched, n_test in table_keys(ours):
        rows = ours[(ours.convention == conv) & (ours.schedule == sched) & (ours.n_test == n_test)]
        what = f"schedule `{sched}`" if sched else "post-training"
        parts += [f"### Convention `{conv}`, {what}, {int(n_test)} test images", "", *schedule_note(sched),
                  md_table(grid(rows, "top1_mean", True, ["method", "variant", "device", "fidelity"])), ""]
    papers = entries[entries.source == "reported"]
    if len(papers):
        grid_papers = grid(papers, "drop_mean", False, ["method", "variant", "paper", "notes"])
        parts += ["<details><summary>The papers' reported drops on this teacher (FP32 minus top-1 on their own "
                  "teachers; lowest in bold; MP = mixed precision)</summary>", "", md_table(grid_papers), "",
                  "</details>", ""]
    return parts


def render_leaderboard(entries: pd.DataFrame, teachers: pd.DataFrame, titles: dict, figures: dict,
                       n_runs: int, parity: pd.DataFrame | None = None) -> str:
    """`figures`: {(model, dataset): {"bits": link, "time": link}}; `parity`: results/parity.csv as read
    (entries.load_parity), for the at-a-glance rankings' official-code column."""
    parts = ["# dfqbench results", "",
             f"Generated by `make tables` from {n_runs} finished run records: top-1 (%) of dfqbench's own runs, "
             "`mean ± std (seeds)`, one grid per teacher x convention x schedule; rows split by device (CPU and "
             "CUDA runs are never averaged together); `(det.)`: a deterministic method, which takes no seed (any seed "
             "gives the same network: `tests/test_determinism.py`), so one run and no std. **Bold**: the best "
             "top-1 of its column. Every number, its "
             "records and the papers' numbers row by row: [baselines.md](baselines.md)"
             + " (official code beside dfqbench: [parity.md](parity.md))" * bool((entries.source == "official").any())
             + ".", "",
             *([f"Each method's official code, run here beside dfqbench ([parity.md](parity.md)): "
                f"{parity_summary(parity)}", ""]
               if parity is not None and len(parity) else []),
             "Each teacher's section opens with its headline cell at a glance: the bit-width pair below 8 bits "
             "that the most methods ran, ranked per family under the convention and schedule most of them share, "
             "with the official code's number measured here on the same cell (`parity.md`) where there is one.",
             "",
             "In the figures: one panel per family (post-training, training) and convention and schedule; CUDA runs "
             "hollow; a collapsed run (top-1 below half the FP32) is a red triangle at the panel's bottom edge, "
             "labelled with its value; the papers' numbers in a panel of their own.", ""]
    ran = entries[entries.source == "reproduced"][["model", "dataset"]].drop_duplicates()
    for model, dataset in teachers_most_run_first(entries[entries.source == "reproduced"]):
        rows = entries[(entries.model == model) & (entries.dataset == dataset)]
        parts += teacher_board(model, dataset, titles.get((model, dataset), f"{model} ({dataset})"), rows,
                               teachers, figures.get((model, dataset), {}), parity)
    others = entries[(entries.source == "reported") & ~entries.model.isin(ran.model)][["model"]].drop_duplicates()
    if len(others):
        parts += ["## Teachers with the papers' numbers only", "",
                  ", ".join(f"`{m}`" for m in sorted(others.model)) + ": see [baselines.md](baselines.md).", ""]
    return "\n".join(parts)
