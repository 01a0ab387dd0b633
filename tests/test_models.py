"""Teachers from local files (the zoos' download paths pointed at disk), sha256 pinning."""

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TEACHER_SHA256
from dfqbench.errors import ConfigError
from dfqbench.models import file_sha256, load_model


def _cfg(**kw):
    base = {"name": "x", "source": "pytorchcv", "arch": "resnet20_cifar10", "checkpoint": None, "sha256": None,
            "pretrained": False, "num_classes": 10, "normalize": None}
    return OmegaConf.create({**base, **kw})


def test_shared_teacher_loads_with_its_sha256(teacher):
    loaded = load_model(_cfg(checkpoint=str(teacher), sha256=TEACHER_SHA256))
    assert loaded.sha256 == TEACHER_SHA256 and loaded.weights == "checkpoint"


def test_models_dir_is_searched_by_arch(teacher):
    loaded = load_model(_cfg(), models_dir=str(teacher.parent))
    assert loaded.checkpoint == str(teacher)


def test_a_relative_checkpoint_is_kept_absolute(teacher, tmp_path, monkeypatch):
    """A caller that changes folders after loading (the PSAQ-ViT parity child runs in the official clone's copy)
    reads the file again from loaded.checkpoint: a relative path would point nowhere there."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "t.pt").write_bytes(teacher.read_bytes())
    monkeypatch.chdir(tmp_path)
    loaded = load_model(_cfg(checkpoint="models/t.pt", sha256=TEACHER_SHA256))
    assert loaded.checkpoint == str(tmp_path / "models" / "t.pt")


@pytest.mark.parametrize("source,arch", [("torchvision", "resnet18"), ("timm", "resnet18"),
                                         ("pytorchcv", "resnet56_cifar10")])
def test_zoo_architectures_load_local_checkpoints(tmp_path, source, arch):
    random_model = load_model(_cfg(source=source, arch=arch)).model
    path = tmp_path / f"{arch}.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in random_model.state_dict().items()}}, path)
    loaded = load_model(_cfg(source=source, arch=arch, checkpoint=str(path)))
    for (k, v), w in zip(random_model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(v, w), k
    assert loaded.weights == "checkpoint" and len(loaded.sha256) == 64


def test_wrong_checkpoint_for_the_arch_is_a_clear_error(teacher):
    with pytest.raises(ConfigError, match="does not fit"):
        load_model(_cfg(arch="resnet56_cifar10", checkpoint=str(teacher)))


def test_random_weights_are_pinned_by_state_dict_digest():
    torch.manual_seed(0)
    first = load_model(_cfg())
    torch.manual_seed(0)
    assert load_model(_cfg()).sha256 == first.sha256
    with pytest.raises(ConfigError, match="refusing"):
        load_model(_cfg(sha256="0" * 64))


COMMITTED = sorted(p for p in (Path(__file__).resolve().parents[1] / "conf" / "model").glob("*.yaml")
                   if str(OmegaConf.load(p).get("checkpoint") or "").startswith("models/"))


@pytest.mark.parametrize("preset", COMMITTED, ids=lambda p: p.stem)
def test_each_teacher_trained_here_is_committed_with_its_facts(preset):
    """conf/model/<arch>.yaml, models/<arch>.pt and models/<arch>.json say the same thing: the file's sha256 is
    the preset's and the facts file's, and the top-1 the preset's comment quotes is the facts file's."""
    repo = preset.parents[2]
    cfg = OmegaConf.load(preset)
    weights = repo / cfg.checkpoint
    facts = json.loads(weights.with_suffix(".json").read_text())
    assert file_sha256(weights) == cfg.sha256 == facts["sha256"]
    assert facts["arch"] == cfg.arch and facts["test_top1"] > 10  # above chance on 10 classes
    quoted = re.findall(r"test top-1 ([\d.]+)", preset.read_text())
    assert quoted in ([], [f"{facts['test_top1']:.2f}"]), (quoted, facts["test_top1"])
