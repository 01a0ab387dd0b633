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


def test_missing_folders_and_unknown_sources_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"calib_data=real needs the training images: dataset.train_root="):
        calibration_batches("real", None, _ctx(train_root=None), 4, 4)
    with pytest.raises(ConfigError, match="paths.other_domain_root=.*is not a folder"):
        calibration_batches("other_domain", None, _ctx(other_domain_root=str(tmp_path / "none")), 4, 4)
    with pytest.raises(ValueError, match="choose one of: " + ", ".join(SOURCES)):
        check_source("imagenet")


def test_synthetic_data_is_cached_per_teacher_settings_and_seed(tmp_path):
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
