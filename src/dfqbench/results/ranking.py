"""ranking.md: whether a training schedule ranks the training family the same way under every seed, and the way
a longer schedule does (the question behind `schedule=cpu` being a smoke budget).

Per cell (teacher, convention, bits, device, schedule) of the runs that trained (a schedule set), every method
with at least one finished seed: its mean top-1 and its rank by that mean; its rank under each seed that at
least two methods share. Seed stability: Kendall's tau-b between the rankings of every two seeds, over the
methods that ran both (1 = the same order, 0 = unrelated; their mean weighted by the method pairs each compares);
how many method pairs (those run under two seeds or more) keep their order under every shared seed; and how many
of those pairs the schedule separates (means more than max(0.3, 2 x the larger std) apart, parity's agreement
rule: near-ties flip with the seed on any budget). Across schedules of the same teacher, convention, bits and
device: tau-b between their mean rankings over the methods both ran, each one's seed stability over those
methods, and how many of the pairs both separate they order the same way. The stable schedule is the shortest
whose seeds agree with each other and with the longest schedule run.
"""

from __future__ import annotations

import itertools
import math

import pandas as pd

from .format import cell, mean_std, md_table
from .parity import TOLERANCE, agrees

CELL = ["model", "dataset", "quant", "wbit", "abit", "device"]


def kendall_tau_b(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two paired score lists (ties handled as tau-b does); NaN with fewer than 2 pairs or
    when one side is all ties."""
    concordant = discordant = only_a_tied = only_b_tied = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            only_a_tied += 1
        elif db == 0:
            only_b_tied += 1
        elif (da > 0) == (db > 0):
            concordant += 1
        else:
            discordant += 1
    untied_a = concordant + discordant + only_b_tied  # pairs that a orders
    untied_b = concordant + discordant + only_a_tied
    if untied_a == 0 or untied_b == 0:
        return float("nan")
    return (concordant - discordant) / math.sqrt(untied_a * untied_b)


def _trained(runs: pd.DataFrame) -> pd.DataFrame | None:
    """The runs that trained (a schedule set), device without its index ('cuda:0' -> 'cuda'); None if none."""
    if runs.empty or "schedule" not in runs:
        return None
    runs = runs.reset_index(drop=True)
    sched = runs.schedule.fillna("").astype(str)
    trained = runs.assign(schedule=sched, device=runs.device.astype(str).str.split(":").str[0])[sched != ""]
    return trained if len(trained) else None


def seed_stability(per_seed: pd.DataFrame) -> dict:
    """per_seed: index method, columns seed, values top-1 (NaN where a method lacks the seed). -> tau-b's mean over
    seed pairs (each weighted by the method pairs it compares), how many seed pairs, the method pairs ordered the
    same under every seed both ran, and how many pairs are separated."""
    taus = []  # (tau-b, method pairs compared): a seed pair over 2 methods says less than one over 6
    for s, t in itertools.combinations(per_seed.columns, 2):
        both = per_seed[[s, t]].dropna()
        if len(both) >= 2:
            taus.append((kendall_tau_b(both[s].tolist(), both[t].tolist()), math.comb(len(both), 2)))
    taus = [(x, w) for x, w in taus if not math.isnan(x)]
    same = total = separated = 0
    for m, n in itertools.combinations(per_seed.index, 2):
        diffs = (per_seed.loc[m] - per_seed.loc[n]).dropna()
        signs = {math.copysign(1, d) for d in diffs if d != 0}
        if len(diffs) >= 2 and signs:  # a pair seen under one seed only says nothing about stability
            total += 1
            same += len(signs) == 1
            separated += _separated(per_seed, m, n)
    tau = sum(x * w for x, w in taus) / sum(w for _, w in taus) if taus else float("nan")
    return {"tau": tau, "seed_pairs": len(taus),
            "same_order": same, "method_pairs": total, "separated": separated}


def _separated(per_seed: pd.DataFrame, m: str, n: str) -> bool:
    """Whether the mean top-1 of m and n differ by more than max(0.3, 2 x the larger std) (parity's agreement
    rule): a pair the schedule tells apart. Near-ties flip with the seed on any budget; the share of pairs a
    schedule separates is how much of its ranking means something."""
    a, b = per_seed.loc[m].dropna(), per_seed.loc[n].dropna()
    if len(a) < 2 or len(b) < 2:
        return False
    return not agrees(a.mean(), b.mean(), a.std(), b.std())


def _shared_seeds(per_seed: pd.DataFrame) -> list:
    """The seeds that two or more of per_seed's methods ran."""
    return [s for s in per_seed.columns if per_seed[s].notna().sum() >= 2]


def ranking_cells(runs: pd.DataFrame) -> list[dict]:
    """One dict per (cell, schedule) with at least two methods: its table, its seed stability."""
    trained = _trained(runs)
    if trained is None:
        return []
    out = []
    for key, group in trained.groupby([*CELL, "schedule"], sort=True):
        per_seed = group.pivot_table(index="config", columns="seed", values="top1", aggfunc="mean")
        if len(per_seed) < 2:
            continue
        shared = _shared_seeds(per_seed)
        means = group.groupby("config").top1.agg(["mean", "std", "count"]).sort_values("mean", ascending=False)
        ranks = {s: per_seed[s].rank(ascending=False, method="min") for s in shared}
        rows = [{"Method": config, "Seeds": str(int(r["count"])),
                 "Top-1": mean_std(r["mean"], None if math.isnan(r["std"]) else r["std"], int(r["count"])),
                 "Rank": str(i + 1),
                 **{f"Rank s{s}": "" if math.isnan(ranks[s].get(config, math.nan)) else str(int(ranks[s][config]))
                    for s in shared}}
                for i, (config, r) in enumerate(means.iterrows())]
        out.append({"key": dict(zip([*CELL, "schedule"], key)), "table": pd.DataFrame(rows),
                    "means": means["mean"], "per_seed": per_seed, "stability": seed_stability(per_seed[shared])})
    return out


def _common_stability(cell_: dict, common: list[str]) -> str:
    """A schedule's seed stability over `common` methods only (two schedules compared like for like: a schedule
    that ran more methods has more pairs to flip), as 'tau-b (seed pairs; method pairs kept, separated)'."""
    per_seed = cell_["per_seed"].loc[common]
    st = seed_stability(per_seed[_shared_seeds(per_seed)])
    if not st["seed_pairs"]:
        return "no shared seeds"
    n = st["seed_pairs"]
    return (f"{cell(st['tau'])} ({n} seed pair{'s' * (n != 1)}; {st['same_order']}/{st['method_pairs']} kept, "
            f"{st['separated']} separated)")


def _separated_agreement(a: dict, b: dict, common: list[str]) -> str:
    """'k/n': of the method pairs both schedules separate, how many they order the same way."""
    same = both = 0
    for m, n in itertools.combinations(common, 2):
        if _separated(a["per_seed"], m, n) and _separated(b["per_seed"], m, n):
            both += 1
            same += (a["means"][m] > a["means"][n]) == (b["means"][m] > b["means"][n])
    return f"{same}/{both}"


def across_schedules(cells: list[dict]) -> pd.DataFrame:
    """tau-b between the mean rankings of every two schedules of the same cell, over their common methods, and
    each schedule's seed stability over those methods."""
    rows = []
    by_cell: dict[tuple, list[dict]] = {}
    for c in cells:
        by_cell.setdefault(tuple(c["key"][k] for k in CELL), []).append(c)
    for key, group in by_cell.items():
        for a, b in itertools.combinations(group, 2):
            common = sorted(set(a["means"].index) & set(b["means"].index))
            if len(common) < 2:
                continue
            tau = kendall_tau_b([a["means"][m] for m in common], [b["means"][m] for m in common])
            rows.append({"Teacher": key[0], "Convention": key[2], "W": str(key[3]), "A": str(key[4]),
                         "Device": key[5], "Schedules": f"{a['key']['schedule']} vs {b['key']['schedule']}",
                         "Common methods": str(len(common)), "Kendall tau-b of the mean rankings": cell(tau),
                         "Seed stability, first": _common_stability(a, common),
                         "Seed stability, second": _common_stability(b, common),
                         "Separated by both, same order": _separated_agreement(a, b, common)})
    return pd.DataFrame(rows)


def render_ranking(runs: pd.DataFrame) -> str | None:
    """ranking.md's text, or None when no cell has two trained methods."""
    cells = ranking_cells(runs)
    if not cells:
        return None
    parts = ["# The training family's ranking per schedule", "",
             "Generated by `make tables` from the finished records of runs with a training schedule: per teacher, "
             "convention, bits, device and schedule, each method's mean top-1 (%) and rank, and its rank under each "
             "seed that two or more methods share. Seed stability: Kendall's tau-b between the rankings of every "
             "two seeds over the methods that ran both (1 = the same order; mean over seed pairs, each weighted by "
             "the method pairs it compares), how many method pairs keep their order under every shared seed, and "
             f"how many the schedule separates (means more than max({TOLERANCE}, 2 x the larger std) apart, "
             "parity's agreement rule: closer pairs are near-ties that "
             "flip with the seed on any budget). A schedule whose ranking means something has tau near 1 between "
             "its seeds and with the longest schedule run, and separates many pairs (`Across schedules`, at the "
             "end).", ""]
    for c in cells:
        k, st = c["key"], c["stability"]
        parts += [f"## `{k['model']}`, convention `{k['quant']}`, W{k['wbit']}A{k['abit']}, {k['device']}, "
                  f"schedule `{k['schedule']}`", "",
                  _stability_line(st), "", md_table(c["table"]), ""]
    across = across_schedules(cells)
    parts += ["## Across schedules", "",
              "Over the methods both schedules ran: Kendall's tau-b between their mean rankings, and each schedule's "
              "seed stability over those methods only (tau-b's weighted mean over its seed pairs; method pairs "
              "kept in the same order under every shared seed; pairs separated: means more than "
              f"max({TOLERANCE}, 2 x the larger std) apart), so that two schedules are compared on the same "
              "pairs; and of the pairs both schedules separate, how many they order the same way.", ""]
    parts += [md_table(across), ""] if len(across) else [
        "Only one schedule has two or more trained methods in a cell so far: nothing to compare yet.", ""]
    return "\n".join(parts)


def _stability_line(st: dict) -> str:
    """The cell's seed-stability sentence; a cell with no two seeds shared by two methods says so."""
    if not st["seed_pairs"]:
        return "Seed stability: not measurable yet (no two seeds that two or more methods both ran)."
    n = st["seed_pairs"]
    return (f"Seed stability: tau-b {cell(st['tau'])} (weighted mean over {n} seed pair{'s' * (n != 1)}); "
            f"{st['same_order']} of {st['method_pairs']} method pairs in the same order under every shared seed; "
            f"{st['separated']} of the {st['method_pairs']} separated (means more than max({TOLERANCE}, 2 x the "
            f"larger std) apart).")
