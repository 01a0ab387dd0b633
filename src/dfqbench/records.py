"""Run records: one JSON file per run, written atomically, identified by a hash of the resolved config."""

from __future__ import annotations

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
                      ("dataset", "train_dirs")}
_PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "pytorchcv", "timm", "pandas", "dfqbench")


def config_hash(config: dict) -> str:
    """sha256 (first 16 hex) of the resolved config without location/verbosity keys."""
    kept = {k: v for k, v in config.items() if k not in _NOT_HASHED}
    for group, key in _NOT_HASHED_NESTED:
        if isinstance(kept.get(group), dict):
            kept[group] = {k: v for k, v in kept[group].items() if k != key}
    blob = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def finished_record(run_dir: Path, chash: str) -> dict | None:
    record = read_record(run_dir / RECORD_NAME)
    if record and record.get("status") == "done" and record.get("config_hash") == chash:
        return record
    return None


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
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
