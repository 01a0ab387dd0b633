"""Every config group option composes, and the composed config builds its method and convention."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dfqbench.__main__ import CONF_DIR, GROUPS, group_options
from dfqbench.models import model_datasets, models_for_dataset
from dfqbench.runner import build_convention, build_method, validate


def _compose(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_option_composes(group, option):
    if option == "wandb":
        pytest.importorskip("wandb")
    extra = ["model.arch=resnet18"] if option in ("pytorchcv", "torchvision", "timm") else []
    if group == "model":  # with its own data set: model and dataset must agree
        datasets, _ = model_datasets(_compose(f"model={option}", *extra).model)
        extra += [f"dataset={datasets[0]}"] if datasets else []
    elif group == "dataset":
        extra.append(f"model={models_for_dataset(option)[0]}")
    cfg = _compose(f"{group}={option}", *extra)
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)
    method = build_method(cfg)
    convention = build_convention(cfg, method)
    assert convention.name == cfg.quant.name


@pytest.mark.parametrize("override,message", [
    ("dataset.max_samples=0", "dataset.max_samples=0 is not valid; use a positive integer, or null for the whole"),
    ("dataset.max_samples=abc", "dataset.max_samples='abc' is not valid"),
    ("threads=0", "threads=0 is not valid; use a positive integer, or null for torch's default"),
    ("threads=true", "threads=True is not valid"),
    ("eval.batch_size=-2", "eval.batch_size=-2 is not valid; use a positive integer"),
    ("eval.batch_size=null", "eval.batch_size=None is not valid; use a positive integer")])
def test_counts_must_be_positive_integers(override, message):
    """0 images is not 'all of them' (a falsy max_samples used to evaluate the whole test set), 0 threads not
    torch's default: each is refused in one line before any work; null keeps its meaning where it has one."""
    from dfqbench.errors import ConfigError
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        validate(_compose(override))
    validate(_compose("dataset.max_samples=null", "threads=null", "dataset.max_samples=7", "threads=2"))


def test_default_config_is_zeroq_w4a4_gdfq_on_resnet20():
    cfg = _compose()
    assert (cfg.method.name, cfg.model.name, cfg.dataset.name, cfg.quant.name, cfg.wbit, cfg.abit) == (
        "zeroq", "resnet20_cifar10", "cifar10", "gdfq", 4, 4)


def test_presets_encode_the_convention_classes():
    brecq = _compose("quant=brecq").quant
    assert brecq.act.sites == "layer_inputs" and brecq.layers.first_wbit == 8 and brecq.layers.last_abit == 8
    gdfq = _compose("quant=gdfq").quant
    assert gdfq.act.sites == "after_relu" and gdfq.layers.first_wbit is None and not gdfq.fold_bn


def test_dfq_method_requires_folded_batchnorm_under_every_convention():
    cfg = _compose("method=dfq", "quant=gdfq")
    assert build_convention(cfg, build_method(cfg)).fold_bn


def test_generic_zoo_model_takes_any_arch():
    cfg = _compose("model=pytorchcv", "model.arch=resnet56_cifar10")
    assert cfg.model.name == "resnet56_cifar10" and cfg.model.source == "pytorchcv"


def test_paths_come_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DFQ_CIFAR10_ROOT", str(tmp_path))
    monkeypatch.setenv("DFQ_MODELS_DIR", str(tmp_path / "m"))
    cfg = _compose()
    assert cfg.dataset.root == str(tmp_path) and cfg.paths.models_dir == str(tmp_path / "m")


def test_cpu_long_is_the_cpu_warmup_with_six_times_the_student_steps():
    cpu, long = (_compose("method=gdfq", f"schedule={s}").schedule for s in ("cpu", "cpu_long"))
    for key in ("iters_per_epoch", "batch_size", "warmup_epochs", "calib_epochs", "fixed_set_images"):
        assert long[key] == cpu[key], key
    student = [(s.epochs - s.warmup_epochs) * s.iters_per_epoch for s in (cpu, long)]
    assert student == [360, 2160]
    # the learning-rate cut at the same point of the run: 80 %
    assert [s.milestones[0] / s.epochs for s in (cpu, long)] == [0.8, 0.8]


def test_lis_is_an_alias_of_mixmix():
    lis, mixmix = (OmegaConf.to_container(_compose(f"method={m}").method, resolve=True) for m in ("lis", "mixmix"))
    assert lis == mixmix and lis["name"] == "mixmix"
