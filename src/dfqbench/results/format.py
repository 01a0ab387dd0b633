"""Cell formatting shared by the generated markdown pages."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd


def cell(value, digits: int = 2) -> str:
    """'' for a missing value, a float at `digits`, anything else as text."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def mean_std(mean, std, n_seeds) -> str:
    """'mean ± std' over two seeds or more, 'mean' alone for one (no std from one seed); two decimals."""
    if mean is None or pd.isna(mean):
        return ""
    spread = n_seeds is not None and not pd.isna(n_seeds) and n_seeds > 1 and not pd.isna(std)
    return f"{mean:.2f}" + (f" ± {std:.2f}" if spread else "")


def is_deterministic(flag) -> bool:
    """An entry's `deterministic` value as a bool (False for None or NaN: a paper's or official row)."""
    return flag is not None and not (isinstance(flag, float) and pd.isna(flag)) and bool(flag)


def spread_seeds(n_seeds, deterministic) -> float | None:
    """The seed count a cell's std is over: 1 for a deterministic method (its runs under other seeds, if any, are
    the same network), so that `mean_std` shows no ± 0.00."""
    return 1 if is_deterministic(deterministic) else n_seeds


def seeds_label(n_seeds, deterministic) -> str:
    """'det.' for a deterministic method's cell (one run stands for every seed), else the seed count."""
    if is_deterministic(deterministic):
        return "det."
    return "" if n_seeds is None or pd.isna(n_seeds) else str(int(n_seeds))


def md_table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True) if len(df) else "(none)"


def links(records: str, out_dir: Path) -> str:
    """Record paths (';'-separated) -> markdown links relative to out_dir, named by their seed ('s0', from the run
    folder 'w4a4-s0') or by their run folder."""
    parts = []
    for path in (p for p in str(records).split(";") if p):
        rel = os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())
        name = Path(path).parent.name
        seed = re.search(r"-(s\d+)$", name)
        parts.append(f"[{seed.group(1) if seed else name}]({Path(rel).as_posix()})")
    return " ".join(parts)
