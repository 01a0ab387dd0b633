"""End to end on the real teacher and a slice of the real CIFAR-10 test set, and on the other data paths."""

import json

import pytest
import torch
from PIL import Image

from conftest import TEACHER_SHA256, compose_cfg, run_cli
from dfqbench.runner import run

SLICE = 1000
FP32_SLICE_TOP1 = 85.9  # the teacher on the first SLICE test images (87.66 on all 10,000)
REQUIRED = {"method", "model", "dataset", "quant", "wbit", "abit", "seed", "fp32_top1", "top1", "top5",
            "checkpoint_sha256", "wall_time_s", "config_hash", "status"}


def _real(cache_dir, cifar10_root, teacher, *overrides):
    return compose_cfg(f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}", f"dataset.max_samples={SLICE}",
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
    # measured on this slice (the first 1000 test images): FP32 85.90, RTN W8A8 85.90 (87.66 on the full set);
    # 3 images of slack for another device's arithmetic
    assert record["fp32_top1"] == pytest.approx(FP32_SLICE_TOP1, abs=0.3)
    assert abs(record["fp32_top1"] - record["top1"]) <= 1.0
    for key in ("FP32 top-1", "quantized top-1", "drop", "wall", "record.json"):
        assert key in proc.stdout
    overrides = (tmp_path / ".hydra" / "overrides.yaml").read_text()
    rerun = run_cli(*args, "progress=false", cache=cache_dir)  # progress: not in the fingerprint
    assert rerun.returncode == 0 and "skipped" in rerun.stderr
    assert json.loads((tmp_path / "record.json").read_text())["created_at"] == record["created_at"]
    # the skipped job's Hydra files went to .hydra-pending and were dropped: .hydra still describes the record
    assert (tmp_path / ".hydra" / "overrides.yaml").read_text() == overrides
    assert not (tmp_path / ".hydra-pending").exists()
    forced = run_cli(*args, "force=true", cache=cache_dir)  # computed again: its own files move in
    assert forced.returncode == 0
    assert "- force=true" in (tmp_path / ".hydra" / "overrides.yaml").read_text()
    assert not (tmp_path / ".hydra-pending").exists()


def test_a_precision_that_no_synthesis_uses_is_warned_about(tmp_path, cache_dir, cifar10_root, teacher, caplog):
    record = run(_real(cache_dir, cifar10_root, teacher, "method=rtn", "wbit=8", "abit=8", "precision=bf16"), tmp_path)
    assert record["status"] == "done"
    assert "precision=bf16 changed nothing: method=rtn runs no teacher through the synthesis loop" in caplog.text


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
    # RTN is deterministic; measured on this slice: W4A4 82.4, W3A3 69.7, W2A2 16.7 (FP32 85.9; full set W4A4
    # 84.19). One point either side: a wrong bit-width, grid or rounding mode lands outside
    assert w4["top1"] == pytest.approx(82.4, abs=1.0)
    assert w2["top1"] == pytest.approx(16.7, abs=5.0)


def test_zeroq_same_seed_same_distilled_data_and_accuracy_another_seed_other_data(tmp_path, cache_dir,
                                                                                   cifar10_root, teacher):
    calib = cache_dir / "calib"

    def zeroq(seed, name):
        before = set(calib.glob("distill-*.pt"))
        record = run(compose_cfg(f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}",
                                 "dataset.max_samples=200", f"paths.cache_dir={cache_dir}", "method=zeroq",
                                 "method.iterations=5", "method.batch_size=8", f"seed={seed}", "wbit=4", "abit=4"),
                     tmp_path / name)
        assert record["stochastic"] and record["seed"] == seed and "calib_cached" not in record["info"]
        (made,) = set(calib.glob("distill-*.pt")) - before  # the batch this run distilled (and cached)
        data = torch.load(made, weights_only=True)
        made.unlink()  # so that the next run with this seed distills again instead of reading it
        return record, data

    a, data_a = zeroq(1, "a")
    b, data_b = zeroq(1, "b")
    c, data_c = zeroq(2, "c")
    assert len(data_a) == 1 and data_a[0].shape == (8, 3, 32, 32)
    assert torch.equal(data_a[0], data_b[0]) and (a["top1"], a["top5"]) == (b["top1"], b["top5"])
    assert not torch.equal(data_a[0], data_c[0]) and (data_a[0] - data_c[0]).abs().mean() > 0.1


@pytest.mark.parametrize("arch", ["preresnet20_cifar10", "seresnet20_cifar10", "densenet40_k12_cifar10"])
@pytest.mark.parametrize("method", ["rtn", "dfq", "zeroq"])
def test_other_pytorchcv_teachers_run_every_method(tmp_path, cache_dir, cifar10_root, arch, method):
    extra = ["method.iterations=3", "method.batch_size=4"] if method == "zeroq" else []
    record = run(compose_cfg("model=pytorchcv", f"model.arch={arch}", "model.pretrained=false",
                             f"dataset.root={cifar10_root}", "dataset.max_samples=100", f"paths.cache_dir={cache_dir}",
                             f"method={method}", "wbit=8", "abit=8", *extra), tmp_path)
    assert record["status"] == "done" and record["weights"] == "random"


def test_imagenet_path_with_random_resnet18(tmp_path, cache_dir, imagenet_samples):
    record = run(compose_cfg("model=resnet18", "model.pretrained=false", "dataset=imagenet",
                             f"dataset.root={imagenet_samples}", "dataset.max_samples=20", "eval.batch_size=10",
                             f"paths.cache_dir={cache_dir}", "method=rtn", "wbit=8", "abit=8"), tmp_path)
    assert record["status"] == "done" and record["n_test"] == 20 and record["dataset"] == "imagenet"


def test_official_aciq_on_imagenet_keeps_the_1000_way_classifier_at_8_bit(tmp_path, cache_dir, imagenet_samples):
    record = run(compose_cfg("model=resnet18", "model.pretrained=false", "dataset=imagenet",
                             f"dataset.root={imagenet_samples}", "dataset.max_samples=20", "eval.batch_size=10",
                             f"paths.cache_dir={cache_dir}", "method=aciq", "quant=official_aciq", "wbit=4", "abit=4",
                             "quant.method_settings.aciq.calib_data=gaussian_noise",  # the fixture has no train split
                             "quant.method_settings.aciq.calib_images=2"), tmp_path)
    quant = record["config"]["quant"]
    assert record["status"] == "done" and "per_setting" not in quant
    assert (quant["layers"]["last_wbit"], quant["layers"]["logits_abit"]) == (8, 8)
    assert quant["method_settings"]["aciq"]["last_output_range"] == "global_minmax"


def test_cifar100_imagefolder_fixture(tmp_path, cache_dir):
    root = tmp_path / "c100"
    for c in range(100):
        folder = root / "test" / f"class{c:03d}"
        folder.mkdir(parents=True)
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(folder / "0.png")
    record = run(compose_cfg("model=resnet20_cifar100", "model.pretrained=false", "dataset=cifar100",
                             f"dataset.root={root}", f"paths.cache_dir={cache_dir}", "method=rtn"), tmp_path / "run")
    assert record["status"] == "done" and record["n_test"] == 100
