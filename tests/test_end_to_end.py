"""End to end on the real teacher and a slice of the real CIFAR-10 test set, and on the other data paths."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import TEACHER_SHA256, run_cli
from dfqbench.__main__ import CONF_DIR
from dfqbench.runner import run

SLICE = 1000
REQUIRED = {"method", "model", "dataset", "quant", "wbit", "abit", "seed", "fp32_top1", "top1", "top5",
            "checkpoint_sha256", "wall_time_s", "config_hash", "status"}


def _cfg(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=["progress=false", *overrides])


def _real(cache_dir, cifar10_root, teacher, *overrides):
    return _cfg(f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}", f"dataset.max_samples={SLICE}",
                f"paths.cache_dir={cache_dir}", *overrides)


def test_cli_run_writes_the_record_and_skips_a_finished_rerun(tmp_path, cache_dir, cifar10_root, teacher):
    args = ["method=rtn", "model=resnet20_cifar10", f"model.checkpoint={teacher}", "dataset=cifar10",
            f"dataset.root={cifar10_root}", f"dataset.max_samples={SLICE}", "quant=gdfq", "wbit=8", "abit=8",
            "seed=0", f"hydra.run.dir={tmp_path}"]
    proc = run_cli(*args, cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "record.json").read_text())
    assert REQUIRED <= set(record)
    assert record["status"] == "done" and record["n_test"] == SLICE
    assert record["checkpoint_sha256"] == TEACHER_SHA256
    assert (record["method"], record["wbit"], record["abit"], record["quant"]) == ("rtn", 8, 8, "gdfq")
    assert record["fp32_top1"] > 80.0  # the teacher is 87.66 % on the full test set
    assert abs(record["fp32_top1"] - record["top1"]) <= 1.0
    for key in ("FP32 top-1", "quantized top-1", "drop", "wall", "record.json"):
        assert key in proc.stdout
    rerun = run_cli(*args, cache=cache_dir)
    assert rerun.returncode == 0 and "skipped" in rerun.stderr
    assert json.loads((tmp_path / "record.json").read_text())["created_at"] == record["created_at"]


@pytest.mark.parametrize("method,quant,extra", [
    ("dfq", "gdfq", []), ("dfq", "brecq", []), ("rtn", "brecq", []), ("fp32", "gdfq", []),
    ("zeroq", "gdfq", ["method.iterations=40"]), ("zeroq", "brecq", ["method.iterations=40"]),
])
def test_methods_at_w8a8_stay_close_to_fp32(tmp_path, cache_dir, cifar10_root, teacher, method, quant, extra):
    record = run(_real(cache_dir, cifar10_root, teacher, f"method={method}", f"quant={quant}", "wbit=8", "abit=8",
                       *extra), tmp_path)
    assert record["status"] == "done"
    assert abs(record["fp32_top1"] - record["top1"]) <= 1.0


def test_w4a4_degrades_and_w2a2_collapses(tmp_path, cache_dir, cifar10_root, teacher):
    w4 = run(_real(cache_dir, cifar10_root, teacher, "method=rtn", "wbit=4", "abit=4"), tmp_path / "w4")
    w2 = run(_real(cache_dir, cifar10_root, teacher, "method=rtn", "wbit=2", "abit=2"), tmp_path / "w2")
    assert w2["top1"] < w4["top1"] < w4["fp32_top1"]
    assert w2["top1"] < 40.0


def test_zeroq_seed_changes_the_distilled_data_but_not_the_record_layout(tmp_path, cache_dir, cifar10_root,
                                                                          teacher):
    a = run(_real(cache_dir, cifar10_root, teacher, "method=zeroq", "method.iterations=20", "seed=1", "wbit=4",
                  "abit=4"), tmp_path / "a")
    assert a["stochastic"] and a["info"]["distill_time_s"] > 0 and a["seed"] == 1


@pytest.mark.parametrize("arch", ["preresnet20_cifar10", "seresnet20_cifar10", "densenet40_k12_cifar10"])
@pytest.mark.parametrize("method", ["rtn", "dfq", "zeroq"])
def test_other_pytorchcv_teachers_run_every_method(tmp_path, cache_dir, cifar10_root, arch, method):
    extra = ["method.iterations=3", "method.batch_size=4"] if method == "zeroq" else []
    record = run(_cfg("model=pytorchcv", f"model.arch={arch}", "model.pretrained=false",
                      f"dataset.root={cifar10_root}", "dataset.max_samples=100", f"paths.cache_dir={cache_dir}",
                      f"method={method}", "wbit=8", "abit=8", *extra), tmp_path)
    assert record["status"] == "done" and record["weights"] == "random"


def test_imagenet_path_with_random_resnet18(tmp_path, cache_dir, imagenet_samples):
    record = run(_cfg("model=resnet18", "model.pretrained=false", "dataset=imagenet",
                      f"dataset.root={imagenet_samples}", "dataset.max_samples=20", "eval.batch_size=10",
                      f"paths.cache_dir={cache_dir}", "method=rtn", "wbit=8", "abit=8"), tmp_path)
    assert record["status"] == "done" and record["n_test"] == 20 and record["dataset"] == "imagenet"


def test_cifar100_imagefolder_fixture(tmp_path, cache_dir):
    root = tmp_path / "c100"
    for c in range(100):
        folder = root / "test" / f"class{c:03d}"
        folder.mkdir(parents=True)
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(folder / "0.png")
    record = run(_cfg("model=resnet20_cifar100", "model.pretrained=false", "dataset=cifar100",
                      f"dataset.root={root}", f"paths.cache_dir={cache_dir}", "method=rtn"), tmp_path / "run")
    assert record["status"] == "done" and record["n_test"] == 100
