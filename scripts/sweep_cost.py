"""Expected wall time of an experiment preset's sweep: its cells counted as the sweep counts them, times the
measured cost of a cell.

    python scripts/sweep_cost.py [--experiment cifar10_resnet20] [--array 64] [--out FILE]

Cells: the Cartesian product of the preset's sweeper params, less the cells the sweep leaves out
(dfqbench.sweep.redundant_reason: fp32 only at W32A32, deterministic methods only at seed 0, conventions a method
refuses). Cost of a cell, from committed records (results/summary.csv, this teacher, CPU): the method's mean wall
time over its records (post-training), or, for a training method, its wall time per iteration of the schedule it
ran, times the iterations of the schedule asked for; a method without a record takes its family's median. GPU:
the training iteration rates measured on one H100 (results/bench/bench_qat_gpu_h100.md: gdfq, ait; any other
training method is assumed at GDFQ's rate, said so in the output). A SLURM array of N jobs at once takes at least
the longest cell and at least the total / N. Estimates, labelled as such; the inputs are the measured numbers.
Each schedule also says how many of its cells have a committed record and what the others would take.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from bench_report import emit  # noqa: E402  (scripts/ is on sys.path: run as a script)
from dfqbench.runner import build_method  # noqa: E402
from dfqbench.sweep import redundant_reason  # noqa: E402


def schedule_iterations(name: str) -> int:
    s = OmegaConf.load(REPO / "conf" / "schedule" / f"{name}.yaml")
    return int(s.epochs) * int(s.iters_per_epoch)


def gpu_rates() -> dict[str, float]:
    """Iterations/s per method, the faster backend's where the file measures two."""
    text = (REPO / "results" / "bench" / "bench_qat_gpu_h100.md").read_text()
    rates: dict[str, float] = {}
    for method, rate in re.findall(r"\| trainer iteration \((\w+)\) \| [\d.]+ \| ([\d.]+) \|", text):
        rates[method] = max(rates.get(method, 0.0), float(rate))
    return rates


def cells(experiment: str, schedule: str) -> list[tuple[str, str, int, int, bool]]:
    """(method, quant, wbit, seed, trains) of every cell the sweep runs; method is the name its record carries."""
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        base = compose("config", [f"experiment={experiment}"], return_hydra_config=True)
        params = {k: str(v).split(",") for k, v in base.hydra.sweeper.params.items()}
        out, methods = [], {}
        for method, quant, wbit, seed in itertools.product(params["method"], params["quant"], params["wbit"],
                                                           params["seed"]):
            cfg = compose("config", [f"experiment={experiment}", f"method={method}", f"quant={quant}",
                                     f"wbit={wbit}", f"seed={seed}", f"schedule={schedule}"])
            key = (method, quant)
            if key not in methods:
                methods[key] = build_method(cfg)
            if redundant_reason(cfg, methods[key]) is None:  # the record's name: crossdomain -> crossdomain-procedural
                out.append((methods[key].name, quant, int(wbit), int(seed), "schedule" in cfg.method))
    return out


def committed(model: str) -> set[tuple]:
    """(method, quant, wbit, abit, seed, schedule) of the preset cells with a committed record (results/runs.csv:
    records of the sweeps, on any device; explorations and variants are other cells)."""
    runs = pd.read_csv(REPO / "results" / "runs.csv", keep_default_na=False)
    runs = runs[(runs.model == model) & runs.record.str.contains(r"^results/(?:cuda/)?sweeps/", regex=True)]
    return {(r.config, r.quant, int(r.wbit), int(r.abit), int(r.seed), r.schedule) for r in runs.itertuples()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="cifar10_resnet20")
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--array", type=int, default=64, help="SLURM array jobs at once")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    summary = pd.read_csv(REPO / "results" / "summary.csv", keep_default_na=False)
    runs = summary[(summary.source == "reproduced") & (summary.model == a.model) & (summary.device == "cpu")]
    runs = runs[pd.to_numeric(runs.wall_s, errors="coerce").notna()].assign(wall_s=lambda d: d.wall_s.astype(float))
    post = runs[runs.family == "post-training"].groupby("config").wall_s.mean()  # config: the name a sweep uses
    train = runs[runs.family == "training"].copy()
    train["per_iter"] = train.wall_s / train.schedule.map(schedule_iterations)
    per_iter = train.groupby("config").per_iter.mean()
    rates = gpu_rates()
    lines = [f"# Expected wall time: experiment={a.experiment} (scripts/sweep_cost.py; estimates from measured costs)",
             ""]
    for schedule in ("cpu", "paper"):
        todo = cells(a.experiment, schedule)
        iters = schedule_iterations(schedule)
        cpu, gpu, notes = [], [], set()
        for method, _, _, _, trains in todo:
            if trains:
                cost = per_iter.get(method, per_iter.median()) * iters
                if method not in per_iter:
                    notes.add(f"{method}: no CPU record, the training family's median per iteration")
                rate = rates.get(method, rates.get("gdfq"))
                if method not in rates:
                    notes.add(f"{method}: GPU at GDFQ's measured rate")
                cpu.append(cost)
                gpu.append(iters / rate)
            else:
                cost = post.get(method, post.median())
                if method not in post:
                    notes.add(f"{method}: no CPU record, the post-training median")
                cpu.append(cost)
                gpu.append(cost)  # post-training on GPU not measured: the CPU time as an upper bound
        n_train = sum(1 for c in todo if c[4])
        have = committed(a.model)
        done = [(method, quant, wbit, wbit, seed, schedule if trains else "") in have
                for method, quant, wbit, seed, trains in todo]
        left_cpu = sum(c for c, d in zip(cpu, done) if not d)
        left_gpu = sum(g for g, d in zip(gpu, done) if not d)
        lines += [f"## schedule={schedule} ({iters:,} iterations per training cell)", "",
                  f"{len(todo)} cells ({n_train} training, {len(todo) - n_train} post-training). Committed when "
                  f"this was written ({time.strftime('%Y-%m-%d')}, results/runs.csv): {sum(done)} have a record (any "
                  f"device); the {len(todo) - sum(done)} left take about {left_cpu / 3600:.0f} h on the CPU machine "
                  f"or {left_gpu / 3600:.0f} h on one H100.", "",
                  "| where | total machine-hours | longest cell | wall time |", "|---|---:|---:|---:|",
                  f"| one 2-core CPU machine, one cell after another | {sum(cpu) / 3600:.0f} | "
                  f"{max(cpu) / 3600:.1f} h | {sum(cpu) / 3600:.0f} h |",
                  f"| one H100, one cell after another | {sum(gpu) / 3600:.0f} | {max(gpu) / 3600:.1f} h | "
                  f"{sum(gpu) / 3600:.0f} h |",
                  f"| SLURM array of {a.array} H100 jobs at once | {sum(gpu) / 3600:.0f} | {max(gpu) / 3600:.1f} h | "
                  f">= {max(max(gpu), sum(gpu) / a.array) / 3600:.1f} h |", ""]
        lines += [f"- {n}" for n in sorted(notes)] + [""]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
