"""A finished run is reused only when its run fingerprint matches: another checkpoint, data folder (or the same
folder with other files), device or code computes the run again and shows the real numbers; a run says what it
resolved and writes a real log file."""

import glob
import hashlib
import json
import shutil
from importlib import metadata

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, TEACHER_SHA256, run_cli
from dfqbench import records, runner
from dfqbench.__main__ import CONF_DIR, group_options
from dfqbench.data import data_identity, load_eval_set
from dfqbench.errors import ConfigError
from dfqbench.evaluate import evaluate
from dfqbench.models import check_model_dataset, load_model

SLICE = 200
RUN_DIR = "runs/resnet20_cifar10-cifar10/gdfq/rtn/w4a4-s0"  # the default run folder of `method=rtn`


def _cfg(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=["progress=false", *overrides])


def _record(run_dir):
    return json.loads((run_dir / "record.json").read_text())


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fp32_top1(checkpoint, root, max_samples=None):
    """The teacher's top-1 on the test set, computed here, without dfqbench's caches."""
    cfg = _cfg(f"model.checkpoint={checkpoint}", f"dataset.root={root}", f"dataset.max_samples={max_samples or 'null'}",
               "dataset.num_workers=0")
    model = load_model(cfg.model).model.eval()
    data = load_eval_set(cfg.dataset, cfg.dataset.mean, cfg.dataset.std, cache_dir=None)
    return round(evaluate(model, data, 500, torch.device("cpu"))["top1"], 4)


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory, teacher):
    """The shared teacher with every weight tensor perturbed slightly (a fixed seed): another checkpoint."""
    state = torch.load(teacher, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.dim() > 1
             else v for k, v in state.items()}
    path = tmp_path_factory.mktemp("teachers") / "other_teacher.pt"
    torch.save(state, path)
    return path


def _small_copy(cifar10_root, dest, start, per_class=10):
    """dest/test/<class>/ with `per_class` of the real test images of each class, from the start-th on."""
    for folder in sorted((cifar10_root / "test").iterdir()):
        (dest / "test" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[start:start + per_class]:
            shutil.copy(image, dest / "test" / folder.name / image.name)
    return dest


def test_a_run_with_another_checkpoint_is_computed_again(tmp_path, cifar10_root, teacher, other_teacher):
    """`python -m dfqbench method=rtn model.checkpoint=/other/teacher.pt` after a finished run of the default
    teacher: not skipped, and the numbers are the other teacher's."""
    common = ["method=rtn", f"dataset.root={cifar10_root}", f"dataset.max_samples={SLICE}",
              f"paths.output_dir={tmp_path / 'out'}"]
    run_dir = tmp_path / "out" / RUN_DIR
    first = run_cli(*common, f"model.checkpoint={teacher}", cache=tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    before = _record(run_dir)
    assert before["checkpoint_sha256"] == TEACHER_SHA256 and before["fingerprint"]["checkpoint"] == TEACHER_SHA256

    proc = run_cli(*common, f"model.checkpoint={other_teacher}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "skipped" not in proc.stderr
    other_sha = _sha256(other_teacher)
    assert f"checkpoint: {TEACHER_SHA256} then, {other_sha} now" in proc.stderr
    after = _record(run_dir)
    assert after["checkpoint_sha256"] == other_sha != TEACHER_SHA256
    assert after["fingerprint"]["checkpoint"] == other_sha
    expected = _fp32_top1(other_teacher, cifar10_root, SLICE)
    assert after["fp32_top1"] == expected != before["fp32_top1"]  # the other teacher's real number, not the old
    assert f"FP32 top-1 {expected:.2f}" in proc.stdout

    again = run_cli(*common, f"model.checkpoint={other_teacher}", cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr
    skipped = [line for line in again.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1  # what it matched, in one line
    for needle in (str(run_dir / "record.json"), before["config_hash"], other_sha, str(cifar10_root.resolve()),
                   "device cpu", records.code_digest()):
        assert needle in skipped[0], needle
    assert _record(run_dir)["created_at"] == after["created_at"]


def test_changed_files_or_another_data_folder_are_computed_again(tmp_path, cifar10_root, teacher):
    a = _small_copy(cifar10_root, tmp_path / "a", 0)
    b = _small_copy(cifar10_root, tmp_path / "b", 10)
    run_dir = tmp_path / "run"
    common = ["method=rtn", f"model.checkpoint={teacher}", f"hydra.run.dir={run_dir}"]
    first = run_cli(*common, f"dataset.root={a}", cache=tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    on_a = _record(run_dir)
    assert on_a["n_test"] == 100 and on_a["fingerprint"]["data"]["root"] == str((a / "test").resolve())
    assert on_a["fp32_top1"] == _fp32_top1(teacher, a)

    # the same folder, its images replaced by b's under the same names: the path alone would match
    for folder in sorted((a / "test").iterdir()):
        for old, new in zip(sorted(folder.iterdir()), sorted((b / "test" / folder.name).iterdir())):
            shutil.copy(new, old)
    proc = run_cli(*common, f"dataset.root={a}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "skipped" not in proc.stderr
    assert f"data: {(a / 'test').resolve()} (100 files, {on_a['fingerprint']['data']['bytes']} bytes" in proc.stderr
    changed = _record(run_dir)
    assert changed["fingerprint"]["data"]["root"] == on_a["fingerprint"]["data"]["root"]
    assert changed["fingerprint"]["data"]["digest"] != on_a["fingerprint"]["data"]["digest"]
    # a decoded-set or FP32 cache keyed by the path would show a's old number here
    expected = _fp32_top1(teacher, b)
    assert changed["fp32_top1"] == _fp32_top1(teacher, a) == expected != on_a["fp32_top1"]

    # another folder, even with the same files
    proc = run_cli(*common, f"dataset.root={b}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "skipped" not in proc.stderr
    assert f"data: {(a / 'test').resolve()} (100 files" in proc.stderr and f"{(b / 'test').resolve()}" in proc.stderr
    on_b = _record(run_dir)
    assert on_b["fingerprint"]["data"]["root"] == str((b / "test").resolve())
    assert on_b["fingerprint"]["data"]["bytes"] == changed["fingerprint"]["data"]["bytes"]  # the same images
    assert on_b["fp32_top1"] == expected


def test_another_device_or_an_unfingerprinted_record_is_computed_again(tmp_path, cifar10_root, teacher, cache_dir,
                                                                      monkeypatch, caplog):
    cfg = _cfg("method=rtn", f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}",
               f"dataset.max_samples={SLICE}", f"paths.cache_dir={cache_dir}", "wbit=8", "abit=8")
    first = runner.run(cfg, tmp_path)
    assert first["fingerprint"]["device"] == "cpu" and not first.get("skipped")
    assert runner.run(cfg, tmp_path).get("skipped")

    monkeypatch.setattr(runner, "device_label", lambda device: "cuda:Simulated GPU")  # the same run on a GPU
    with caplog.at_level("INFO", logger="dfqbench.runner"):
        on_gpu = runner.run(cfg, tmp_path)
    assert not on_gpu.get("skipped") and _record(tmp_path)["fingerprint"]["device"] == "cuda:Simulated GPU"
    assert "device: cpu then, cuda:Simulated GPU now" in caplog.text
    monkeypatch.undo()
    assert not runner.run(cfg, tmp_path).get("skipped")  # and back on the CPU: the GPU's record is not reused
    assert runner.run(cfg, tmp_path).get("skipped")

    old = _record(tmp_path)
    del old["fingerprint"]  # a record of an older dfqbench: its config hash matches, nothing else is known
    records.write_json_atomic(tmp_path / "record.json", old)
    caplog.clear()
    with caplog.at_level("INFO", logger="dfqbench.runner"):
        again = runner.run(cfg, tmp_path)
    assert not again.get("skipped") and "without a run fingerprint" in caplog.text
    assert again["top1"] == old["top1"] and "fingerprint" in _record(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_record_is_not_reused_on_the_gpu(tmp_path, cifar10_root, teacher, cache_dir):
    common = ["method=rtn", f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}",
              f"dataset.max_samples={SLICE}", f"hydra.run.dir={tmp_path}"]
    assert run_cli(*common, "device=cpu", cache=cache_dir).returncode == 0
    proc = run_cli(*common, "device=cuda", cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" not in proc.stderr and "device: cpu then, cuda:" in proc.stderr
    assert _record(tmp_path)["device"].startswith("cuda")


def test_the_fingerprint_covers_code_config_and_packages():
    config = OmegaConf.to_container(_cfg("method=rtn"), resolve=True)
    data = {"root": "/d/test", "files": 3, "bytes": 10, "digest": "x"}
    base = records.fingerprint(config, "h", "sha", data, "cpu")
    assert base["code"] == records.code_digest() and len(base["code"]) == 16
    assert base["packages"]["torch"] == metadata.version("torch")
    # values that change numbers change the fingerprint; verbosity, resources and the output folder do not
    for key, value in (("method", {"name": "other"}), ("eval", {"batch_size": 7}), ("wbit", 3)):
        assert records.fingerprint({**config, key: value}, "h", "sha", data, "cpu")["config"] != base["config"]
    for key, value in (("progress", False), ("threads", 3), ("force", True),
                       ("paths", {**config["paths"], "output_dir": "/elsewhere"})):
        assert records.fingerprint({**config, key: value}, "h", "sha", data, "cpu") == base
    changed = {**base, "code": "0" * 16, "packages": {**base["packages"], "torch": "0.0"}}
    assert records.fingerprint_differences(base, changed) == [
        f"dfqbench source files: {base['code']} then, {'0' * 16} now",
        f"package versions: torch {metadata.version('torch')} then, torch 0.0 now"]


def test_data_identity_follows_names_and_sizes_not_the_images(tmp_path):
    root = tmp_path / "d"
    for c in range(10):
        (root / "test" / f"c{c}").mkdir(parents=True)
        (root / "test" / f"c{c}" / "0.png").write_bytes(b"x" * (c + 1))
    cfg = OmegaConf.create({"name": "cifar10", "root": str(root), "split_dirs": ["test"], "num_classes": 10,
                            "download": False})
    first = data_identity(cfg)
    assert (first["files"], first["bytes"], first["root"]) == (10, 55, str((root / "test").resolve()))
    assert data_identity(cfg) == first
    (root / "test" / "c0" / "0.png").write_bytes(b"yy")
    assert data_identity(cfg)["digest"] != first["digest"] and data_identity(cfg)["bytes"] == 56


def test_committed_records_keep_their_config_hash():
    """The config hash (which `make tables` dedupes by) is unchanged by the new `model.dataset` key. Superseded
    records (results/superseded/) were made under presets that changed since: they keep their old hash."""
    paths = [p for p in sorted(glob.glob(str(REPO / "results" / "**" / "record.json"), recursive=True))
             if "/superseded/" not in p and json.loads(open(p).read()).get("method") in ("rtn", "fp32")][:6]
    if not paths:
        pytest.skip("no committed rtn/fp32 record")
    for path in paths:
        record = json.loads(open(path).read())
        resolved = OmegaConf.to_container(_cfg(*record["overrides"]), resolve=True)
        assert "dataset" in resolved["model"]
        assert records.config_hash({k: v for k, v in resolved.items() if k != "schedule"}) == record["config_hash"]


def test_every_model_preset_agrees_with_its_dataset_and_experiment():
    for model in group_options("model"):
        if model in ("pytorchcv", "timm", "torchvision"):  # any architecture: nothing declared
            assert _cfg(f"model={model}", "model.arch=resnet18").model.dataset is None
            continue
        cfg = _cfg(f"model={model}")
        declared = cfg.model.dataset
        check_model_dataset(cfg.model, declared)  # its own data set: no error
        for other in set(group_options("dataset")) - {declared}:
            # the timm presets name the teacher by its timm arch (model=deit_base -> deit_base_patch16_224)
            with pytest.raises(ConfigError, match=f"model={cfg.model.name} is a teacher for dataset={declared}, not "
                                                  f"dataset={other}; use dataset={declared}"):
                check_model_dataset(cfg.model, other)
    for experiment in group_options("experiment"):
        cfg = _cfg(f"experiment={experiment}")
        check_model_dataset(cfg.model, cfg.dataset.name)
    pytorchcv = _cfg("model=pytorchcv", "model.arch=resnet56_cifar100").model
    with pytest.raises(ConfigError, match="from the pytorchcv name resnet56_cifar100"):
        check_model_dataset(pytorchcv, "cifar10")
    check_model_dataset(_cfg("model=pytorchcv", "model.arch=resnet18").model, "imagenet")


def test_a_run_says_what_it_resolved_and_writes_a_log_file(tmp_path, cifar10_root, teacher, cache_dir):
    proc = run_cli("method=rtn", f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}",
                   f"dataset.max_samples={SLICE}", "wbit=8", "abit=8", f"hydra.run.dir={tmp_path}", cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    record = _record(tmp_path)
    expected = [f"dfqbench: teacher: resnet20_cifar10 (pytorchcv) from checkpoint {teacher.resolve()} "
                f"(sha256 {TEACHER_SHA256})",
                f"dfqbench: data: cifar10 test set {(cifar10_root / 'test').resolve()} (10000 files",
                "dfqbench: device: cpu", f"dfqbench: output: {tmp_path.resolve()}"]
    lines = proc.stderr.splitlines()
    assert len(lines) >= len(expected), proc.stderr
    for line, start in zip(lines, expected):  # the first four lines, before any work
        assert line.startswith(start), (line, start)
    log = (tmp_path / "dfqbench.log").read_text()
    assert not (tmp_path / "__main__.log").exists()
    for needle in (f"sha256 {TEACHER_SHA256}", "device: cpu", f"output: {tmp_path.resolve()}",
                   "command: python -m dfqbench", f"quantized top-1 {record['top1']:.2f}"):
        assert needle in log, needle


def test_the_code_digest_leaves_out_only_what_renders_tables(tmp_path):
    """records.py loaded from a copy of the package: editing the tables or figures code keeps the digest (a
    finished sweep stays finished), editing a quantizer or a top-level module does not."""
    import importlib.util
    from pathlib import Path
    pkg = tmp_path / "dfqbench"
    shutil.copytree(Path(records.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))

    def digest() -> str:
        spec = importlib.util.spec_from_file_location("records_copy", pkg / "records.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.code_digest()

    base = digest()
    assert base == records.code_digest()
    for rel in ("results/markdown.py", "tables.py", "plots.py"):
        with open(pkg / rel, "a") as f:
            f.write("\n# edited\n")
        assert digest() == base, rel
    for rel in ("quant/quantizers/layers.py", "runner.py", "results_helper.py"):
        with open(pkg / rel, "a") as f:
            f.write("\n# edited\n")
        changed = digest()
        assert changed != base, rel
        base = changed


def test_new_convention_keys_at_their_neutral_values_keep_the_config_hash():
    base = {"method": {"name": "rtn"}, "quant": {"name": "gdfq", "fold_bn": True, "layers": {"first_wbit": 8}}}
    neutral = {"method": {"name": "rtn"}, "quant": {"name": "gdfq", "fold_bn": True, "fold_scope": "graph",
                                                    "layers": {"first_wbit": 8, "norm_abit": None}}}
    assert records.config_hash(neutral) == records.config_hash(base)
    for key, value in (("fold_scope", "module"), ("norm_abit", 8)):
        changed = json.loads(json.dumps(neutral))
        (changed["quant"] if key == "fold_scope" else changed["quant"]["layers"])[key] = value
        assert records.config_hash(changed) != records.config_hash(base)  # computes something else: a new hash


def test_precision_fp32_keeps_the_config_hash_and_bf16_is_another_run():
    base = {"method": {"name": "zeroq"}, "quant": {"name": "gdfq"}}
    assert records.config_hash({**base, "precision": "fp32"}) == records.config_hash(base)
    assert records.config_hash({**base, "precision": "bf16"}) != records.config_hash(base)


def test_run_folders_of_another_precision_get_a_suffix():
    from dfqbench.__main__ import precision_tag
    assert (precision_tag("fp32"), precision_tag(None), precision_tag("bf16")) == ("", "", "-bf16")


def test_a_commit_is_dirty_only_when_its_code_or_configs_changed(tmp_path):
    """A sweep writes tracked files under results/ (Hydra's multirun.yaml): that must not mark every record it
    writes `-dirty`; a changed file under src/ or conf/ must."""
    import subprocess
    from dfqbench.records import commit_of

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    for rel in ("src/m.py", "conf/c.yaml", "results/sweeps/multirun.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("a\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert commit_of(tmp_path) == head
    (tmp_path / "results/sweeps/multirun.yaml").write_text("b\n")
    (tmp_path / "untracked.py").write_text("b\n")
    assert commit_of(tmp_path) == head
    for rel in ("conf/c.yaml", "src/m.py"):
        (tmp_path / rel).write_text("b\n")
        assert commit_of(tmp_path) == head + "-dirty"
        git("checkout", "--", rel)
    assert commit_of(tmp_path / "nowhere") is None  # not a checkout (an installed package)
