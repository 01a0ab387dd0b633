"""Reported numbers parsed from the seed document, and the aggregated markdown tables."""

import json
from pathlib import Path

import pandas as pd
import pytest

from dfqbench import tables
from dfqbench.reported import load_reported, method_key, parse_seed

REPO = Path(__file__).resolve().parents[1]
SEED = REPO.parent / "shared" / "seeds" / "data-free-quantization-papers-and-baselines.md"


def _seed_rows(text: str) -> int:
    body = text.split("# Baselines", 1)[1]
    rows = [l for l in body.splitlines() if l.startswith("| ") and not l.startswith("| Method")]
    return len([r for r in rows if not set(r.replace("|", "").strip()) <= {"-", ":", " "}])


def test_every_seed_baseline_row_is_in_the_reported_file():
    if not SEED.exists():
        pytest.skip("seed document not found")
    text = SEED.read_text()
    parsed = parse_seed(text)
    assert len(parsed) == _seed_rows(text) == 146
    committed = pd.read_csv(REPO / "results" / "reported.csv", keep_default_na=False)
    assert len(committed) == len(parsed)
    row = parsed[(parsed.model == "resnet20_cifar10") & (parsed.method == "qimera") & (parsed.wbit == 4)].iloc[0]
    assert (row.fp32_top1, row.top1, row.dataset) == (93.89, 91.26, "cifar10")
    aciq = parsed[(parsed.method == "aciq") & (parsed.model == "resnet18")].iloc[0]
    assert aciq.mixed_precision and aciq.wbit == 4


def test_method_keys():
    assert [method_key(m) for m in ("GDFQ", "AAC+ABN", "AutoReCon")] == ["gdfq", "aac_abn", "autorecon"]


def _record(root: Path, name: str, **fields):
    base = {"status": "done", "model": "resnet20_cifar10", "dataset": "cifar10", "method": "zeroq",
            "quant": "gdfq", "wbit": 4, "abit": 4, "seed": 0, "fp32_top1": 87.66, "top1": 80.0, "top5": 99.0,
            "drop": 7.66, "n_test": 10000, "checkpoint_sha256": "abc", "config_hash": name}
    base.update(fields)
    path = root / name / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(base))


def test_tables_aggregate_seeds_and_put_papers_beside_ours(tmp_path):
    a, b = tmp_path / "sweep_a", tmp_path / "sweep_b"
    _record(a, "s0", seed=0, top1=80.0, drop=7.66)
    _record(b, "s1", seed=1, top1=82.0, drop=5.66)
    _record(b, "failed", seed=2, top1=10.0, status="failed")
    results = tmp_path / "results"
    results.mkdir()
    (results / "reported_extra.csv").write_text((REPO / "results" / "reported_extra.csv").read_text())
    tables.main([str(a), str(b), "--results", str(results)])
    summary = pd.read_csv(results / "summary.csv")
    row = summary.iloc[0]
    assert (row.seeds, row.top1_mean, row.drop_mean) == (2, 81.0, 6.66)
    assert row.top1_std == pytest.approx(1.4142, abs=1e-3)
    md = (results / "baselines.md").read_text()
    # ours beside the paper's ZeroQ W4A4 row: 93.89 -> 79.30, drop 14.59
    model_section = md[md.index("## ResNet-20 (CIFAR-10"):]
    line = next(l for l in model_section.splitlines() if l.startswith("| zeroq") and "| 4 " in l)
    for cell in ("gdfq", "87.66", "81.00 ± 1.41", "6.66 ± 1.41", "93.89", "79.30", "14.59"):
        assert cell in line
    assert len(pd.read_csv(results / "runs.csv")) == 2


def test_committed_reported_files_load():
    df = load_reported(REPO / "results")
    assert {"zeroq", "gdfq", "qimera", "dfq"} <= set(df.method)


def test_drops_beside_papers_lists_every_teacher_a_paper_used():
    summary = pd.DataFrame([{"model": "resnet20_cifar10", "dataset": "cifar10", "method": "squant", "quant": q,
                             "schedule": "", "wbit": 4, "abit": 4, "n_test": 10000, "seeds": 1, "fp32_top1": 87.66,
                             "top1_mean": 87.66 - d, "top1_std": float("nan"), "drop_mean": d,
                             "drop_std": float("nan")} for q, d in (("squant", 1.25), ("gdfq", 2.5))])
    reported = pd.DataFrame([{"model": m, "method": "squant", "wbit": 4, "abit": 4, "fp32_top1": fp, "top1": q,
                              "notes": n} for m, fp, q, n in (("resnet18", 71.47, 66.14, "Layer Reconstruction"),
                                                            ("resnet50", 77.74, 70.80, "re-run by X"))])
    table = tables.drops_beside_papers(summary, reported)
    assert table.to_dict("records") == [{
        "Method": "squant", "W": "4", "A": "4", "Our model": "resnet20_cifar10",
        "Drop (ours, by convention)": "gdfq 2.50, squant 1.25",
        "Drop (papers, their teacher)": "resnet18 5.33; resnet50 6.94 (re-run by X)"}]


def test_the_schedule_and_best_epoch_on_test_are_named():
    assert tables.schedule_label({"info": {}}) == ""
    assert tables.schedule_label({"info": {"schedule": "cpu"}}) == "cpu"
    assert tables.schedule_label({"info": {"schedule": "paper", "best_epoch_on_test": True}}) == \
        "paper (best epoch on TEST)"
    summary = pd.DataFrame([{"model": "resnet20_cifar10", "dataset": "cifar10", "method": "gdfq", "quant": "gdfq",
                             "schedule": "cpu", "wbit": 4, "abit": 4, "n_test": 10000, "seeds": 1,
                             "fp32_top1": 87.66, "top1_mean": 85.0, "top1_std": float("nan"), "drop_mean": 2.66,
                             "drop_std": float("nan")}])
    reported = pd.DataFrame([{"model": "resnet20_cifar10", "method": "gdfq", "wbit": 4, "abit": 4,
                              "fp32_top1": 93.11, "top1": 90.25, "notes": ""}])
    row = tables.drops_beside_papers(summary, reported).to_dict("records")[0]
    assert row["Drop (ours, by convention)"] == "gdfq [cpu schedule] 2.66"
