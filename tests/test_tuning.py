"""The tuning-robustness study: its variants, the one-line errors, a dry run from the command line, and its
table and plot from study records (spread and seed std computed from the records)."""

import json
import re
from pathlib import Path

import pytest

from conftest import compose_cfg, run_cli
from dfqbench import tables
from dfqbench.errors import ConfigError
from dfqbench.tuning import variant_overrides, variants


def test_variants_move_one_setting_at_a_time():
    plan = variants({"zeroq": {"lr": [0.1, 1.0], "iterations": [100]}, "kw": {"lr": [0.2]}}, ["zeroq"])
    assert [(m, n, s, v) for m, n, s, v in plan] == [
        ("zeroq", "zeroq-tune_default", None, None), ("zeroq", "zeroq-tune_lr_0.1", "lr", 0.1),
        ("zeroq", "zeroq-tune_lr_1.0", "lr", 1.0), ("zeroq", "zeroq-tune_iterations_100", "iterations", 100)]
    assert variant_overrides("zeroq", "zeroq-tune_lr_0.1", "lr", 0.1) == [
        "method=zeroq", "method.name=zeroq-tune_lr_0.1", "++method.lr=0.1"]
    with pytest.raises(ConfigError, match=re.escape("tuning.methods: ['dfq'] not in the study; choose from: zeroq")):
        variants({"zeroq": {"lr": [0.1]}}, ["dfq"])
    with pytest.raises(ConfigError, match="tuning.grid.zeroq.lr must be a non-empty list of values"):
        variants({"zeroq": {"lr": 0.1}})


def test_every_grid_setting_exists_in_its_method_yaml():
    """A misspelt setting would only fail when its variant runs: check them all against the composed yamls."""
    grid = compose_cfg("experiment=tuning_robustness").tuning.grid
    for method, settings in grid.items():
        cfg = compose_cfg(f"method={method}")
        for setting in settings:
            node = cfg.method
            parts = setting.split(".")
            for part in parts[:-1]:
                node = node[part]
            assert parts[-1] in node or (method == "intraq" and parts[-2] == "source_settings"), (method, setting)


def test_dry_run_lists_the_variants_and_bad_methods_are_refused():
    out = run_cli("experiment=tuning_robustness", "tuning.dry_run=true", "tuning.methods=[ocs]")
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("dfqbench tuning:")]
    assert len(lines) == 3 and "method.name=ocs-tune_expand_ratio_0.05 ++method.expand_ratio=0.05 seed=0" in lines[2]
    only = run_cli("experiment=tuning_robustness", "tuning.dry_run=true", "tuning.methods=[ocs]",
                   "tuning.only=[ocs-tune_expand_ratio_0.01]")
    assert [l.split("method.name=")[1].split()[0] for l in only.stdout.splitlines()
            if l.startswith("dfqbench tuning:")] == ["ocs-tune_expand_ratio_0.01"], only.stderr
    stray = run_cli("experiment=tuning_robustness", "tuning.methods=[ocs]", "tuning.only=[ocs-tune_lr_1]")
    assert stray.returncode == 2 and "tuning.only: ['ocs-tune_lr_1'] are not variants of this study; choose " \
        "from: ocs-tune_default, ocs-tune_expand_ratio_0.01, ocs-tune_expand_ratio_0.05" in stray.stderr
    bad = run_cli("experiment=tuning_robustness", "tuning.methods=[nope]")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "dfqbench: error: tuning.methods: ['nope'] not in the study")


def _record(root: Path, folder: str, **fields):
    base = {"status": "done", "model": "resnet20_cifar10", "dataset": "cifar10", "quant": "gdfq", "wbit": 4,
            "abit": 4, "seed": 0, "fp32_top1": 90.0, "top5": 99.0, "n_test": 10000, "checkpoint_sha256": "abc",
            "config_hash": folder, "device": "cpu", "wall_time_s": 1.0, "quantize_time_s": 1.0, "info": {},
            "overrides": []}
    base.update(fields)
    base["drop"] = base["fp32_top1"] - base["top1"] if base["top1"] is not None else None
    path = root / folder / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(base))


def test_tuning_table_spread_and_seed_std(tmp_path):
    study = tmp_path / "tuning"
    _record(study, "d", method="zeroq-tune_default", top1=84.0)
    _record(study, "a", method="zeroq-tune_lr_0.1", top1=80.0, overrides=["++method.lr=0.1"])
    _record(study, "b", method="zeroq-tune_lr_1.0", top1=85.0, overrides=["++method.lr=1.0"])
    # a diverged training is a result (listed, out of the spread); any other failure is a missing run
    _record(study, "c", method="zeroq-tune_lr_9.0", top1=None, status="failed", overrides=["++method.lr=9.0"],
            error="TrainingDiverged: training diverged: student loss term 'kd' is nan at epoch 5/10")
    _record(study, "e", method="zeroq-tune_lr_7.0", top1=None, status="failed", overrides=["++method.lr=7.0"],
            error="RuntimeError: Expected all tensors to be on the same device")
    for seed, top1 in enumerate((83.0, 84.0, 85.0)):  # the baseline cell: std 1.0
        _record(tmp_path / "sweeps", f"s{seed}", method="zeroq", seed=seed, top1=top1)
    out = tmp_path / "out"
    tables.main([str(tmp_path), "--results", str(out), "--reported", str(tmp_path / "none")])
    md = (out / "tuning.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith("| resnet20_cifar10"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:] == ["zeroq", "2", "84.00", "lr=0.1: 80.00", "lr=1.0: 85.00", "5.00", "lr=9.0", "cpu",
                         "1.00 (3 seeds)", "5.0"]
    assert "| zeroq    | lr        | 84.00     | 0.1: 80.00; 1.0: 85.00; 9.0: diverged" in md
    assert "7.0" not in md
    assert (out / "plots" / "tuning.png").stat().st_size > 0
    baselines = (out / "baselines.md").read_text()
    assert "tune_" not in baselines  # the study stays out of the baseline tables
