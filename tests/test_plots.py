"""`python -m dfqbench.tables ROOT1 ROOT2`: tables and top-1 vs bit-width plots over several sweep roots."""

import json
from pathlib import Path

import pandas as pd
from PIL import Image

from dfqbench import tables

REPO = Path(__file__).resolve().parents[1]


def _record(root: Path, model: str, dataset: str, method: str, quant: str, bits: int, seed: int, top1: float):
    fields = {"status": "done", "model": model, "dataset": dataset, "method": method, "quant": quant,
              "wbit": bits, "abit": bits, "seed": seed, "fp32_top1": 87.66, "top1": top1, "top5": 99.0,
              "drop": 87.66 - top1, "n_test": 10000, "checkpoint_sha256": model,
              "config_hash": f"{model}-{method}-{quant}-{bits}-{seed}"}
    path = root / model / quant / method / f"w{bits}a{bits}-s{seed}" / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(fields))


def test_tables_and_plots_cover_every_sweep_root(tmp_path):
    a, b, results = tmp_path / "sweep_a", tmp_path / "sweep_b", tmp_path / "results"
    _record(a, "resnet20_cifar10", "cifar10", "fp32", "gdfq", 32, 0, 87.66)
    for bits, top1 in ((8, 87.6), (6, 87.5), (4, 84.0)):
        _record(a, "resnet20_cifar10", "cifar10", "rtn", "gdfq", bits, 0, top1)
    for seed, top1 in ((0, 83.0), (1, 85.0)):  # two seeds in two roots: one point with an error bar
        _record(a if seed == 0 else b, "resnet20_cifar10", "cifar10", "zeroq", "brecq", 4, seed, top1)
    _record(b, "resnet20_cifar100", "cifar100", "rtn", "gdfq", 4, 0, 40.0)
    results.mkdir()
    for name in ("reported.csv", "reported_extra.csv"):
        (results / name).write_text((REPO / "results" / name).read_text())

    tables.main([str(a), str(b), "--results", str(results)])

    summary = pd.read_csv(results / "summary.csv")
    zeroq = summary[summary.method == "zeroq"].iloc[0]
    assert (zeroq.seeds, zeroq.top1_mean) == (2, 84.0)
    assert set(summary.model) == {"resnet20_cifar10", "resnet20_cifar100"}
    md = (results / "baselines.md").read_text()
    for model, dataset in (("resnet20_cifar10", "cifar10"), ("resnet20_cifar100", "cifar100")):
        png = results / "plots" / f"{model}-{dataset}.png"
        assert f"](plots/{model}-{dataset}.png)" in md
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 300
            image.verify()
    # the link sits under its own table, before the next table's heading
    section = md.split("`resnet20_cifar10` / `cifar10`", 1)[1].split("\n## ", 1)[0]
    assert "plots/resnet20_cifar10-cifar10.png" in section


def test_a_table_with_nothing_to_draw_gets_no_plot(tmp_path):
    results = tmp_path / "results"
    _record(tmp_path / "runs", "somenet", "cifar10", "fp32", "gdfq", 32, 0, 90.0)  # fp32 only, no paper rows
    tables.main([str(tmp_path / "runs"), "--results", str(results)])
    assert not (results / "plots").exists() or not list((results / "plots").glob("somenet-*.png"))
    assert "plots/somenet" not in (results / "baselines.md").read_text()
