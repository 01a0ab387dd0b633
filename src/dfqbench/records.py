"""Run records: one JSON file per run, written atomically, identified by a hash of the resolved config.

A finished record is reused (the run is skipped) only when its run fingerprint equals the new run's: the config
hash, every other config value that can change a number, the checkpoint's sha256, the test set's identity, the
device, the dfqbench source files and the numeric packages' versions. The config hash alone leaves out where the
teacher and data come from and where the run happens, so it cannot say that a record is still right."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

RECORD_NAME = "record.json"
# Keys that say where things are, how verbose a run is or where it is mirrored, not what is computed: left out
# of the config hash.
_NOT_HASHED = {"paths", "force", "progress", "threads", "device", "hydra", "eval", "logger", "skip_redundant"}
_NOT_HASHED_NESTED = {("model", "checkpoint"), ("dataset", "root"), ("dataset", "download"),
                      ("dataset", "num_workers"), ("dataset", "in_memory"), ("dataset", "root_env"),
                      ("dataset", "train_dirs"), ("model", "dataset")}  # model.dataset: a declaration, newer
_PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "pytorchcv", "timm", "pandas", "dfqbench")
# The fingerprint's config part leaves out only what cannot change a number: verbosity, resources, where the run
# is written or mirrored, and `device`, which the fingerprint holds resolved (auto -> cpu or cuda). `schedule` is
# left out as for the config hash: the training methods carry it as `method.schedule`.
_NOT_FINGERPRINTED = {"hydra", "progress", "force", "logger", "skip_redundant", "threads", "device", "schedule"}
_NOT_FINGERPRINTED_NESTED = {("paths", "output_dir"), ("paths", "cache_dir"), ("dataset", "num_workers"),
                             ("dataset", "download"), ("dataset", "in_memory"), ("model", "dataset")}
_FINGERPRINT_PACKAGES = ("torch", "torchvision", "pytorchcv", "timm")
FINGERPRINT_FIELDS = ("config_hash", "config", "checkpoint", "data", "device", "code", "packages")


# keys added after records were made, left out of the hash at their neutral value so that those records keep
# their hash (and their place in the tables): each computes nothing different from before the key existed
_NEUTRAL = {("export",): "none", ("quant", "layers", "input_range"): "calibrated", ("bit_pairs",): None,
            ("quant", "bias"): "float", ("compile",): "none", ("method", "generator", "mix_norm"): "vector",
            ("quant", "fold_scope"): "graph", ("quant", "layers", "norm_abit"): None,
            ("method", "generator", "labels"): "teacher", ("precision",): "fp32",
            ("quant", "act", "add_inputs"): False}


def _drop_neutral(config: dict) -> dict:
    config = copy.deepcopy(config)
    for path, neutral in _NEUTRAL.items():
        node = config
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node and node[path[-1]] == neutral:
            del node[path[-1]]
    return config


def hashed_config(config: dict) -> dict:
    """The part of a resolved config that config_hash digests: without location/verbosity keys and keys at their
    neutral value (_NEUTRAL)."""
    return _without(_drop_neutral(config), _NOT_HASHED, _NOT_HASHED_NESTED)


def config_hash(config: dict) -> str:
    """sha256 (first 16 hex) of hashed_config(config)."""
    return _digest(hashed_config(config))


def _without(config: dict, keys: set, nested: set) -> dict:
    kept = {k: v for k, v in config.items() if k not in keys}
    for group, key in nested:
        if isinstance(kept.get(group), dict):
            kept[group] = {k: v for k, v in kept[group].items() if k != key}
    return kept


def _digest(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# what only renders finished records (tables, figures): editing it cannot change a run's numbers, so it is left
# out of the code digest (a finished sweep stays finished after a change to the tables)
RENDER_ONLY = ("results/", "tables.py", "plots.py")


@functools.cache
def code_digest(subpackage: str = "") -> str:
    """sha256 (first 16 hex) of every dfqbench source file (path and content) that can change a run's numbers
    (RENDER_ONLY left out), or of one subpackage's (`synth`), read once per process."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted((here / subpackage).rglob("*.py")):
        if path.relative_to(here).as_posix().startswith(RENDER_ONLY):
            continue
        h.update(path.relative_to(here).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def fingerprint(config: dict, chash: str, checkpoint: str, data: dict, device: str) -> dict:
    """Everything that can change a run's numbers. `config` is the resolved config, `checkpoint` the sha256 of the
    checkpoint file (or where zoo/random weights come from), `data` dfqbench.data.data_identity, `device` the
    resolved device (cpu, cuda:<GPU name>)."""
    versions = package_versions()
    return {"config_hash": chash, "config": _digest(_without(config, _NOT_FINGERPRINTED, _NOT_FINGERPRINTED_NESTED)),
            "checkpoint": checkpoint, "data": data, "device": device, "code": code_digest(),
            "packages": {name: versions.get(name) for name in _FINGERPRINT_PACKAGES}}


def describe_fingerprint(fp: dict) -> str:
    data = fp.get("data") or {}
    return (f"config hash {fp.get('config_hash')} (values {fp.get('config')}), checkpoint {fp.get('checkpoint')}, "
            f"data {data.get('root')} ({data.get('files')} files, digest {data.get('digest')}), "
            f"device {fp.get('device')}, code {fp.get('code')}")


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """One phrase per field that differs: `<what>: <old> then, <new> now`."""
    labels = {"config_hash": "config hash", "config": "config values", "checkpoint": "checkpoint",
              "data": "data", "device": "device", "code": "dfqbench source files", "packages": "package versions"}
    out = []
    for key in FINGERPRINT_FIELDS:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):
            a, b = (f"{d.get('root')} ({d.get('files')} files, {d.get('bytes')} bytes, digest {d.get('digest')})"
                    for d in (a, b))
        elif key == "packages" and isinstance(a, dict) and isinstance(b, dict):
            a, b = (", ".join(f"{n} {d.get(n)}" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n))
                    for d in (a, b))
        out.append(f"{labels[key]}: {a} then, {b} now")
    return out


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def reusable_record(run_dir: Path, fp: dict) -> tuple[dict | None, str | None]:
    """The finished record in run_dir when its fingerprint equals `fp`, and one line saying why it is or is not
    reused (None: there is no record to speak of)."""
    path = run_dir / RECORD_NAME
    record = read_record(path)
    if not record:
        return None, None
    if record.get("status") != "done":
        return None, f"{path} holds a {record.get('status')} run: computing it again"
    old = record.get("fingerprint")
    if not isinstance(old, dict):
        return None, (f"{path} is a finished run without a run fingerprint (an older dfqbench wrote it): its "
                      f"checkpoint, data, device and code cannot be checked, so it is computed again")
    differences = fingerprint_differences(old, fp)
    if differences:
        return None, f"{path} is a finished run of something else ({'; '.join(differences)}): computing it again"
    return record, (f"skipped: {path} is a finished run with the same fingerprint: {describe_fingerprint(fp)}; "
                    f"force=true computes it again")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def git_commit() -> str | None:
    """The commit of the code this process runs (read once, at the first record). $DFQ_GIT_COMMIT, when set, wins:
    a copy of the working tree on another machine (scripts/gpu_session.sh) may carry no git, or a stale one."""
    if os.environ.get("DFQ_GIT_COMMIT"):
        return os.environ["DFQ_GIT_COMMIT"]
    return commit_of(Path(__file__).resolve().parents[2])


CODE_PATHS = ("src", "conf")  # what can change a run's numbers (the fingerprint's code and config)


def commit_of(root: Path) -> str | None:
    """HEAD of the checkout at `root`, `-dirty` when its code or configs (CODE_PATHS) differ from it: what a sweep
    writes under results/ (Hydra's multirun.yaml, records) does not make the code dirty."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                               cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
