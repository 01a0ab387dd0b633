"""results/parity.md: each method's official code beside dfqbench on the same cell (results/parity.csv).

Agreement: |dfqbench - official| <= max(0.3, 2 x the larger std) top-1 points; otherwise the row gives the gap
(dfqbench minus official) and points to its CSV note, printed under the table (a note is often a paragraph: in
the table it would widen every row). A gap that a sibling row of the same cell closes names that row.
"""

from __future__ import annotations

import math

import pandas as pd

from .entries import PARITY_FILE
from .format import cell, mean_std, md_table
from .names import display, split_run_method

TOLERANCE = 0.3  # top-1 points: the floor of the agreement band


def agrees(dfqbench: float, official: float, dfqbench_std: float, official_std: float) -> bool:
    stds = [s for s in (dfqbench_std, official_std) if s is not None and not math.isnan(s)]
    return abs(dfqbench - official) <= max(TOLERANCE, 2 * max(stds, default=0.0))


def _diverged(row) -> int:
    """How many dfqbench seeds of the row diverged (the optional `dfqbench_diverged` column)."""
    n = pd.to_numeric(getattr(row, "dfqbench_diverged", ""), errors="coerce")
    return 0 if pd.isna(n) else int(n)


def _has_note(row) -> bool:
    return isinstance(row.note, str) and bool(row.note.strip())


def _agrees(row) -> bool:
    return (not pd.isna(row.dfqbench_top1_mean) and not pd.isna(row.official_top1_mean)
            and agrees(row.dfqbench_top1_mean, row.official_top1_mean, row.dfqbench_top1_std, row.official_top1_std))


_CELL = ("model", "schedule", "wbit", "abit", "official_repo")
_SIDE = {"official": ("official_top1_mean", "official_top1_std"),
         "dfqbench": ("dfqbench_top1_mean", "dfqbench_top1_std")}


def _same(a, b, keys) -> bool:
    """Equal values (two empty cells, NaN in pandas, count as equal)."""
    return all(getattr(a, k) == getattr(b, k) or (pd.isna(getattr(a, k)) and pd.isna(getattr(b, k))) for k in keys)


def _same_side(a, b, side: str) -> bool:
    return _same(a, b, _SIDE[side])


def agreeing_sibling(row, rows) -> object | None:
    """A row that measures this row's gap: the same cell (teacher, schedule, bits, official repository), one side
    the same numbers (the same runs), the other side changed (a dfqbench preset or variant, or an ablation of the
    official code), and it agrees. Its method is this row's method or extends it (`zaq-alpha0` ->
    `zaq-alpha0-relu_per_use`)."""
    base = str(row.method)
    for other in rows:
        if other.line == row.line or not _agrees(other):
            continue
        if not _same(other, row, _CELL):
            continue
        if str(other.method) != base and not str(other.method).startswith(base + "-"):
            continue
        if _same_side(other, row, "official") != _same_side(other, row, "dfqbench"):
            return other
    return None


def _verdict(row, rows=()) -> tuple[str, bool]:
    """(the Agrees cell, whether the row's note belongs under the table: every verdict other than yes). A gap
    that a sibling row closes (`agreeing_sibling`) names it: the change between the two rows is its measured
    cause."""
    if _diverged(row) and pd.isna(row.dfqbench_top1_mean):
        verdict = "dfqbench diverged in every seed"
    elif pd.isna(row.dfqbench_top1_mean) or pd.isna(row.official_top1_mean):
        return "not run", False
    elif _agrees(row):
        return "yes", False
    else:
        verdict = f"no: gap {row.dfqbench_top1_mean - row.official_top1_mean:+.2f}"
        sibling = agreeing_sibling(row, rows)
        if sibling is not None:
            changed = "official code changed" if _same_side(sibling, row, "dfqbench") else "dfqbench changed"
            verdict += (f"; closed by {display(*split_run_method(str(sibling.method)))} {sibling.quant} "
                        f"({changed}, {_row_ref(sibling)}: agrees)")
    return (f"{verdict} (note {_row_ref(row)})", True) if _has_note(row) else (verdict, False)


def short_verdict(row, rows=()) -> str:
    """'yes', 'no: gap +1.23', 'not run' or 'dfqbench diverged in every seed': the Agrees cell without the note and
    sibling references (results/README.md's at-a-glance rankings)."""
    return _verdict(row, rows)[0].split(" (note")[0].split(";")[0]


def _row_ref(row) -> str:
    return f"{PARITY_FILE}:{row.line}"


def parity_table(parity: pd.DataFrame) -> pd.DataFrame:
    rows, all_rows = [], list(parity.itertuples())
    for r in all_rows:
        method, variant = split_run_method(str(r.method))
        n = None if pd.isna(pd.to_numeric(r.n_seeds, errors="coerce")) else int(r.n_seeds)
        rows.append({
            "Method": display(method, variant), "Teacher": cell(r.model) or "not stated",
            "Convention": r.quant, "Schedule": r.schedule or "post-training", "W": str(r.wbit), "A": str(r.abit),
            "Device": cell(r.device) or "not stated", "Seeds": cell(n),
            "Official top-1": mean_std(r.official_top1_mean, r.official_top1_std, n),
            "dfqbench top-1": (f"diverged ({_diverged(r)} seeds)" if _diverged(r) and pd.isna(r.dfqbench_top1_mean)
                               else mean_std(r.dfqbench_top1_mean, r.dfqbench_top1_std, n)
                               + (f", {_diverged(r)} more diverged" if _diverged(r) else "")),
            "Official s": cell(r.official_s, 0), "dfqbench s": cell(r.dfqbench_s, 0),
            "Agrees": _verdict(r, all_rows)[0],
            "Official code": f"{r.official_repo}@{str(r.official_commit)[:10]}", "Row": _row_ref(r)})
    return pd.DataFrame(rows)


def _notes(parity: pd.DataFrame) -> list[str]:
    """The CSV notes of the rows whose verdict is not "yes", one item per row, under the table."""
    items = [f"- **{_row_ref(r)}** ({display(*split_run_method(str(r.method)))}, {r.quant}, W{r.wbit}A{r.abit}): "
             f"{r.note.strip()}" for r in parity.itertuples() if _verdict(r)[1]]
    return ["", "## Notes of the rows that do not agree", "", *items] if items else []


def parity_summary(parity: pd.DataFrame) -> str:
    """One sentence at a glance: how many rows and methods, how many agree, how many gaps a sibling row closes
    (their cause measured), and which rows differ with no such row."""
    rows = list(parity.itertuples())
    kinds = {"agree": [], "closed": [], "open": [], "not run": []}
    for r in rows:
        verdict = _verdict(r, rows)[0]
        kind = verdict if verdict in ("yes", "not run") else "closed" if agreeing_sibling(r, rows) else "open"
        kinds["agree" if kind == "yes" else kind].append(r)

    def count(items, one, many):
        return f"{len(items)} {one if len(items) == 1 else many}"

    methods = {split_run_method(str(r.method))[0] for r in rows}
    text = (f"{count(rows, 'row', 'rows')} over {count(methods, 'method', 'methods')}: "
            f"{count(kinds['agree'], 'agrees', 'agree')} within noise, {count(kinds['closed'], 'differs', 'differ')} "
            f"with the cause measured (a row of the same cell that agrees closes the gap)")
    if kinds["open"]:
        text += (f", {count(kinds['open'], 'differs', 'differ')} with no such row "
                 f"({', '.join(_row_ref(r) for r in kinds['open'])})")
    if kinds["not run"]:
        text += f", {len(kinds['not run'])} not run"
    return text + "."


def render_parity(parity: pd.DataFrame) -> str:
    return "\n".join([
        "# Official code beside dfqbench", "",
        f"Generated by `make tables` from `{PARITY_FILE}`: each method's official code and dfqbench run here on "
        "the same cell, top-1 (%) mean ± std over the Seeds column. Agrees: |dfqbench - official| <= "
        f"max({TOLERANCE}, 2 x the larger std); otherwise the gap (dfqbench minus official) and the row's note, "
        "listed under the table. \"closed by\" names a row of the same cell that agrees with one side the same "
        "runs (a dfqbench preset or variant, or an ablation of the official code): the change between the two "
        "rows is the gap's measured cause. Every row's full note (settings, seeds, records) is its line in the CSV.",
        "", f"**At a glance:** {parity_summary(parity)}", "", md_table(parity_table(parity)), *_notes(parity), ""])
