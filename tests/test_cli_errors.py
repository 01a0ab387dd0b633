"""Bad input: a one-line error naming the bad value (and the choices), exit status 2, no record."""

import pytest

from conftest import TEACHER_SHA256, run_cli


def _assert_refused(proc, run_dir, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dfqbench: error: ")
    for needle in needles:
        assert needle in lines[0]
    assert not (run_dir / "record.json").exists()


@pytest.mark.parametrize("arg,needles", [
    ("method=nope", ["method=nope", "dfq", "fp32", "rtn", "zeroq"]),
    ("model=nope", ["model=nope", "resnet20_cifar10", "pytorchcv", "timm", "torchvision"]),
    ("quant=nope", ["quant=nope", "brecq", "gdfq"]),
    ("dataset=nope", ["dataset=nope", "cifar10", "imagenet"]),
    ("wbit=0", ["wbit=0", "2 to 32"]),
    ("wbit=33", ["wbit=33", "2 to 32"]),
    ("abit=four", ["abit=four", "2 to 32"]),
])
def test_bad_choices_and_bit_widths(tmp_path, arg, needles):
    _assert_refused(run_cli(arg, f"hydra.run.dir={tmp_path}"), tmp_path, *needles)


def test_missing_data_root_says_how_to_provide_it(tmp_path, teacher):
    proc = run_cli("method=fp32", f"model.checkpoint={teacher}", f"dataset.root={tmp_path / 'nowhere'}",
                   f"hydra.run.dir={tmp_path}")
    _assert_refused(proc, tmp_path, "nowhere", "dataset.root=", "DFQ_CIFAR10_ROOT", "download")


def test_missing_checkpoint_says_what_is_missing(tmp_path, cifar10_root):
    proc = run_cli("method=fp32", f"model.checkpoint={tmp_path / 'missing.pt'}", f"dataset.root={cifar10_root}",
                   f"hydra.run.dir={tmp_path}")
    _assert_refused(proc, tmp_path, "missing.pt", "model.checkpoint")


def test_checkpoint_with_another_sha256_is_refused(tmp_path, teacher, cifar10_root):
    wrong = "0" * 64
    proc = run_cli("method=fp32", f"model.checkpoint={teacher}", f"model.sha256={wrong}",
                   f"dataset.root={cifar10_root}", f"hydra.run.dir={tmp_path}")
    _assert_refused(proc, tmp_path, TEACHER_SHA256, wrong)


def test_unknown_zoo_architecture_suggests_close_names(tmp_path, cifar10_root):
    proc = run_cli("method=fp32", "model=pytorchcv", "model.arch=resnet21_cifar10", "model.pretrained=false",
                   f"dataset.root={cifar10_root}", f"hydra.run.dir={tmp_path}")
    _assert_refused(proc, tmp_path, "resnet21_cifar10", "resnet20_cifar10")


def test_bad_method_setting_is_refused_before_work(tmp_path, teacher, cifar10_root):
    proc = run_cli("method=zeroq", "method.iterations=0", f"model.checkpoint={teacher}",
                   f"dataset.root={cifar10_root}", f"hydra.run.dir={tmp_path}")
    _assert_refused(proc, tmp_path, "iterations=0")
