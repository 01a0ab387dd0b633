"""The post-training parity drivers' parent side, written once in scripts/parity/common.py (official_runs,
official_summary, write_row): which official seeds run or are reused, the official.json summary, and the
parity.csv row, on fake children (no official code runs here)."""

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "parity"))
import aciq  # noqa: E402
import common  # noqa: E402
import dsg  # noqa: E402
import zeroq  # noqa: E402
from dfqbench.records import code_digest  # noqa: E402


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """Fake official children (top-1 70 + seed, 10 s) and dfqbench runs (top-1 80 + seed); the seeds each ran."""
    monkeypatch.setattr(common, "clone_identity", lambda path, repo, marker: (repo, "c" * 40))
    ran = {"official": [], "dfqbench": []}

    def child(script, args, log, env=None):
        seed = int(args[args.index("--seed") + 1])
        ran["official"].append(seed)
        log.parent.mkdir(parents=True, exist_ok=True)
        return {"top1": 70.0 + seed, "quantize_s": 10.0 + seed, "wall_s": 1.0, "model": "resnet20_cifar10",
                "dataset": "cifar10", "n_test": 100, "device": "cpu", "calib_files": [f"img{seed}.jpg"],
                "argv": []}

    def dfqbench(overrides, dest, log, allow_diverged=False, in_sweeps=False):
        seed = int(next(o for o in overrides if o.startswith("seed=")).split("=")[1])
        ran["dfqbench"].append(seed)
        r = {"status": "done", "seed": seed, "top1": 80.0 + seed, "quantize_time_s": 2.0, "info": {},
             "fingerprint": {"code": code_digest()},
             "overrides": [*overrides, "force=true", "progress=false"]}
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.with_name(dest.name + ".record.json").write_text(json.dumps(r))
        return r

    monkeypatch.setattr(common, "run_child", child)
    monkeypatch.setattr(common, "run_dfqbench", dfqbench)
    return ran


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_zeroq_parent_summary_row_and_reuse(tmp_path, fakes):
    out, table = tmp_path / "out", tmp_path / "parity.csv"
    argv = ["--official", str(tmp_path), "--seeds", "0", "1", "2", "--no-compare", "--out", str(out), "--csv",
            str(table), "--dfqbench"]
    zeroq.main(argv)
    assert fakes == {"official": [0, 1, 2], "dfqbench": [0, 1, 2]}
    official = json.loads((out / "w4a4" / "official.json").read_text())
    # mean and sample std of 70, 71, 72: 71 +- 1; seconds 10, 11, 12
    assert (official["top1_mean"], official["top1_std"], official["quantize_s_mean"]) == (71.0, 1.0, 11.0)
    assert official["seeds"] == [0, 1, 2] and [r["seed"] for r in official["runs"]] == [0, 1, 2]
    row, = _rows(table)
    assert (row["method"], row["quant"], row["official_top1_mean"], row["official_top1_std"]) == (
        "zeroq", "gdfq", "71.00", "1.00")
    assert (row["dfqbench_top1_mean"], row["official_s"], row["dfqbench_s"]) == ("81.00", "11.00", "2.00")
    assert row["official_commit"] == "c" * 40 and row["model"] == "resnet20_cifar10"
    assert b"\r" not in table.read_bytes()  # LF, as the committed results/parity.csv
    # everything kept: nothing runs again, the same row
    fakes["official"].clear(), fakes["dfqbench"].clear()
    before = (out / "w4a4" / "official.json").read_text()
    zeroq.main(argv + ["--reuse-official", "--reuse-dfqbench"])
    assert fakes == {"official": [], "dfqbench": []} and _rows(table) == [row]
    assert (out / "w4a4" / "official.json").read_text() == before
    # another teacher's cell is not reused
    zeroq.main(argv + ["--reuse-official", "--reuse-dfqbench", "--teacher", "model.checkpoint=/x.pth"])
    assert fakes["official"] == [0, 1, 2]


def test_dsg_parent_shares_zeroqs_official_side_with_its_own_batch_and_margins(tmp_path, fakes, monkeypatch,
                                                                             capsys):
    """scripts/parity/dsg.py runs its seeds through zeroq.official_side with DSG's defaults (a generated batch of
    40, test batch 256), prints the code's learning-rate cuts, and its dfqbench side is the zero-margin cell."""
    child, argvs = common.run_child, []

    def run_child(script, args, log, env=None):
        argvs.append(args)
        return {**child(script, args, log, env), "lr_cuts": [2]}

    monkeypatch.setattr(common, "run_child", run_child)
    out, table = tmp_path / "out", tmp_path / "parity.csv"
    dsg.main(["--official", str(tmp_path), "--seeds", "0", "1", "--no-compare", "--out", str(out), "--csv",
              str(table), "--dfqbench"])
    assert fakes == {"official": [0, 1], "dfqbench": [0, 1]}
    args = argvs[1]
    assert args[args.index("--batch-size") + 1] == "40" and args[args.index("--test-batch-size") + 1] == "256"
    assert args[args.index("--seed") + 1] == "1" and Path(argvs[0][1]) == Path(tmp_path).resolve()
    official = json.loads((out / "w4a4" / "official.json").read_text())
    assert official["margins"].startswith("zero") and official["top1_mean"] == 70.5
    row, = _rows(table)
    assert (row["method"], row["official_top1_mean"], row["dfqbench_top1_mean"]) == ("dsg", "70.50", "80.50")
    assert "method.margins=none" in row["note"]
    assert "official DSG W4A4 seed 1: top-1 71.00, quantize 11 s, lr cuts [2]" in capsys.readouterr().out


def test_a_new_seed_runs_alone_beside_the_kept_ones(tmp_path, fakes):
    out = tmp_path / "out"
    base = ["--official", str(tmp_path), "--no-compare", "--out", str(out), "--csv", str(tmp_path / "p.csv")]
    zeroq.main(base + ["--seeds", "0", "1"])
    fakes["official"].clear()
    zeroq.main(base + ["--seeds", "0", "1", "2", "--reuse-official"])
    assert fakes["official"] == [2]
    official = json.loads((out / "w4a4" / "official.json").read_text())
    assert official["seeds"] == [0, 1, 2] and official["top1_mean"] == 71.0


def test_aciq_reuses_official_runs_only_with_the_same_flags(tmp_path, fakes):
    out = tmp_path / "out"
    base = ["--official", str(tmp_path), "--seeds", "0", "--out", str(out), "--csv", str(tmp_path / "p.csv")]
    aciq.main(base)
    assert fakes["official"] == [0, 0, 0]  # collect, collect_pc, use
    official = json.loads((out / "w4a4" / "official.json").read_text())
    assert official["statistics_s_mean"] == 2.0  # the two collections' wall_s (1 s each) and official["flags"] == " ".join(aciq.FLOW)
    assert (out / "w4a4" / "official-s0.calib.txt").read_text() == "img0.jpg\n"
    fakes["official"].clear()
    aciq.main(base + ["--reuse-official"])
    assert fakes["official"] == []
    aciq.main(base + ["--reuse-official", "--flags=-pcq_w -c laplace"])
    assert fakes["official"] == [0, 0, 0]
