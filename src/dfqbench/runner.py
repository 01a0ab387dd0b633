"""One run: load teacher and data, evaluate FP32, quantize with the method, evaluate, write the record.

Before anything heavy loads, a run checks its input, resolves its teacher (checkpoint and sha256), test set
(folder and identity) and device, logs them with the output folder, and reuses a finished record only when its
run fingerprint (dfqbench.records) matches. Messages go through `logging` (logger `dfqbench.runner`): Hydra's job
logging (conf/hydra/job_logging/dfqbench.yaml) shows them on stderr and writes them to the run's dfqbench.log.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import logging
import os
import pkgutil
import random
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import deploy, hydra_files, loggers, methods, precision, records, run_lock
from .cpu_allocator import keep_freed_memory
from .data import data_identity, describe_identity, load_eval_set
from .errors import ConfigError
from .method_overrides import apply_per_setting
from .evaluate import evaluate
from .methods.base import Method, QuantContext
from .precision import PRECISIONS
from .train.trainer import COMPILE_MODES
from .models import check_model_dataset, load_model, resolve_weights
from .quant import Convention, check_bits
from .quant.kernels.backend import resolve_backend_name, use_backend

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    """Cheap checks, before any work: raise ConfigError with a one-line message."""
    for key in ("wbit", "abit"):
        try:
            check_bits(key, cfg[key])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed!r} is not valid; use a non-negative integer")
    for key, value, null in (("dataset.max_samples", cfg.dataset.get("max_samples"), "null for the whole test set"),
                             ("threads", cfg.get("threads"), "null for torch's default"),
                             ("eval.batch_size", cfg.eval.batch_size, None)):
        if (value is not None or null is None) and (isinstance(value, bool) or not isinstance(value, int)
                                                     or value < 1):
            raise ConfigError(f"{key}={value!r} is not valid; use a positive integer"
                              + (f", or {null}" if null else ""))
    if OmegaConf.is_missing(cfg.model, "arch"):
        raise ConfigError(f"model={cfg.model.source} needs the architecture: add model.arch=NAME")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r} is not valid; choose one of: auto, cpu, cuda")
    if cfg.get("compile", "none") not in COMPILE_MODES:
        raise ConfigError(f"compile={cfg.compile!r} is not valid; choose one of: {', '.join(COMPILE_MODES)}")
    if cfg.get("precision", "fp32") not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r} is not valid; choose one of: {', '.join(PRECISIONS)}")
    check_model_dataset(cfg.model, str(cfg.dataset.name))
    loggers.check_available(cfg)
    try:
        deploy.check_export(cfg.get("export", "none"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@functools.cache
def import_all_methods() -> None:
    """Import every method module: some register named parts (ACQ's generator, DDAQ's loss terms) that any method
    yaml may then name, and a bad name's list of choices is the same whichever method is run."""
    for module in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{module.name}")


def build_method(cfg: DictConfig) -> Method:
    import_all_methods()
    apply_per_setting(cfg)  # no-op when the run already applied them (with the command line's overrides)
    try:
        return instantiate(cfg.method, _convert_="all")
    except Exception as exc:  # Hydra wraps the constructor's TypeError/ValueError
        cause = exc.__cause__ or exc
        raise ConfigError(f"method={cfg.method.name}: {str(cause).splitlines()[0]}") from None


def build_convention(cfg: DictConfig, method: Method, check_method: bool = True) -> Convention:
    """The run's convention with the method's overrides; bad input (and, with `check_method`, a convention the
    method cannot run under) is a one-line ConfigError."""
    apply_per_setting(cfg)  # no-op when the run already applied them
    try:
        conv = Convention.from_dict(OmegaConf.to_container(cfg.quant, resolve=True))
        if method.convention_overrides:
            conv = conv.with_overrides(method.convention_overrides)
        if check_method:
            method.check_convention(conv)
        resolve_backend_name(conv.backend)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    return conv


def check_deployable(cfg: DictConfig, method: Method, conv: Convention) -> None:
    """A backend preset (`deployable: true`) refuses, in one line, a run whose output its backend cannot express."""
    try:
        deploy.check_deployable(conv, method.name, cfg.wbit, cfg.abit)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def device_label(device: torch.device) -> str:
    """The device as the run fingerprint records it: cpu, or cuda with the GPU's name (numbers differ by GPU)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _parallel_jobs() -> int:
    """How many jobs of this sweep run at once on this machine (hydra/launcher=local_parallel's n_jobs), else 1."""
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except (ImportError, ValueError):  # not inside a Hydra job (tests call run() directly)
        return 1
    jobs = int(launcher.get("n_jobs", 1) or 1) if "joblib" in str(launcher.get("_target_", "")) else 1
    return jobs if jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + jobs)  # joblib: -1 = every core, -2 = all but one


def job_threads(threads: int | None, jobs: int, cores: int | None = None) -> int | None:
    """torch threads for one job: `threads` when given (a warning when jobs x threads oversubscribes the cores);
    with several jobs at once and no `threads`, this job's share of the cores, so that together they use every
    core and no more; else None (torch's default, which follows OMP_NUM_THREADS)."""
    cores = cores or os.cpu_count() or 1
    if threads:
        if threads * jobs > cores:
            log.warning("threads=%d x %d parallel jobs > %d cores: the jobs oversubscribe the machine", threads,
                        jobs, cores)
        return int(threads)
    return max(1, cores // jobs) if jobs > 1 else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _fp32_accuracy(model, data, cfg, sha: str, device, fingerprint: dict) -> dict:
    """FP32 accuracy, cached per (weights, data set and its identity, slice, normalization, device, code): every
    run of a sweep shares it, and a changed test folder, device or code computes it again."""
    key = records.config_hash({"sha": sha, "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
                               "norm": [data.mean.flatten().tolist(), data.std.flatten().tolist()],
                               **{k: fingerprint[k] for k in ("data", "device", "code", "packages")}})
    path = Path(str(cfg.paths.cache_dir)).expanduser() / "fp32" / f"{key}.json"
    cached = records.read_record(path)
    if cached:
        return cached
    result = evaluate(model, data, cfg.eval.batch_size, device, cfg.progress, desc="FP32 eval")
    records.write_json_atomic(path, result)
    return result


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Compute the run into run_dir (or return its finished record). Only one process works in a run folder at a
    time: another one holding it raises run_lock.RunInProgress before anything is checked or written."""
    with run_lock.hold(run_dir, "python -m dfqbench " + " ".join(overrides or [])):
        try:
            return _run(cfg, run_dir, overrides)
        finally:
            hydra_files.drop(run_dir)  # reused or refused: the .hydra files stay those of the record (adopted below)


def _run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None) -> dict:
    validate(cfg)
    apply_per_setting(cfg, overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # the schedule group reaches the hash through the training methods' own `schedule: ${schedule}`; the others
    # ignore it, and their hash (and finished records) must not change with it
    chash = records.config_hash({k: v for k, v in resolved.items() if k != "schedule"})
    method = build_method(cfg)
    convention = build_convention(cfg, method)
    check_deployable(cfg, method, convention)
    device = _device(cfg.device)
    # what the fingerprint needs, nothing heavier: the checkpoint's sha256 and the test folder's file list
    weights = resolve_weights(cfg.model, cfg.paths.models_dir)
    identity = data_identity(cfg.dataset)
    fingerprint = records.fingerprint(resolved, chash, weights.identity, identity, device_label(device))
    sliced = f", {cfg.dataset.max_samples} of them evaluated (dataset.max_samples)" if cfg.dataset.max_samples else ""
    log.info("teacher: %s (%s) from %s", cfg.model.name, cfg.model.source, weights.describe(cfg.model))
    log.info("data: %s test set %s%s", cfg.dataset.name, describe_identity(identity), sliced)
    log.info("device: %s", fingerprint["device"])
    log.info("output: %s", run_dir.resolve())
    done, why = records.reusable_record(run_dir, fingerprint)
    if done is not None and not cfg.force:
        log.info(why)
        done["skipped"] = True  # not in the file: tells a sweep's summary this run computed nothing
        return done
    hydra_files.adopt(run_dir)  # computed (again): this job's .hydra files describe the record it writes
    if done is not None:
        log.info("force=true: computing %s again", run_dir / records.RECORD_NAME)
    elif why:
        log.warning(why)
    keep_freed_memory()
    threads = job_threads(cfg.threads, _parallel_jobs())
    if threads:
        torch.set_num_threads(threads)
    _seed_everything(cfg.seed)  # before building: random initialization (model.pretrained=false) is seeded too
    loaded = load_model(cfg.model, cfg.paths.models_dir, weights)
    try:
        method.check_model(loaded.model)
    except ValueError as exc:
        raise ConfigError(f"method={method.name} cannot quantize model={cfg.model.name}: {exc}") from None
    norm = cfg.model.normalize or cfg.dataset
    data = load_eval_set(cfg.dataset, norm.mean, norm.std, cfg.paths.cache_dir, identity)
    if convention.layers.input_abit and convention.layers.input_range == "pixels":
        mean, std = data.mean.flatten(), data.std.flatten()  # what a [0, 1] image becomes, per channel
        convention.pixel_range = (((0 - mean) / std).tolist(), ((1 - mean) / std).tolist())

    started = time.perf_counter()
    record = {
        "status": "running", "method": method.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
        "quant": convention.name, "wbit": cfg.wbit if method.quantizes else 32,
        "abit": cfg.abit if method.quantizes else 32, "seed": cfg.seed, "config_hash": chash,
        "fingerprint": fingerprint,
        "checkpoint_sha256": loaded.sha256, "weights": loaded.weights, "checkpoint": loaded.checkpoint,
        "n_test": data.num_samples, "stochastic": method.stochastic,
        "fidelity": method.fidelity, "convention": convention.to_dict(),
        "method_config": resolved["method"], "overrides": overrides or [], "config": resolved,
        "versions": records.package_versions(), "git_commit": records.git_commit(), "device": str(device),
        "threads": torch.get_num_threads(), "host": socket.gethostname(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        model = loaded.model.to(device).to(memory_format=torch.channels_last).eval()
        fp32 = _fp32_accuracy(model, data, cfg, loaded.sha256, device, fingerprint)
        _seed_everything(cfg.seed)
        ctx = QuantContext(convention, cfg.wbit, cfg.abit, cfg.seed, device,
                           tuple(data_shape(data, cfg)), cfg.dataset.num_classes, cfg.progress,
                           mean=data.mean.flatten(), std=data.std.flatten(), model_sha256=loaded.sha256,
                           cache_dir=cfg.paths.cache_dir, train_root=train_root(cfg.dataset),
                           other_domain_root=cfg.paths.get("other_domain_root"), run_dir=run_dir,
                           calib_list=cfg.paths.get("calib_list"),
                           compile=cfg.get("compile", "none"), precision=cfg.get("precision", "fp32"),
                           test_eval=lambda m: evaluate(m, data, cfg.eval.batch_size, device)["top1"])
        t0 = time.perf_counter()
        with use_backend(resolve_backend_name(convention.backend, device)), precision.scope(ctx.precision) as sp:
            qmodel = method.quantize(copy.deepcopy(model), ctx)
            if sp.name != "fp32" and not sp.uses and not ctx.info.get("calib_cached"):  # cached: warned then
                log.warning("precision=%s changed nothing: method=%s runs no teacher through the synthesis loop "
                            "(synth.bn_loop) or the generator-QAT trainer", sp.name, method.name)
            quantize_s = time.perf_counter() - t0
            result = evaluate(qmodel.to(memory_format=torch.channels_last), data, cfg.eval.batch_size, device,
                              cfg.progress, desc="quantized eval")
            deployed = {} if cfg.get("export", "none") == "none" else deploy.deploy_and_score(
                qmodel, model, data, ctx.input_shape, cfg.eval.batch_size, cfg.threads, run_dir)
    except ConfigError:  # bad input found while working (an undecodable test image, ...): no failed record
        raise
    except Exception as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      wall_time_s=round(time.perf_counter() - started, 3))
        records.write_json_atomic(run_dir / records.RECORD_NAME, record)
        loggers.log_record(cfg, record, run_dir)
        raise
    record.update(
        status="done", fp32_top1=round(fp32["top1"], 4), fp32_top5=round(fp32["top5"], 4),
        top1=round(result["top1"], 4), top5=round(result["top5"], 4),
        drop=round(fp32["top1"] - result["top1"], 4), quantize_time_s=round(quantize_s, 3),
        eval_images_per_s=round(result["images_per_s"], 1), **deployed, info=ctx.info,
        wall_time_s=round(time.perf_counter() - started, 3),
    )
    records.write_json_atomic(run_dir / records.RECORD_NAME, record)
    loggers.log_record(cfg, record, run_dir)  # the local record first; a logger only mirrors it
    return record


def train_root(dataset_cfg) -> str | None:
    """The training split next to the test split (root/train, ImageFolder), for `calib_data=real`."""
    root = Path(str(dataset_cfg.root)).expanduser()
    for name in dataset_cfg.get("train_dirs") or ["train"]:
        if (root / name).is_dir():
            return str(root / name)
    return None


def data_shape(data, cfg) -> list[int]:
    if data.images is not None:
        return list(data.images.shape[1:])
    return [len(cfg.dataset.mean), int(cfg.dataset.image_size), int(cfg.dataset.image_size)]


def summary(record: dict, path: Path) -> str:
    head = (f"{record['method']} {record['model']}/{record['dataset']} W{record['wbit']}A{record['abit']} "
            f"[{record['quant']}] seed {record['seed']}")
    return (f"{head}\n  FP32 top-1 {record['fp32_top1']:.2f}  quantized top-1 {record['top1']:.2f}  "
            f"drop {record['drop']:.2f}  (top-5 {record['top5']:.2f}, {record['n_test']} images)  "
            f"wall {record['wall_time_s']:.1f} s\n  record: {path}")


def dumps(record: dict) -> str:
    return json.dumps(record, indent=2, default=str)
