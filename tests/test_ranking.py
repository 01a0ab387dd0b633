"""results/ranking.md: Kendall's tau-b against hand counts, a schedule's seed stability and the comparison of
two schedules on a small made-up set of runs."""

import math

import pandas as pd
import pytest

from dfqbench.results.ranking import across_schedules, kendall_tau_b, ranking_cells, render_ranking


def test_kendall_tau_b_against_hand_counts():
    assert kendall_tau_b([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    # one swapped neighbour pair in 4: 5 concordant, 1 discordant of 6 -> 4/6
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # a tie in a: pairs (0,2), (1,2) concordant, (0,1) tied in a only -> 2 / sqrt(2 * 3)
    assert kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(kendall_tau_b([1, 1], [1, 2])) and math.isnan(kendall_tau_b([1], [1]))


def _runs(table: dict, schedule: str = "cpu") -> pd.DataFrame:
    """{method: [top-1 of seed 0, 1, ...]} -> runs.csv-like rows (None: that seed did not run)."""
    return pd.DataFrame([{"model": "resnet20_cifar10", "dataset": "cifar10", "quant": "gdfq", "wbit": 4, "abit": 4,
                          "device": "cpu", "schedule": schedule, "config": m, "seed": s, "top1": v}
                         for m, values in table.items() for s, v in enumerate(values) if v is not None])


def test_seed_stability_and_ranks_of_one_schedule():
    # seed 0 orders a > b > c, seed 1 b > a > c, seed 2 a > b > c; c runs seeds 0 and 1 only
    runs = _runs({"a": [86.0, 85.0, 86.5], "b": [85.0, 85.5, 86.0], "c": [80.0, 81.0, None],
                  "d": [90.0, None, None]})  # d: one seed, no pair of its counts
    cell, = ranking_cells(runs)
    st = cell["stability"]
    # tau-b per seed pair: (0,1) over a,b,c (3 method pairs): 2 concordant, 1 discordant -> 1/3; (0,2) over a,b
    # (1 pair): 1; (1,2): -1; weighted by the method pairs: (3 x 1/3 + 1 - 1) / 5
    assert st["tau"] == pytest.approx(1 / 5) and st["seed_pairs"] == 3
    # a-b flips between seeds; a-c and b-c keep their order; d's pairs (one seed) are not counted
    assert (st["same_order"], st["method_pairs"]) == (2, 3)
    # a-b: 0.33 apart, within max(0.3, 2 x 0.76); a-c and b-c: 5 points apart
    assert st["separated"] == 2
    table = cell["table"].set_index("Method")
    assert table.loc["d", "Rank"] == "1" and table.loc["d", "Rank s0"] == "1" and table.loc["d", "Rank s1"] == ""
    assert table.loc["a", "Rank"] == "2" and table.loc["a", "Top-1"] == "85.83 ± 0.76"
    assert table.loc["b", "Rank s1"] == "1" and table.loc["c", "Rank s2"] == "" and table.loc["c", "Seeds"] == "2"


def test_two_schedules_compared_over_their_common_methods():
    short = _runs({"a": [86.0], "b": [85.0], "c": [84.0], "d": [83.0]}, "cpu")
    long = _runs({"a": [85.0], "b": [87.0], "c": [86.0]}, "cpu_long")
    runs = pd.concat([short, long, _runs({"x": [1.0]}, "")])  # a post-training run: not ranked
    cells = ranking_cells(runs)
    assert [c["key"]["schedule"] for c in cells] == ["cpu", "cpu_long"]
    row, = across_schedules(cells).to_dict("records")
    # over a, b, c: cpu orders a > b > c, cpu_long b > c > a: 1 concordant (b, c), 2 discordant -> -1/3
    assert row["Schedules"] == "cpu vs cpu_long" and row["Common methods"] == "3"
    assert row["Kendall tau-b of the mean rankings"] == "-0.33"
    assert row["Seed stability, first"] == row["Seed stability, second"] == "no shared seeds"
    text = render_ranking(runs)
    assert "schedule `cpu_long`" in text and "| cpu vs cpu_long" in text
    # one seed per method: no seed pair, and the page says so instead of an empty tau
    assert text.count("Seed stability: not measurable yet") == 2 and "tau-b  (" not in text


def test_seed_stability_across_schedules_counts_only_the_common_methods():
    # cpu: a and b swap between seeds, d (not run on cpu_long) keeps its place; cpu_long: c > a > b under both
    short = _runs({"a": [86.0, 85.0], "b": [85.0, 86.0], "c": [80.0, 80.0], "d": [79.0, 79.0]}, "cpu")
    long = _runs({"a": [87.0, 86.5], "b": [85.5, 85.7], "c": [88.0, 88.2]}, "cpu_long")
    cells = ranking_cells(pd.concat([short, long]))
    # over all four cpu methods: 6 pairs, a-b discordant -> tau-b 4/6; every pair but a-b (equal means) separated
    st = cells[0]["stability"]
    assert st["tau"] == pytest.approx(4 / 6) and (st["same_order"], st["separated"]) == (5, 5)
    row, = across_schedules(cells).to_dict("records")
    # over a, b, c: cpu's a-b flips (tau-b (2 - 1) / 3), a-c and b-c are separated (5.5 and 5.5 > 2 x 0.71);
    # cpu_long keeps all three, each separated (a-b: 1.15 > 2 x 0.35)
    assert row["Seed stability, first"] == "0.33 (1 seed pair; 2/3 kept, 2 separated)"
    assert row["Seed stability, second"] == "1.00 (1 seed pair; 3/3 kept, 3 separated)"
    # a-c and b-c are separated on both schedules, in opposite orders
    assert row["Separated by both, same order"] == "0/2"


def test_no_page_without_two_trained_methods():
    assert render_ranking(_runs({"a": [86.0, 85.0]})) is None
    assert render_ranking(pd.DataFrame()) is None
