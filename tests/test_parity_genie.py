"""The Genie parity driver (scripts/parity/genie.py): dfqbench's budget mapped onto the official main()'s arguments
(its swapped lr names, its recon_batch = batches per pass), the settings it cannot take, the generator-size patch,
the teacher rebuilt in the code's ResNet layout (names, order, weights), the argument parsing, and the parent's
records and results/parity.csv row with the child and dfqbench runs faked. The checks that need the official code
run only where a clone is at /tmp/off-genie (GENIE_CLONE), and are skipped otherwise."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "parity"))
import common  # noqa: E402
import genie  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CLONE = Path(os.environ.get("GENIE_CLONE", "/tmp/off-genie"))
needs_clone = pytest.mark.skipif(not (CLONE / "reconstruct.py").is_file(), reason=f"no Genie clone at {CLONE}")

TINY = ["method.num_images=32", "method.calib_batch_size=32", "method.distill.iterations=20",
        "method.reconstruct.iterations=20"]


def _resnet20():
    from pytorchcv.model_provider import get_model
    torch.manual_seed(0)
    model = get_model("resnet20_cifar10", pretrained=False)
    for m in model.modules():  # non-trivial BN statistics: a wrong mapping shows in the logits
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


# --- the budget ---------------------------------------------------------------------------------------------

def test_dfqbench_cpu_budget_maps_to_main_arguments():
    kwargs = genie.official_arguments(genie.method_config([]))
    assert kwargs == {"samples": 256, "distill_batch": 128, "distill_iter": 100, "lr_g": 0.1, "lr_z": 0.01,
                      "recon_iter": 1000, "recon_batch": 8, "round_weight": 1.0}


def test_tiny_budget_maps_and_main_lr_names_are_swapped():
    method = genie.method_config([*TINY, "method.distill.lr_z=0.2", "method.distill.lr_g=0.03"])
    kwargs = genie.official_arguments(method)
    assert (kwargs["samples"], kwargs["distill_batch"], kwargs["distill_iter"]) == (32, 32, 20)
    assert (kwargs["recon_iter"], kwargs["recon_batch"]) == (20, 1)
    # main(lr_g=...) goes to the latents' Adam, main(lr_z=...) to the generator's
    assert (kwargs["lr_g"], kwargs["lr_z"]) == (0.2, 0.03)


@pytest.mark.parametrize("samples,batch", [(256, 32), (1024, 32), (128, 16), (32, 32)])
def test_recon_batch_gives_the_dfqbench_batch_in_the_official_draw(samples, batch):
    method = genie.method_config([f"method.num_images={samples}", f"method.calib_batch_size={min(samples, 128)}",
                                  f"method.reconstruct.batch_size={batch}"])
    k = genie.official_arguments(method)["recon_batch"]
    perms = torch.randperm(samples).view(k, -1)  # reconstruct_block's draw: one batch per row
    assert perms.shape == (samples // batch, batch)


@pytest.mark.parametrize("override,match", [
    ("method.reconstruct.qdrop_p=0.3", "qdrop_p"),
    ("method.reconstruct.learn_weight_scale=false", "learn_weight_scale"),
    ("method.distill.swing=false", "swing"),
    ("method.distill.patience=50", "patience"),
    ("method.reconstruct.warmup=0.1", "warmup"),
    ("method.calib_data=distill", "calib_data"),
])
def test_settings_the_code_hard_codes_cannot_change(override, match):
    with pytest.raises(ValueError, match=match):
        genie.official_arguments(genie.method_config([override]))


@pytest.mark.parametrize("overrides,match", [
    (["method.num_images=200", "method.calib_batch_size=100"], "multiple of 32"),
    (["method.num_images=256", "method.calib_batch_size=96"], "calib_batch_size"),
    (["method.num_images=96", "method.calib_batch_size=96", "method.reconstruct.batch_size=64"], "batch_size=64"),
    (["method.num_images=32", "method.calib_batch_size=32", "method.reconstruct.batch_size=64"], "batch_size=64"),
])
def test_image_counts_the_code_cannot_split_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        genie.official_arguments(genie.method_config(overrides))


# --- the image size -----------------------------------------------------------------------------------------

class FakeGenerator(nn.Module):  # distill.Generator's signature and its super(Generator, self) call
    def __init__(self, image_size=224, latent_dim=256, c1=128, c2=64):
        super(FakeGenerator, self).__init__()
        self.init_size = image_size // 4
        self.latent_dim = latent_dim


def test_size_generator_changes_only_the_image_size_default():
    old = genie.size_generator(FakeGenerator, 32)
    try:
        g = FakeGenerator(latent_dim=7)  # as distill_data builds it
        assert (g.init_size, g.latent_dim) == (8, 7)
        assert FakeGenerator(image_size=64).init_size == 16
        assert FakeGenerator.__init__.__defaults__ == (32, 256, 128, 64)
    finally:
        FakeGenerator.__init__.__defaults__ = old


def test_size_generator_refuses_another_signature():
    class Other(nn.Module):
        def __init__(self, size=224):
            super().__init__()

    with pytest.raises(SystemExit, match="image_size=224"):
        genie.size_generator(Other, 32)


@pytest.fixture
def clone_on_path():
    """The clone's top-level modules importable for one test, forgotten afterwards."""
    sys.path.insert(0, str(CLONE))
    yield
    sys.path.remove(str(CLONE))
    for name in list(sys.modules):
        if str(CLONE) in (getattr(sys.modules[name], "__file__", None) or ""):
            del sys.modules[name]


@needs_clone
def test_official_generator_makes_32px_images(clone_on_path):
    import distill
    old = genie.size_generator(distill.Generator, 32)
    try:
        torch.manual_seed(0)
        out = distill.Generator(latent_dim=256)(torch.randn(4, 256))
    finally:
        distill.Generator.__init__.__defaults__ = old
    assert out.shape == (4, 3, 32, 32)
    assert distill.Generator(latent_dim=256).init_size == 56  # the default restored


# --- the teacher in the code's ResNet layout ------------------------------------------------------------------

def test_resnet20_layout():
    layout = genie.cifar_resnet_layout(_resnet20())
    assert layout["stem"] == 16 and layout["classes"] == 10 and layout["in_channels"] == 3
    assert layout["stages"] == [[(16, 16, 1)] * 3, [(16, 32, 2), (32, 32, 1), (32, 32, 1)],
                                [(32, 64, 2), (64, 64, 1), (64, 64, 1)]]


def test_other_teachers_are_refused():
    from pytorchcv.model_provider import get_model
    with pytest.raises(SystemExit, match="basic-block"):
        genie.cifar_resnet_layout(get_model("preresnet20_cifar10", pretrained=False))
    with pytest.raises(SystemExit, match="CIFAR ResNets"):
        genie.cifar_resnet_layout(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_state_dict_names_follow_the_code_resnet():
    teacher = _resnet20()
    sd = genie.official_state_dict(teacher)
    assert len(sd) == len(teacher.state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.2.bn2.bias",
                "layer2.0.downsample.0.weight", "layer3.0.downsample.1.running_mean", "layer3.2.conv2.weight",
                "fc.weight", "fc.bias"):
        assert key in sd
    assert torch.equal(sd["layer2.0.downsample.0.weight"],
                       teacher.features.stage2.unit1.identity_conv.conv.weight)
    assert torch.equal(sd["layer3.2.bn1.running_mean"], teacher.features.stage3.unit3.body.conv1.bn.running_mean)


@needs_clone
def test_rebuilt_teacher_gives_the_teacher_logits_and_the_code_finds_its_layers(clone_on_path):
    import models.resnet
    from reconstruct import quantize_model
    teacher = _resnet20()
    rebuilt = genie.official_resnet(teacher, models.resnet)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), teacher(x), atol=1e-5)
    blocks = [n for n, m in rebuilt.named_modules() if type(m).__name__ == "BasicBlock"]
    assert blocks == [f"layer{s}.{u}" for s in (1, 2, 3) for u in range(3)]
    identities = [n for n, m in rebuilt.named_modules() if isinstance(m, nn.Identity)]
    assert len(identities) == 7  # every block without a downsample
    q = quantize_model(rebuilt, 4, 4, (nn.Conv2d, nn.Linear, nn.Identity))
    layers = [(n, m) for n, m in q.named_modules() if type(m).__name__ == "QuantizableLayer"]
    assert layers[0][0] == "conv1" and layers[0][1].activation_quantizer is None
    assert layers[0][1].weight_quantizer.n_bits == 8
    assert layers[1][0] == "layer1.0.conv1" and layers[1][1].activation_quantizer.n_bits == 8
    assert layers[-1][0] == "fc" and layers[-1][1].weight_quantizer.n_bits == 8
    assert layers[-1][1].activation_quantizer.n_bits == 8


# --- arguments and the parent ---------------------------------------------------------------------------------

def test_arguments_defaults_and_refusals():
    a = genie.parse_args(["--official", "/x"])
    assert a.seeds == [0, 1, 2] and a.quant == "brecq" and (a.wbit, a.abit) == (4, 4) and not a.dfqbench
    assert Path(a.out) == genie.OUT and a.method_overrides == [] and a.max_samples is None
    a = genie.parse_args(["--official", "/x", "--seeds", "3", "--method-overrides", *TINY, "--max-samples", "100"])
    assert a.seeds == [3] and a.method_overrides == TINY and a.max_samples == 100
    assert genie.dfqbench_overrides(a, 3) == ["method=genie", "quant=brecq", "wbit=4", "abit=4", "seed=3",
                                              "threads=1", *TINY, "model=resnet20_cifar10", "dataset=cifar10",
                                              "dataset.max_samples=100"]
    with pytest.raises(SystemExit):
        genie.parse_args(["--official", "/x", "--method-overrides", "quant=gdfq"])


def test_parent_writes_the_record_and_the_parity_row(tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "reconstruct.py").write_text("")
    calls = []

    def fake_child(script, args, log, env=None):
        seed = int(args[args.index("--seed") + 1])
        calls.append((args, env))
        return {"top1": 80.0 + seed, "quantize_s": 10.0, "distill_s": 4.0, "reconstruct_s": 6.0,
                "distill_s_per_step": 0.2, "reconstruct_s_per_iteration": 0.01, "blocks": 11,
                "model": "resnet20_cifar10", "dataset": "cifar10", "n_test": 100, "device": "cpu",
                "fp32_check": {"official_path_top1": 87.0, "dfqbench_top1": 87.0}}

    def fake_dfqbench(overrides, dest, log, allow_diverged=False, in_sweeps=False):
        seed = int(next(o for o in overrides if o.startswith("seed=")).split("=")[1])
        return {"top1": 81.0 + seed, "quantize_time_s": 9.0, "overrides": [*overrides, "force=true"], "info": {}}

    monkeypatch.setattr(common, "run_child", fake_child)
    monkeypatch.setattr(common, "run_dfqbench", fake_dfqbench)
    out, table = tmp_path / "out", tmp_path / "parity.csv"
    genie.main(["--official", str(clone), "--seeds", "0", "2", "--max-samples", "100", "--method-overrides", *TINY,
                "--out", str(out), "--csv", str(table), "--dfqbench", "--deps", "/deps"])
    args, env = calls[0]
    assert json.loads(args[args.index("--main-kwargs") + 1])["recon_batch"] == 1
    assert env["PYTHONPATH"].split(os.pathsep)[0] == "/deps" and env["OMP_NUM_THREADS"] == "1"
    record = json.loads((out / "w4a4" / "official.json").read_text())
    assert record["top1_mean"] == 81.0 and record["seeds"] == [0, 2] and record["main_kwargs"]["samples"] == 32
    assert record["official_repo"] == "SamsungLabs/Genie"
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 1
    row = rows[0]
    assert (row["method"], row["quant"], row["wbit"], row["abit"], row["n_seeds"]) == ("genie", "brecq", "4", "4", "2")
    assert (row["official_top1_mean"], row["dfqbench_top1_mean"]) == ("81.00", "82.00")
    assert row["schedule"] == " ".join(TINY)
    # --reuse-official takes the record (same seeds, commit, budget) and runs no child
    calls.clear()
    genie.main(["--official", str(clone), "--seeds", "0", "2", "--max-samples", "100", "--method-overrides", *TINY,
                "--out", str(out), "--csv", str(table), "--reuse-official"])
    assert calls == []
    # ... but not for another budget
    genie.main(["--official", str(clone), "--seeds", "0", "2", "--max-samples", "100", "--method-overrides",
                *TINY[:-1], "method.reconstruct.iterations=30", "--out", str(out), "--csv", str(table),
                "--reuse-official"])
    assert len(calls) == 2
