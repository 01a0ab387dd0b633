"""The figures of `make tables`: one panel per family x convention x schedule, distinct styles, collapsed runs
marked without stretching the axis, the papers in a panel of their own, and drop vs wall time."""

import json
from pathlib import Path

import pandas as pd
from PIL import Image

from dfqbench import plots, tables
from dfqbench.results.entries import ENTRY_COLUMNS

FP32 = 88.0


def _entry(method, bits, top1, convention="gdfq", schedule="", device="cpu", variant="", std=float("nan"),
           n_seeds=1, source="reproduced", wall=10.0, fp32=FP32, **extra):
    row = {c: "" for c in ENTRY_COLUMNS}
    row.update({"source": source, "model": "net", "dataset": "cifar10", "method": method, "variant": variant,
                "config": method, "convention": convention, "schedule": schedule, "device": device,
                "family": ("training" if schedule else "post-training") if source == "reproduced" else "",
                "wbit": bits, "abit": bits, "mixed_precision": False, "n_test": 10000, "n_seeds": n_seeds,
                "fp32_top1": fp32, "top1_mean": top1, "top1_std": std, "drop_mean": fp32 - top1,
                "drop_std": std, "wall_s": wall, "quantize_s": wall, **extra})
    return row


def _entries():
    rows = [_entry(m, b, t) for m in ("rtn", "zeroq", "dsg") for b, t in ((8, 87.9), (4, 84.0))]
    rows += [_entry("squant", 4, 86.0, convention="squant")]                       # own preset: "other" panel
    rows += [_entry("gdfq", 4, 83.0, schedule="cpu", std=0.4, n_seeds=3, wall=600.0),
             _entry("gdfq", 4, 83.5, schedule="cpu", device="cuda", wall=150.0),
             _entry("qimera", 4, 84.0, schedule="cpu", variant="ait", wall=700.0),
             _entry("zaq", 4, 10.3, schedule="cpu", wall=3000.0)]                  # collapsed
    rows += [_entry("zeroq", 4, 79.3, source="reported", fp32=93.9, paper="ZeroQ (CVPR 2020)", notes="re-run"),
             _entry("zeroq", 5, 91.3, source="reported", fp32=93.9, paper="ZeroQ (CVPR 2020)", notes="re-run")]
    return pd.DataFrame(rows)


def test_panels_split_by_family_convention_and_schedule():
    ours = _entries().query("source == 'reproduced'")
    got = [(title, sorted(set(rows.method)), other) for title, rows, other in plots.panels(plots._uniform(ours))]
    assert got == [("post-training, convention gdfq", ["dsg", "rtn", "zeroq"], False),
                   ("post-training, other conventions / schedules (in brackets)", ["squant"], True),
                   ("training, convention gdfq, schedule cpu", ["gdfq", "qimera", "zaq"], False)]


def test_styles_are_distinct_and_stable():
    keys = [(f"m{i}", "") for i in range(30)]
    styles = plots.style_map(keys)
    assert len(set(styles.values())) == 30                                   # no two methods look the same
    assert len({styles[k][0] for k in keys[:20]}) == 20                      # 20 in a row: 20 colours
    assert plots.style_map(keys[:3] + keys[:3]) == {k: styles[k] for k in keys[:3]}


def test_collapsed_runs_are_marked_and_do_not_stretch_the_axis():
    fig = plots.teacher_figure("net", _entries())
    training = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("training"))
    lo, hi = training.get_ylim()
    assert 10.3 < lo < 83.0 - 0.4 and hi <= FP32 + plots.HEADROOM             # ZAQ's 10.3 is below the axis
    texts = [t.get_text() for t in training.texts]
    assert texts == ["collapsed:\nzaq 10.3"]
    labels = [t.get_text() for t in training.get_legend().get_texts()]
    assert labels == ["gdfq", "gdfq (cuda)", "qimera + ait", "zaq", f"FP32 {FP32:.2f}"]
    papers = fig.axes[-1]
    assert papers.get_title(loc="left").startswith("reported by the papers")
    assert [t.get_text() for t in papers.get_legend().get_texts()] == ["zeroq: ZeroQ (CVPR 2020), re-run", "FP32 (papers) 93.90"]
    ours_titles = [ax.get_title(loc="left") for ax in fig.axes[:-1]]
    assert all("dfqbench runs" in t for t in ours_titles) and len(fig.axes) == 4


def test_drop_vs_wall_time_uses_the_bit_width_with_most_runs():
    entries = _entries()
    assert plots.time_bits(entries.query("source == 'reproduced'")) == (4, 4)
    fig = plots.time_figure("net", entries)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title(loc="left").startswith("W4A4, convention gdfq")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "zaq [cpu]: drop 77.7, collapsed" in labels and "gdfq (cuda) [cpu]" in labels
    assert ax.get_ylim()[1] < 77.7                                            # the collapsed point is clipped


def _record(root: Path, model: str, method: str, quant: str, bits: int, seed: int, top1: float, **extra):
    fields = {"status": "done", "model": model, "dataset": "cifar10", "method": method, "quant": quant,
              "wbit": bits, "abit": bits, "seed": seed, "fp32_top1": 87.0, "top1": top1, "top5": 99.0,
              "drop": 87.0 - top1, "n_test": 10000, "checkpoint_sha256": model, "device": "cpu",
              "config_hash": f"{model}-{method}-{quant}-{bits}-{seed}", "wall_time_s": 20.0 + seed, **extra}
    path = root / model / quant / method / f"w{bits}a{bits}-s{seed}" / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(fields))


def test_make_tables_writes_readable_pngs_linked_from_both_pages(tmp_path):
    a, b, results = tmp_path / "sweep_a", tmp_path / "sweep_b", tmp_path / "results"
    for bits, top1 in ((8, 86.9), (6, 86.8), (4, 84.0)):
        _record(a, "resnet20_cifar10", "rtn", "gdfq", bits, 0, top1)
    for seed, top1 in ((0, 83.0), (1, 85.0)):  # two seeds in two roots: one point with an error bar
        _record(a if seed == 0 else b, "resnet20_cifar10", "zeroq", "gdfq", 4, seed, top1)
    _record(b, "resnet20_cifar10", "dsg", "gdfq", 4, 0, 83.5)
    tables.main([str(a), str(b), "--results", str(results), "--reported", str(tmp_path / "none")])
    for name in ("resnet20_cifar10-cifar10.png", "resnet20_cifar10-cifar10-time.png"):
        with Image.open(results / "plots" / name) as image:
            assert image.format == "PNG" and image.width > 500 and image.height > 300
            image.verify()
        assert f"](plots/{name})" in (results / "README.md").read_text()
    md = (results / "baselines.md").read_text()
    section = md.split("`resnet20_cifar10` / `cifar10`", 1)[1].split("\n## ", 1)[0]
    assert "plots/resnet20_cifar10-cifar10.png" in section


def test_a_teacher_with_nothing_to_draw_gets_no_plot(tmp_path):
    results = tmp_path / "results"
    _record(tmp_path / "runs", "somenet", "fp32", "gdfq", 32, 0, 90.0)  # fp32 only, no paper rows
    tables.main([str(tmp_path / "runs"), "--results", str(results), "--reported", str(tmp_path / "none")])
    assert not list((results / "plots").glob("somenet-*.png")) if (results / "plots").exists() else True
    assert "plots/somenet" not in (results / "baselines.md").read_text()
