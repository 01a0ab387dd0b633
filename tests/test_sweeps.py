"""Sweeps: Hydra's launchers (serial, local parallel, submitit local, SLURM config), failed and refused jobs,
a killed sweep resumed, the experiment presets. Sweeps run as `python -m dfqbench -m` subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import REPO
from dfqbench.__main__ import CONF_DIR, group_options, precheck
from dfqbench.errors import ConfigError
from dfqbench.runner import build_method
from dfqbench.sweep import redundant_reason

GRID = ["method=rtn", "quant=gdfq,brecq", "wbit=8,4", "abit=${wbit}"]  # 4 small jobs
# A stand-in for a method that breaks or takes its time: wraps RTN.quantize, then runs the CLI in this process.
_WRAPPED_CLI = """
import os, sys, time
from dfqbench.methods.rtn import RTN
from dfqbench.__main__ import main
quantize = RTN.quantize
def wrapped(self, model, ctx):
    time.sleep(float(os.environ.get("TEST_QUANTIZE_SLEEP", "0")))
    if ctx.wbit == int(os.environ.get("TEST_FAIL_WBIT", "0")):
        raise RuntimeError(f"injected failure at W{ctx.wbit}")
    return quantize(self, model, ctx)
RTN.quantize = wrapped
main()
"""


def _compose(*overrides, hydra_config=False):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_config)


def _command(tmp_path, cache_dir, cifar10_root, teacher, *args, wrapped=False):
    entry = ["-c", _WRAPPED_CLI] if wrapped else ["-m", "dfqbench"]
    return [sys.executable, *entry, "-m", "progress=false", "threads=1", "dataset.max_samples=200",
            f"dataset.root={cifar10_root}", f"model.checkpoint={teacher}", f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={tmp_path / 'outputs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args]


def _sweep(*command_args, env=None, **kwargs):
    proc = subprocess.run(_command(*command_args, **kwargs), cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})})
    summary = [line for line in proc.stdout.splitlines() if line.startswith("dfqbench: sweep finished")]
    return proc, (summary[-1] if summary else "")


def _records(root):
    """Every record.json under root, parsed (a corrupt one fails the test here)."""
    return {p.parent.relative_to(root).as_posix(): json.loads(p.read_text()) for p in root.rglob("record.json")}


# ---- configs ---------------------------------------------------------------------------------------------------

def test_precheck_leaves_hydra_arguments_to_hydra_and_checks_the_new_groups():
    precheck(["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra/launcher=local_parallel",
              "hydra/launcher=submitit_local", "experiment=cifar10_resnet20", "logger=wandb", "method=rtn,dfq"])
    for bad, options in (("experiment=nope", "cifar10_resnet20"), ("logger=nope", "wandb")):
        with pytest.raises(ConfigError, match=options):
            precheck([bad])


def test_a_setting_the_preset_does_not_have_is_a_one_line_error_with_its_keys():
    """`method.iteratons=3` (a typo) and `quant.act.add_inputs=true` under a preset that leaves it at its default
    name the preset, its keys, the closest key and the `++` form; each value of a swept group is checked; a key
    the preset has, `++`/`+` forms, Hydra's own keys and experiment presets pass."""
    with pytest.raises(ConfigError) as err:
        precheck(["method=zeroq", "method.iteratons=3"])
    assert str(err.value).startswith("method.iteratons=3: method=zeroq has no key 'iteratons' under method; did you "
                                     "mean method.iterations? its keys: _target_, batch_size,")
    assert str(err.value).endswith("(++method.iteratons=3 sets a key whether the preset lists it or not)")
    with pytest.raises(ConfigError, match=r"^quant.act.add_inputs=true: quant=gdfq has no key 'add_inputs' under "
                                          r"quant.act; its keys: estimator, granularity, lp, percentile, sites, "):
        precheck(["-m", "quant=onnxruntime,gdfq", "quant.act.add_inputs=true"])  # onnxruntime lists it, gdfq not
    with pytest.raises(ConfigError, match="method=gdfq has no key 'lrr' under method.generator"):
        precheck(["method=gdfq", "method.generator.lrr=1"])
    precheck(["quant=onnxruntime", "quant.act.add_inputs=false", "method=zeroq", "method.iterations=3",
              "dataset.max_samples=200", "++quant.act.add_inputs=true", "+method.extra=1", "hydra.job.chdir=false"])
    precheck(["experiment=cifar10_resnet20", "method.anything=1"])  # the preset's sweep picks the methods


def test_slurm_launcher_composes_and_renders_the_sbatch_script(tmp_path, monkeypatch):
    cfg = _compose("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                   "hydra.launcher.array_parallelism=2", f"hydra.sweep.dir={tmp_path / 'sweep'}", hydra_config=True)
    conf = cfg.hydra.launcher
    assert conf._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (conf.partition, conf.gpus_per_node, conf.timeout_min, conf.array_parallelism) == ("gpu", 1, 30, 2)
    assert conf.cpus_per_task and conf.mem_gb and "signal_delay_s" in conf  # the plugin's schema is underneath
    # the plugin maps the config to submitit; submitit renders sbatch lines (a stand-in srun makes it think it
    # is on a cluster; nothing is submitted)
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    scripts = []

    class RenderOnly(submitit.AutoExecutor):
        def map_array(self, fn, *iterables):
            self._executor.parameters["map_count"] = len(iterables[0])
            scripts.append(self._executor._make_submission_file_text("srun python", "uid"))
            return []

    monkeypatch.setattr(submitit, "AutoExecutor", RenderOnly)
    launcher = instantiate(conf)
    launcher.config = cfg
    assert launcher.launch([["wbit=8"], ["wbit=4"], ["wbit=2"]], initial_job_idx=0) == []
    for line in ("--partition=gpu", "--gpus-per-node=1", "--time=30", f"--cpus-per-task={conf.cpus_per_task}",
                 f"--mem={conf.mem_gb}GB", "--array=0-2%2", "--job-name=dfqbench"):
        assert f"#SBATCH {line}\n" in scripts[0]


def test_local_launchers_extend_the_plugins():
    parallel = _compose("hydra/launcher=local_parallel", "hydra.launcher.n_jobs=3", hydra_config=True)
    assert parallel.hydra.launcher._target_.endswith("JoblibLauncher") and parallel.hydra.launcher.n_jobs == 3
    local = _compose("hydra/launcher=submitit_local", hydra_config=True)
    assert local.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")


# Methods the W = A presets leave out, and why (each has its own sweep, in its yaml's header)
NOT_IN_WXAX_PRESETS = {"pnmq": "weight-only mixed precision at a compression ratio (method.compression_ratio=...)",
                       "mixmix": "needs the CIFAR-10 teacher pool (models/vgg8_bn_cifar10.pt, mobilenetv2_cifar10.pt)",
                       "lis": "an alias of mixmix: its runs are mixmix's",
                       "dfed": "needs the CIFAR-10 teacher pool (models/vgg8_bn_cifar10.pt, mobilenetv2_cifar10.pt)"}
# Transformer methods and baselines: the cifar10_vit preset (W4A8/W8A8/W4A4 under quant=psaqvit)
VIT_METHODS = {"fp32", "minmax_calib", "percentile_calib", "gaussian_calib", "psaqvit", "psaqvit2"}
TRANSFORMER_ONLY = {"psaqvit", "psaqvit2"}
CNN_EXPERIMENTS = [e for e in group_options("experiment") if e not in ("tuning_robustness", "cifar10_vit")]


@pytest.mark.parametrize("experiment", CNN_EXPERIMENTS)
def test_experiment_presets_sweep_every_method_at_the_seed_tables_bit_widths(experiment):
    cfg = _compose(f"experiment={experiment}", "wbit=5", hydra_config=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.skip_redundant and cfg.abit == 5  # abit follows
    assert set(params["method"]) == set(group_options("method")) - set(NOT_IN_WXAX_PRESETS) - TRANSFORMER_ONLY - (
        VIT_METHODS - {"fp32"})
    assert params["quant"] == ["gdfq", "brecq"] and params["seed"] == ["0", "1", "2"]
    reported = pd.read_csv(REPO / "results" / "reported.csv", keep_default_na=False)
    table = reported[(reported.model == cfg.model.name) & (reported.dataset == cfg.dataset.name)
                     & (reported.wbit == reported.abit) & (reported.mixed_precision.astype(str) != "True")]
    assert set(table.wbit) | {32, 8, 6} <= set(map(int, params["wbit"]))


def test_vit_preset_runs_the_transformer_methods_at_its_bit_pairs_only():
    cfg = _compose("experiment=cifar10_vit", hydra_config=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert set(params["method"]) == VIT_METHODS and cfg.model.name == "vit_cifar10" and cfg.quant.name == "psaqvit"

    def reason(method, wbit, abit):
        cell = _compose("experiment=cifar10_vit", f"method={method}", f"wbit={wbit}", f"abit={abit}")
        return redundant_reason(cell, build_method(cell))

    assert reason("psaqvit", 4, 8) is None and reason("gaussian_calib", 4, 4) is None
    assert "bit_pairs" in reason("psaqvit", 8, 4) and "bit_pairs" in reason("psaqvit", 32, 8)
    assert reason("fp32", 32, 32) is None


def test_redundant_cells_of_a_product():
    def reason(method, wbit, seed):
        cfg = _compose(f"method={method}", f"wbit={wbit}", f"abit={wbit}", f"seed={seed}")
        return redundant_reason(cfg, build_method(cfg))

    assert reason("fp32", 32, 0) is None and reason("rtn", 4, 0) is None and reason("zeroq", 4, 2) is None
    assert "W32A32" in reason("fp32", 8, 0) and "fp32 cell" in reason("dfq", 32, 0)
    assert "deterministic" in reason("rtn", 4, 1) and "deterministic" in reason("fp32", 32, 2)
    assert reason("dfqf", 4, 0) is None  # under gdfq, the default convention
    cfg = _compose("method=dfqf", "quant=brecq", "wbit=4", "abit=4")
    assert "not applicable: method=dfqf" in redundant_reason(cfg, build_method(cfg))
    cfg = _compose("method=dfqf", "quant.weight.granularity=per_row", "wbit=4", "abit=4")
    with pytest.raises(ConfigError, match="per_row"):  # bad input is refused, not skipped as not applicable
        redundant_reason(cfg, build_method(cfg))


# ---- sweeps ----------------------------------------------------------------------------------------------------

def test_experiment_sweep_runs_each_cell_once_and_drops_the_redundant_ones(tmp_path, cache_dir, cifar10_root,
                                                                            teacher):
    args = ("experiment=cifar10_resnet20", "method=fp32,rtn", "quant=gdfq", "wbit=32,8", "seed=0,1")
    proc, summary = _sweep(tmp_path, cache_dir, cifar10_root, teacher, *args)
    assert proc.returncode == 0, proc.stderr
    assert "8 jobs: 2 computed, 0 skipped (finished before), 6 redundant, 0 failed" in summary
    records = _records(tmp_path / "sweep")
    assert set(records) == {"resnet20_cifar10-cifar10/gdfq/fp32/w32a32-s0", "resnet20_cifar10-cifar10/gdfq/rtn/w8a8-s0"}
    job_dirs = {p.parent.parent.relative_to(tmp_path / "sweep").as_posix()
                for p in (tmp_path / "sweep").rglob(".hydra/config.yaml")}
    assert job_dirs == set(records)  # Hydra's folders of the cells not run are gone


def test_failed_jobs_leave_failed_records_and_the_rerun_retries_only_them(tmp_path, cache_dir, cifar10_root,
                                                                         teacher):
    proc, summary = _sweep(tmp_path, cache_dir, cifar10_root, teacher, *GRID, wrapped=True,
                           env={"TEST_FAIL_WBIT": "4"})
    assert proc.returncode == 1, proc.stderr
    assert "4 jobs: 2 computed, 0 skipped (finished before), 0 redundant, 2 failed" in summary
    assert proc.stderr.count("dfqbench: failed: ") == 2 and "injected failure at W4" in proc.stderr
    records = _records(tmp_path / "sweep")
    assert sorted((r["wbit"], r["status"]) for r in records.values()) == [(4, "failed")] * 2 + [(8, "done")] * 2
    assert all(r["error"] == "RuntimeError: injected failure at W4" for r in records.values() if r["wbit"] == 4)
    rerun, summary = _sweep(tmp_path, cache_dir, cifar10_root, teacher, *GRID)
    assert rerun.returncode == 0, rerun.stderr
    assert "4 jobs: 2 computed, 2 skipped (finished before)" in summary
    after = _records(tmp_path / "sweep")
    assert all(r["status"] == "done" for r in after.values())
    assert {k: r["created_at"] for k, r in after.items() if r["wbit"] == 8} == {
        k: r["created_at"] for k, r in records.items() if r["wbit"] == 8}


def test_bad_input_in_a_serial_sweep_stops_it_with_one_line(tmp_path, cache_dir, cifar10_root, teacher):
    proc, summary = _sweep(tmp_path, cache_dir, cifar10_root, teacher, *GRID, f"dataset.root={tmp_path / 'none'}")
    assert proc.returncode == 2 and not summary
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dfqbench: error: ")]
    assert len(errors) == 1 and "dataset.root=" in errors[0]
    assert not _records(tmp_path)


def test_a_run_folder_another_process_holds_is_left_to_it(tmp_path, cache_dir, cifar10_root, teacher):
    """Two sweeps over the same cells: the second computes none of the first one's folders (run_lock)."""
    from dfqbench import run_lock

    held = "resnet20_cifar10-cifar10/gdfq/rtn/w8a8-s0"
    with run_lock.hold(tmp_path / "sweep" / held, "python -m dfqbench (this test)"):
        proc, summary = _sweep(tmp_path, cache_dir, cifar10_root, teacher, *GRID)
        assert proc.returncode == 1, proc.stderr
        assert "4 jobs: 3 computed, 0 skipped (finished before), 0 redundant, 0 failed, 0 refused (bad input), " \
               "1 busy" in summary
        busy = [line for line in proc.stderr.splitlines() if line.startswith("dfqbench: busy: ")]
        assert len(busy) == 1 and f"pid {os.getpid()} on " in busy[0] and "(this test)" in busy[0], proc.stderr
        assert held not in _records(tmp_path / "sweep") and len(_records(tmp_path / "sweep")) == 3
    rerun, summary = _sweep(tmp_path, cache_dir, cifar10_root, teacher, *GRID)
    assert rerun.returncode == 0, rerun.stderr
    assert "4 jobs: 1 computed, 3 skipped (finished before)" in summary
    assert _records(tmp_path / "sweep")[held]["status"] == "done"
    assert not list((tmp_path / "sweep").rglob(run_lock.LOCK_NAME))


@pytest.mark.parametrize("how", ["SIGKILL to the process group", "SIGTERM to the sweep process"])
def test_a_killed_sweep_resumes_and_computes_every_run_exactly_once(tmp_path, cache_dir, cifar10_root, teacher,
                                                                     how):
    command = _command(tmp_path, cache_dir, cifar10_root, teacher, *GRID, wrapped=True)
    env = {**os.environ, "TEST_QUANTIZE_SLEEP": "1.5"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not _records(tmp_path / "sweep") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if how.startswith("SIGKILL"):
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    if how.startswith("SIGTERM"):
        assert proc.returncode == 130, stderr
        assert "dfqbench: interrupted (SIGTERM); run the same command again" in stderr
    before = _records(tmp_path / "sweep")
    assert 1 <= len(before) < 4 and all(r["status"] == "done" for r in before.values()), (before, stderr)
    rerun, summary = _sweep(tmp_path, cache_dir, cifar10_root, teacher, *GRID)
    assert rerun.returncode == 0, rerun.stderr
    assert f"4 jobs: {4 - len(before)} computed, {len(before)} skipped (finished before)" in summary
    after = _records(tmp_path / "sweep")
    assert len(after) == 4 and all(r["status"] == "done" for r in after.values())
    assert all(after[k]["created_at"] == r["created_at"] for k, r in before.items())
    assert not list((tmp_path / "sweep").rglob(".record.json.*"))  # no temporary file left behind


def _four_runs_then_a_rerun_that_computes_nothing(tmp_path, cache_dir, cifar10_root, teacher, *launcher):
    proc, summary = _sweep(tmp_path, cache_dir, cifar10_root, teacher, *launcher, *GRID)
    assert proc.returncode == 0, proc.stderr
    assert "4 jobs: 4 computed" in summary
    records = _records(tmp_path / "sweep")
    assert len(records) == 4 and {(r["quant"], r["wbit"], r["abit"]) for r in records.values()} == {
        (q, w, w) for q in ("gdfq", "brecq") for w in (8, 4)}
    rerun, summary = _sweep(tmp_path, cache_dir, cifar10_root, teacher, *launcher, *GRID)
    assert rerun.returncode == 0, rerun.stderr
    assert "4 jobs: 0 computed, 4 skipped (finished before)" in summary
    assert _records(tmp_path / "sweep") == records


def test_local_parallel_launcher_sweep(tmp_path, cache_dir, cifar10_root, teacher):
    _four_runs_then_a_rerun_that_computes_nothing(tmp_path, cache_dir, cifar10_root, teacher,
                                                  "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2")


@pytest.mark.slow
def test_submitit_local_launcher_sweep(tmp_path, cache_dir, cifar10_root, teacher):
    _four_runs_then_a_rerun_that_computes_nothing(tmp_path, cache_dir, cifar10_root, teacher,
                                                  "hydra/launcher=submitit_local")


def test_bad_input_in_a_parallel_sweep_is_refused_job_by_job(tmp_path, cache_dir, cifar10_root, teacher):
    proc, summary = _sweep(tmp_path, cache_dir, cifar10_root, teacher, "hydra/launcher=local_parallel", *GRID,
                           f"dataset.root={tmp_path / 'none'}")
    assert proc.returncode == 2 and "0 failed, 4 refused (bad input)" in summary
    assert proc.stderr.count("dfqbench: refused: ") == 4 and not _records(tmp_path)


@pytest.mark.parametrize("overrides,folder", [
    (["method=gdfq"], "gdfq/w4a4-s0"),                                  # the default schedule: no suffix
    (["method=gdfq", "schedule=paper"], "gdfq/w4a4-s0-paper"),          # another one keeps its own record
    (["method=adasg", "schedule=smoke", "seed=2"], "adasg/w4a4-s2-smoke"),
    (["method=rtn", "schedule=paper"], "rtn/w4a4-s0"),                  # methods that do not train ignore it
])
def test_run_folders_name_a_training_methods_schedule_unless_it_is_the_default(overrides, folder):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.sweep.subdir == f"resnet20_cifar10-cifar10/gdfq/{folder}"
    assert cfg.hydra.run.dir.endswith(f"/runs/resnet20_cifar10-cifar10/gdfq/{folder}")


def test_dfq_git_commit_names_the_commit_of_a_copy_without_git(monkeypatch):
    from dfqbench import records

    records.git_commit.cache_clear()
    monkeypatch.setenv("DFQ_GIT_COMMIT", "0123abc")
    try:
        assert records.git_commit() == "0123abc"
    finally:
        records.git_commit.cache_clear()
