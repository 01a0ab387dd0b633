"""Bad input: a one-line error naming the bad value (and the choices), exit status 2, no record."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TEACHER_SHA256, run_cli
from dfqbench.__main__ import GROUPS, group_options


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
    ("compile=fast", ["compile='fast' is not valid", "none, default, reduce-overhead, max-autotune-no-cudagraphs"]),
    ("precision=fp16", ["precision='fp16' is not valid", "fp32, bf16"]),
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


# ---- model/dataset agreement, bad data and checkpoints: one line, no traceback, no record -------------------------

def _assert_one_error(proc, run_dir, *needles):
    """Exit status 2 and one error line, the last: what the run resolved may come before it (it says so)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dfqbench: error: ")]
    assert errors == [lines[-1]], proc.stderr
    assert all(line.startswith("dfqbench: ") for line in lines), proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not (run_dir / "record.json").exists()


@pytest.mark.parametrize("args,needles", [
    (["model=resnet18", "model.pretrained=false"],  # dataset=cifar10 is the default
     ["model=resnet18 is a teacher for dataset=imagenet, not dataset=cifar10", "use dataset=imagenet",
      "model=mobilenetv2_cifar10|resnet20_cifar10|resnet56_cifar10|seq_conv1d_cifar10|vgg8_bn_cifar10"]),
    (["model=resnet20_cifar10", "dataset=imagenet"],
     ["model=resnet20_cifar10 is a teacher for dataset=cifar10, not dataset=imagenet",
      "model=deit_base|deit_small|deit_tiny|mobilenetv2_w1|resnet18|resnet50|swin_small|swin_tiny"]),
    (["model=pytorchcv", "model.arch=resnet56_cifar100", "model.pretrained=false"],
     ["dataset=cifar100", "not dataset=cifar10", "pytorchcv name resnet56_cifar100", "model.dataset="]),
])
def test_model_and_dataset_must_agree_before_anything_loads(tmp_path, args, needles):
    _assert_refused(run_cli("method=rtn", *args, f"hydra.run.dir={tmp_path}"), tmp_path, *needles)


def test_a_text_file_as_checkpoint_says_so(tmp_path, cifar10_root):
    text = tmp_path / "teacher.pt"
    text.write_text("these are not weights\n")
    proc = run_cli("method=rtn", f"model.checkpoint={text}", f"dataset.root={cifar10_root}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    _assert_refused(proc, tmp_path / "run", str(text), "not a file written by torch.save", "it is a text file",
                    "model.checkpoint=PATH")


def test_a_checkpoint_without_a_state_dict_says_so(tmp_path, cifar10_root):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    proc = run_cli("method=rtn", f"model.checkpoint={path}", f"dataset.root={cifar10_root}",
                   "dataset.max_samples=100", f"hydra.run.dir={tmp_path / 'run'}")
    _assert_one_error(proc, tmp_path / "run", str(path), "holds a list, not a state_dict")


def _tiny_cifar(cifar10_root, dest, per_class=3):
    for folder in sorted((cifar10_root / "test").iterdir()):
        (dest / "test" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy(image, dest / "test" / folder.name / image.name)
    return dest


@pytest.mark.parametrize("how", ["truncated", "not an image"])
@pytest.mark.parametrize("loading", [[], ["dataset.num_workers=0"], ["dataset.in_memory=false"]])
def test_a_corrupt_test_image_is_named_in_one_line(tmp_path, cifar10_root, teacher, how, loading):
    root = _tiny_cifar(cifar10_root, tmp_path / "data")
    bad = sorted((root / "test" / "cat").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:200] if how == "truncated" else b"<html>not a jpeg</html>")
    proc = run_cli("method=rtn", f"model.checkpoint={teacher}", f"dataset.root={root}", *loading,
                   f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path / "cache")
    _assert_one_error(proc, tmp_path / "run", f"cannot read test image {bad}", "replace or remove the file")


# Permission errors cannot be made as root (chmod does not stop root): os.listdir/os.scandir refuse one folder.
_DENYING_CLI = """
import os, sys
from dfqbench.__main__ import main
deny = os.environ["TEST_DENY"]
def refusing(real):
    def call(path=".", *args, **kwargs):
        if os.fspath(path).rstrip("/") == deny:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)
    return call
os.listdir, os.scandir = refusing(os.listdir), refusing(os.scandir)
main()
"""


@pytest.mark.parametrize("folder", ["test", "test/cat"])
def test_an_unreadable_test_or_class_folder_is_named_in_one_line(tmp_path, cifar10_root, teacher, folder):
    root = _tiny_cifar(cifar10_root, tmp_path / "data")
    denied = root / folder
    proc = subprocess.run([sys.executable, "-c", _DENYING_CLI, "progress=false", "method=rtn",
                           f"model.checkpoint={teacher}", f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0", "TEST_DENY": str(denied),
                               "DFQ_CACHE_DIR": str(tmp_path / "cache")})
    _assert_refused(proc, tmp_path / "run", f"cannot read {denied}: Permission denied", "dataset.root")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_a_class_folder_without_read_permission_is_named(tmp_path, cifar10_root, teacher):
    root = _tiny_cifar(cifar10_root, tmp_path / "data")
    (root / "test" / "cat").chmod(0)
    try:
        proc = run_cli("method=rtn", f"model.checkpoint={teacher}", f"dataset.root={root}",
                       f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path / "cache")
    finally:
        (root / "test" / "cat").chmod(0o755)
    _assert_refused(proc, tmp_path / "run", f"cannot read {root / 'test' / 'cat'}")


def test_a_class_folder_without_images_is_named(tmp_path, cifar10_root, teacher):
    root = _tiny_cifar(cifar10_root, tmp_path / "data")
    for image in (root / "test" / "dog").iterdir():
        image.rename(image.with_suffix(".txt"))
    proc = run_cli("method=rtn", f"model.checkpoint={teacher}", f"dataset.root={root}",
                   f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path / "cache")
    _assert_refused(proc, tmp_path / "run", f"{root / 'test'} has class folders without images (dog)")


# ---- the help page --------------------------------------------------------------------------------------------

def test_help_is_dfqbench_own_page_and_hydra_help_stays_reachable():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    page = proc.stdout
    assert page.startswith("dfqbench: a benchmark harness for data-free quantization")
    assert "Powered by Hydra" not in page and "== Config ==" not in page  # not Hydra's default page
    examples = [line.strip() for line in page.splitlines() if line.strip().startswith("python -m dfqbench ")]
    assert 4 <= len(examples) <= 8
    for group in GROUPS:  # every group and every option, read from conf/
        line = next(line for line in page.splitlines() if line.startswith(f"{group}: "))
        assert line == f"{group}: {', '.join(group_options(group))}"
    assert "record.json" in page and "DFQ_OUTPUT_DIR" in page and "--hydra-help" in page
    hydra_page = subprocess.run([sys.executable, "-m", "dfqbench", "--hydra-help"], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
    assert hydra_page.returncode == 0 and "Hydra (" in hydra_page.stdout and "--cfg" in hydra_page.stdout
