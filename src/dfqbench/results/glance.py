"""results/README.md's first section: per teacher, its headline cell (the bit-width pair below 8 bits that the
most methods ran, on the full test set) as two short rankings, post-training and training, each under the
convention (and schedule) that holds the most of that family's methods there, with the official code's number
measured here beside every method that has one (results/parity.csv, the same cell).

Only numbers of one convention and schedule share a ranking (conventions change what is quantized); the grids
below it hold everything else.
"""

from __future__ import annotations

import pandas as pd

from .entries import collapsed
from .format import md_table, mean_std, seeds_label, spread_seeds
from .names import FIDELITY_LABELS, display, schedule_note
from .parity import short_verdict

TOP = 8  # rows per ranking: the rest is one link away, in the grid of the same convention


def _methods_per(rows: pd.DataFrame, keys: list[str]) -> pd.Series:
    """How many distinct (method, variant) each value of `keys` holds."""
    return rows.groupby(keys).apply(lambda g: len(set(zip(g.method, g.variant))), include_groups=False)


def headline_bits(rows: pd.DataFrame, parity: pd.DataFrame | None = None) -> tuple[int, int] | None:
    """The (W, A) below 8 bits (W8A8 is near-lossless for every method) that the most methods and variants ran;
    ties go to the pair with more official-code runs (`parity` rows), then to the fewer bits. None when no entry
    is below 8 bits."""
    low = rows[(rows.wbit < 8) | (rows.abit < 8)]
    if low.empty:
        return None
    counts = _methods_per(low, ["wbit", "abit"])

    def checked(wa) -> int:
        if parity is None or parity.empty:
            return 0
        return int(((parity.wbit.astype(int) == wa[0]) & (parity.abit.astype(int) == wa[1])).sum())
    return max(counts.index, key=lambda wa: (counts[wa], checked(wa), -(wa[0] + wa[1]), -wa[0]))


def _official(entry, parity: pd.DataFrame) -> str:
    """'<mean> ± <std> (agrees)' or '<mean> ± <std> (gap +<points>, see parity.md)': the official code's top-1 in the
    parity row of the entry's exact cell (its device too, where the row names one); '' when there is none."""
    if parity.empty:
        return ""
    same = parity[(parity.method.astype(str) == entry.config) & (parity.quant.astype(str) == entry.convention)
                  & (parity.schedule.astype(str) == (entry.schedule or "")) & (parity.wbit.astype(int) == entry.wbit)
                  & (parity.abit.astype(int) == entry.abit) & (parity.model.astype(str) == entry.model)]
    same = same[same.device.astype(str).isin(["", entry.device])]  # a row that names its device: that device
    if same.empty:
        return ""
    r = next(same.itertuples())
    n = pd.to_numeric(r.n_seeds, errors="coerce")
    verdict = short_verdict(r, list(parity.itertuples()))
    verdict = "agrees" if verdict == "yes" else verdict.removeprefix("no: ") + ", see parity.md"
    return f"{mean_std(r.official_top1_mean, r.official_top1_std, n)} ({verdict})"


def _ranking(rows: pd.DataFrame, parity: pd.DataFrame) -> pd.DataFrame:
    rows = rows.sort_values("top1_mean", ascending=False, kind="stable").head(TOP)
    return pd.DataFrame([{
        "#": str(i), "Method": display(r.method, r.variant) + FIDELITY_LABELS.get(r.fidelity, ""),
        "Device": r.device,
        "Top-1": mean_std(r.top1_mean, r.top1_std, spread_seeds(r.n_seeds, r.deterministic))
        + (" collapsed" if collapsed(r.top1_mean, r.fp32_top1) else ""),
        "Seeds": seeds_label(r.n_seeds, r.deterministic),
        "Official code, run here": _official(r, parity)} for i, r in enumerate(rows.itertuples(), 1)])


def _largest(rows: pd.DataFrame, keys: list[str]) -> tuple:
    """The value of `keys` shared by the most methods and variants (ties: the first in sort order)."""
    counts = _methods_per(rows, keys)
    return max(sorted(counts.index), key=lambda k: counts[k])


def teacher_glance(rows: pd.DataFrame, parity: pd.DataFrame) -> list[str]:
    """The at-a-glance lines of one teacher's reproduced entries (empty when it has no cell below 8 bits)."""
    rows = rows[(rows.method != "fp32") & ~rows.mixed_precision.astype(bool) & (rows.n_test == rows.n_test.max())]
    bits = headline_bits(rows, parity)
    if bits is None:
        return []
    w, a = bits
    cell = rows[(rows.wbit == w) & (rows.abit == a)]
    parts = []
    for family in ("post-training", "training"):
        fam = cell[cell.family == family]
        if fam.empty:
            continue
        conv, sched = _largest(fam, ["convention", "schedule"])
        chosen = fam[(fam.convention == conv) & (fam.schedule == sched)]
        what = f"schedule `{sched}`" if sched else "no training"
        more = len(chosen) - min(len(chosen), TOP)
        parts += [f"**{family.capitalize()}, W{w}A{a}, convention `{conv}`, {what}**: the best {min(len(chosen), TOP)} "
                  f"of {len(chosen)}" + (f" ({more} more in the grid below)" if more else "") + ".", "",
                  *schedule_note(sched), md_table(_ranking(chosen, parity)), ""]
    return parts
