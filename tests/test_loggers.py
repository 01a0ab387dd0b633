"""logger=none (default) writes nothing but the record; logger=wandb mirrors it, offline without an account."""

import pytest

from conftest import compose_cfg
from dfqbench import loggers
from dfqbench.errors import ConfigError
from dfqbench.runner import run, validate


def _rtn(cache_dir, cifar10_root, teacher, *overrides):
    return compose_cfg("method=rtn", "wbit=8", "abit=8", f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}",
                       "dataset.max_samples=200", f"paths.cache_dir={cache_dir}", *overrides)


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """No account, no network, nothing written outside tmp_path."""
    pytest.importorskip("wandb")
    for var in ("HOME", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def test_default_logger_is_none_and_writes_no_wandb_folder(tmp_path, cache_dir, cifar10_root, teacher):
    cfg = _rtn(cache_dir, cifar10_root, teacher)
    assert cfg.logger.name == "none"
    assert run(cfg, tmp_path)["status"] == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_wandb_offline_writes_a_run_folder_in_the_run_dir(tmp_path, cache_dir, cifar10_root, teacher,
                                                          wandb_home):
    record = run(_rtn(cache_dir, cifar10_root, teacher, "logger=wandb", "logger.mode=offline",
                      "logger.tags=[test]"), tmp_path / "run")
    assert record["status"] == "done" and (tmp_path / "run" / "record.json").is_file()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the run's log, for `wandb sync`


def test_wandb_mode_defaults_to_disabled(tmp_path, cache_dir, cifar10_root, teacher, wandb_home):
    cfg = _rtn(cache_dir, cifar10_root, teacher, "logger=wandb")
    assert cfg.logger.mode == "disabled"
    assert run(cfg, tmp_path)["status"] == "done"
    assert not (tmp_path / "wandb").exists()


def test_missing_wandb_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"logger=wandb needs the wandb package: pip install"):
        validate(compose_cfg("logger=wandb"))
    validate(compose_cfg())  # logger=none never needs it


def test_logger_choice_does_not_change_the_config_hash(tmp_path, cache_dir, cifar10_root, teacher, wandb_home):
    first = run(_rtn(cache_dir, cifar10_root, teacher), tmp_path)
    again = run(_rtn(cache_dir, cifar10_root, teacher, "logger=wandb"), tmp_path)
    assert again.get("skipped") and again["created_at"] == first["created_at"]
