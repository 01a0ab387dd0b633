"""Calibration-data sources (dfqbench.synth.calib_data) and the cross-domain calibration method."""

import json

import pytest
import torch

from conftest import IMAGENET_SAMPLES, run_cli
from dfqbench.errors import ConfigError
from dfqbench.methods.base import QuantContext
from dfqbench.quant import Convention
from dfqbench.synth import calib_data
from dfqbench.synth.calib_data import SOURCES, calibration_batches, check_source

MEAN, STD = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])


def _ctx(**kwargs) -> QuantContext:
    return QuantContext(Convention(name="gdfq"), 8, 8, 0, torch.device("cpu"), (3, 32, 32), 10, progress=False,
                        mean=MEAN, std=STD, **kwargs)


def _pixels(batch: torch.Tensor) -> torch.Tensor:
    return batch * STD.view(1, -1, 1, 1) + MEAN.view(1, -1, 1, 1)


@pytest.mark.parametrize("source", ["uniform_noise", "gaussian_noise", "procedural"])
def test_image_free_sources_give_normalized_pixels_in_range_and_depend_on_the_seed(source):
    batches = calibration_batches(source, None, _ctx(), num_images=10, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    pixels = _pixels(torch.cat(batches))
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.1
    again = torch.cat(calibration_batches(source, None, _ctx(), num_images=10, batch_size=4))
    other_seed = _ctx()
    other_seed.seed = 1
    assert torch.equal(again, torch.cat(batches))
    assert not torch.equal(torch.cat(calibration_batches(source, None, other_seed, 10, 4)), again)


def test_procedural_images_have_flat_regions_and_edges():
    x = _pixels(torch.cat(calibration_batches("procedural", None, _ctx(), 8, 8)))
    dx = (x[..., 1:] - x[..., :-1]).abs()
    assert (dx < 1e-6).float().mean() > 0.3  # inside shapes: flat
    assert (dx > 0.2).float().mean() > 0.01  # shape borders: edges


def test_real_and_other_domain_sources_read_image_folders(cifar10_root):
    ctx = _ctx(train_root=str(cifar10_root / "train"), other_domain_root=str(IMAGENET_SAMPLES))
    real = calibration_batches("real", None, ctx, 6, 4)
    assert [tuple(b.shape) for b in real] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    pixels = _pixels(torch.cat(real))
    # JPEG pixels are multiples of 1/255: normalization undone exactly
    assert torch.allclose(pixels * 255, (pixels * 255).round(), atol=1e-3)
    if IMAGENET_SAMPLES.is_dir():  # ImageNet images, resized and centre-cropped to the CIFAR input
        other = torch.cat(calibration_batches("other_domain", None, ctx, 5, 5))
        assert other.shape == (5, 3, 32, 32) and _pixels(other).min() >= -1e-3


def test_listed_source_reads_the_named_images_in_the_file_order(tmp_path):
    from PIL import Image

    root = tmp_path / "train"
    for name, value in (("a/1.png", 10), ("a/2.png", 200), ("b/3.png", 51)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (value, value, value)).save(root / name)
    listing = tmp_path / "calib.txt"
    listing.write_text(f"b/3.png\n{root / 'a/1.png'}\n\na/2.png\n")  # relative to train_root, or absolute
    ctx = _ctx(train_root=str(root), calib_list=str(listing))
    batches = calibration_batches("listed", None, ctx, 2, 1)
    pixels = _pixels(torch.cat(batches)) * 255
    assert [tuple(b.shape) for b in batches] == [(1, 3, 32, 32)] * 2
    assert torch.allclose(pixels[:, :, 0, 0], torch.tensor([[51.0] * 3, [10.0] * 3]), atol=1e-3)  # file order
    assert len(ctx.info["calib_list_sha256"]) == 64
    other_seed = _ctx(train_root=str(root), calib_list=str(listing))
    other_seed.seed = 7  # the list fixes the set: no draw
    assert torch.equal(torch.cat(calibration_batches("listed", None, other_seed, 2, 1)), torch.cat(batches))
    with pytest.raises(ConfigError, match="names 3 images; the method asks for 4"):
        calibration_batches("listed", None, ctx, 4, 4)
    listing.write_text("a/1.png\nc/9.png\n")
    with pytest.raises(ConfigError, match=r"names 1 image\(s\) that do not exist, e.g. .*c/9.png"):
        calibration_batches("listed", None, ctx, 2, 2)
    with pytest.raises(ConfigError, match="calib_data=listed needs paths.calib_list"):
        calibration_batches("listed", None, _ctx(train_root=str(root)), 2, 2)


def test_missing_folders_and_unknown_sources_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"calib_data=real needs the training images: dataset.train_root="):
        calibration_batches("real", None, _ctx(train_root=None), 4, 4)
    with pytest.raises(ConfigError, match="paths.other_domain_root=.*is not a folder"):
        calibration_batches("other_domain", None, _ctx(other_domain_root=str(tmp_path / "none")), 4, 4)
    with pytest.raises(ValueError, match="choose one of: " + ", ".join(SOURCES)):
        check_source("imagenet")


def test_synthetic_data_is_cached_per_teacher_settings_seed_and_code(tmp_path, monkeypatch):
    calls = []

    def compute():
        calls.append(1)
        return [torch.randn(2, 3, 4, 4)]

    ctx = _ctx(cache_dir=str(tmp_path), model_sha256="abc")
    first = calib_data.cached(ctx, "distill", {"iterations": 5}, compute)
    second = calib_data.cached(ctx, "distill", {"iterations": 5}, compute)
    assert len(calls) == 1 and torch.equal(first[0], second[0]) and ctx.info["calib_cached"]
    calib_data.cached(ctx, "distill", {"iterations": 6}, compute)
    ctx.seed = 1
    calib_data.cached(ctx, "distill", {"iterations": 5}, compute)
    assert len(calls) == 3
    # a change to the synthesis code (its digest) makes new batches
    monkeypatch.setattr(calib_data, "code_digest", lambda subpackage="": "changed")
    calib_data.cached(ctx, "distill", {"iterations": 5}, compute)
    assert len(calls) == 4
    # another synthesis precision makes other images; fp32 keeps the key it had before precision existed
    ctx.precision = "bf16"
    calib_data.cached(ctx, "distill", {"iterations": 5}, compute)
    assert len(calls) == 5
    ctx.precision = "fp32"
    calib_data.cached(ctx, "distill", {"iterations": 5}, compute)
    assert len(calls) == 5


def test_crossdomain_cli_procedural_w8a8_is_within_half_a_point_and_bad_source_is_refused(
        tmp_path, cifar10_root, teacher, cache_dir):
    common = [f"dataset.root={cifar10_root}", f"model.checkpoint={teacher}", "threads=1",
              "dataset.max_samples=1000", "wbit=8", "abit=8"]
    proc = run_cli("method=crossdomain", "method.calib_data=procedural", *common,
                   f"hydra.run.dir={tmp_path / 'ok'}", cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "ok" / "record.json").read_text())
    assert record["method"] == "crossdomain-procedural" and record["info"]["calib_data"] == "procedural"
    assert abs(record["fp32_top1"] - record["top1"]) <= 0.5
    bad = run_cli("method=zeroq", "method.calib_data=imagenet", *common, f"hydra.run.dir={tmp_path / 'bad'}",
                  cache=cache_dir)
    assert bad.returncode == 2 and not (tmp_path / "bad" / "record.json").exists()
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "dfqbench: error: method=zeroq: method.calib_data='imagenet' is not a known calibration source; choose")


# ---- the shared synthesis loop (dfqbench.synth.bn_loop) -------------------------------------------------------

def _bn_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model


def test_moment_distance_is_the_squared_l2_per_first_dimension():
    from dfqbench.synth.bn_loop import moment_distance

    x = torch.randn(3, 2, 4, 4)
    mean, std = x.mean((2, 3)), x.std((2, 3))
    expected = (mean - 0.5).pow(2).sum() / 3 + (std - 2.0).pow(2).sum() / 3
    got = moment_distance([(x, (0.5, 2.0))], lambda a: (a.mean((2, 3)), a.std((2, 3))))
    assert torch.allclose(got, expected)


def test_the_shared_loop_freezes_the_teacher_runs_the_hooks_and_cleans_up():
    from dfqbench.errors import UnsupportedModel
    from dfqbench.synth.bn_distill import per_sample_moments
    from dfqbench.synth.bn_loop import ImageBatch, Synthesis, moment_distance, synthesize_batches

    class Probe(Synthesis):
        what, name, num_batches, iterations = "the probe", "probe", 2, 30

        def __init__(self):
            self.frozen, self.extra_calls, self.start, self.end = [], 0, [], []

        def prepare(self, model, taps):
            self.model, self.taps = model, taps
            return [model[2].register_forward_pre_hook(self._count)]

        def _count(self, module, inputs):
            self.extra_calls += 1

        def new_batch(self, index):
            x = torch.randn(3 + index, 3, 6, 6, generator=torch.Generator().manual_seed(index))
            self.start.append(self._distance(x))
            return ImageBatch(x, lr=0.1, patience=10, min_lr=1e-4)

        def loss(self, batch, x, logits, taps):
            self.frozen.append(not any(p.requires_grad for p in self.model.parameters()))
            assert taps is self.taps and logits.shape == (x.shape[0], 5)
            return moment_distance(taps.pairs(), per_sample_moments)

        def finish(self, model, batch):
            self.end.append(self._distance(batch.x))
            return batch.result()

        @torch.no_grad()
        def _distance(self, x):
            self.model(x)
            return float(moment_distance(self.taps.pairs(), per_sample_moments))

    model = _bn_model()
    model[0].bias.requires_grad_(False)  # a mixed set of flags comes back as it was
    probe = Probe()
    batches = synthesize_batches(model, probe, torch.device("cpu"))
    assert [tuple(b.shape) for b in batches] == [(3, 3, 6, 6), (4, 3, 6, 6)]
    assert not any(b.requires_grad for b in batches)
    assert all(probe.frozen) and len(probe.frozen) == 2 * 30
    assert probe.extra_calls == 2 * 30 + 4  # the steps, and two no-grad forwards per batch in the probe
    assert all(end < start for start, end in zip(probe.start, probe.end))  # closer to the BN statistics
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True, True, True]
    assert not any(m._forward_pre_hooks for m in model.modules())

    with pytest.raises(UnsupportedModel,
                       match=r"the probe needs a model with BatchNorm2d \(or, in a 1-D net, BatchNorm1d\) layers"):
        synthesize_batches(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), Probe(), torch.device("cpu"))


def test_bf16_precision_runs_the_teacher_convolutions_in_bf16_and_keeps_images_and_losses_float32():
    from dfqbench.synth.bn_distill import DistillSettings, distill_bn_data
    from dfqbench import precision
    from dfqbench.synth.bn_loop import BNTaps, bn_layers

    model = _bn_model()
    seen = []  # the dtype of the conv output (BN input) per forward, as the conv made it
    model[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    settings = DistillSettings(batch_size=4, iterations=40, lr=0.1)

    def distill():
        seen.clear()
        return distill_bn_data(model, (3, 6, 6), settings, torch.Generator().manual_seed(0), torch.device("cpu"))

    fp32 = distill()
    assert set(seen) == {torch.float32}
    with precision.scope("bf16") as scope:
        assert precision.current() == "bf16"
        bf16 = distill()
    assert set(seen) == {torch.bfloat16} and len(seen) == 40
    assert precision.current() == "fp32" and scope.uses == 1  # restored on exit; one loop ran under it
    assert bf16[0].dtype == torch.float32 and not torch.equal(bf16[0], fp32[0])
    assert torch.equal(distill()[0], fp32[0])  # fp32 outside the context: the same images as before

    def bn_loss(x):  # ZeroQ's BN term in float32 for both batches
        with torch.no_grad(), BNTaps(bn_layers(model, "t")) as taps:
            model(x)
            (a, (mean_t, std_t)), = taps.pairs()
            return float(((a.mean((2, 3)) - mean_t) ** 2).sum() + ((a.std((2, 3)) - std_t) ** 2).sum())

    start = bn_loss(torch.zeros(4, 3, 6, 6).uniform_(-0.1, 0.1))
    assert bn_loss(bf16[0]) < 0.1 * start and bn_loss(bf16[0]) < 1.1 * bn_loss(fp32[0])  # as close as fp32 gets
    with pytest.raises(ValueError, match=r"precision='fp16' is not valid; choose one of: fp32, bf16"):
        with precision.scope("fp16"):
            pass
