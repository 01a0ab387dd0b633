"""What the parity drivers of third-party re-implementations share (scripts/parity/advkd.py, scripts/parity/dfed.py).

AdvKD and DFED have no official code. Their only public code is a re-implementation (AdvKD: the unofficial
da2so/Data-Free_Network_Quantization_With_Adversarial_Knowledge_Distillation; DFED: DFED.py in Hao840/CDFKD-MFS,
by the paper's first author but not released as the paper's code), and neither quantizes: each distils into a float
student. A driver runs that code's training loop from a clone on the dfqbench teacher(s) and test set, with the
student replaced by dfqbench's quantized student, so that both sides train the same quantized network. This module
holds the pieces both drivers use; nothing of the clones is copied here.

- Text rewrites (`TextRewrite`, `apply_rewrites`): exact substrings of a clone's file, each found exactly `count`
  times or the run stops (`RewriteMismatch`); the rewritten file is compiled under its own path (line numbers kept:
  every rewrite stays on its line) and loaded as a module (`load_module`) or run as a script (`run_script`).
- `stub_module`: empty stand-ins for packages a clone imports but the run never uses (tensorboardX, sklearn); the
  tensorboardX stand-in's SummaryWriter records add_scalar calls (`SCALARS`): the codes log their test accuracy
  there.
- The student swap (`quantized_student`, `CalibratedStudent`): dfqbench.quant.quantize_model on a copy of the
  teacher with the dfqbench run's convention (the quant preset with the method's convention_overrides, as
  dfqbench.runner builds it), weights dynamic (their grid follows every step, as dfqbench.methods.qat does), in a
  wrapper holding dfqbench's EMA activation-range observer (dfqbench.train.ema, the trainer's). The observer is
  active only while the driver calibrates and the wrapper's `observe` test accepts the forward: the codes have no
  quantizer, so when the ranges are calibrated is the driver's choice, stated in each driver.
- `method_config` / `effective_schedule`: the dfqbench config of the method's run (per_setting applied, as the run
  applies it) and the schedule the method trains with (the schedule group with the method's schedule_overrides:
  AdvKD's cpu entry sets 6 iterations per epoch); `dfqbench_schedule_overrides` gives a dfqbench run the same
  --schedule-override (schedule.K=V and ++method.schedule_overrides.K=V, so that a per_setting entry does not
  override the smoke budget).
- `parent`: seeds (with --resume), the records, the dfqbench runs of the same cell and the results/parity.csv row,
  whose note starts with "unofficial re-implementation".
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import re
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


# --- text rewrites ----------------------------------------------------------------------------------------------

class RewriteMismatch(SystemExit):
    """A rewrite's text is not in the clone the stated number of times: the clone differs from the one the driver
    was written for (the run stops before anything is computed)."""


@dataclass(frozen=True)
class TextRewrite:
    """Replace `old` by `new` (str.format-ed with the driver's values) in a file; `old` must occur `count` times."""
    key: str
    old: str
    new: str
    count: int = 1
    why: str = ""


def apply_rewrites(text: str, rewrites, values: dict | None = None, where: str = "the clone's file"
                   ) -> tuple[str, list[str]]:
    """(rewritten text, one description per rewrite). Every `old` is counted in the ORIGINAL text, before any
    replacement, and must be found exactly `count` times; a `new` that adds or removes a line is refused (the
    rewritten file keeps the clone's line numbers in tracebacks)."""
    values = values or {}
    notes, plan = [], []
    for rw in rewrites:
        found = text.count(rw.old)
        if found != rw.count:
            raise RewriteMismatch(f"{where}: rewrite {rw.key}: {rw.old!r} found {found} times, expected {rw.count}; "
                                  f"this clone differs from the one the driver was written for")
        new = rw.new.format(**values)
        if new.count("\n") != rw.old.count("\n"):
            raise ValueError(f"rewrite {rw.key}: the replacement changes the number of lines")
        plan.append((rw, new))
    for rw, new in plan:
        text = text.replace(rw.old, new)
        notes.append(f"{rw.key} {where}: {rw.old.strip()!r} -> {new.strip()!r}" + (f" ({rw.why})" if rw.why else ""))
    return text, notes


def compile_rewritten(path: Path, rewrites, values: dict | None = None):
    """(code object of the rewritten file, notes, sha256 of the original file)."""
    path = Path(path)
    original = path.read_text()
    text, notes = apply_rewrites(original, rewrites, values, where=path.name)
    code = compile(text, f"{path} (rewritten by the parity driver)", "exec")
    return code, notes, hashlib.sha256(original.encode()).hexdigest()


def load_module(path: Path, name: str, rewrites=(), values: dict | None = None, inject: dict | None = None):
    """Import the clone's file `path` as module `name` (in sys.modules) after the rewrites; `inject` are globals set
    before its code runs (the driver's hooks, which rewritten lines call). Returns (module, notes, sha256)."""
    code, notes, sha = compile_rewritten(path, rewrites, values)
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    mod.__dict__.update(inject or {})
    sys.modules[name] = mod
    exec(code, mod.__dict__)
    return mod, notes, sha


def run_script(path: Path, argv: list[str], rewrites=(), values: dict | None = None, inject: dict | None = None
               ) -> tuple[dict, list[str], str]:
    """Run the clone's script `path` as __main__ (sys.argv = [path, *argv]) after the rewrites; returns (its globals
    at the end: the trained student is one of them, notes, sha256)."""
    code, notes, sha = compile_rewritten(path, rewrites, values)
    g = {"__name__": "__main__", "__file__": str(path), "__builtins__": __builtins__, **(inject or {})}
    old_argv = sys.argv
    sys.argv = [str(path), *argv]
    try:
        exec(code, g)
    finally:
        sys.argv = old_argv
    return g, notes, sha


def purge_modules(prefixes: tuple[str, ...]) -> None:
    """Forget already-imported modules with these top-level names, so that the clone's own copies are imported."""
    for name in list(sys.modules):
        if name.split(".")[0] in prefixes:
            del sys.modules[name]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def same_code_as(clone: Path, commit: str, files) -> bool | None:
    """Whether the clone's `files` are those of `commit` (True / False), None when git cannot tell (not a clone,
    commit absent). DFED's clone HEAD is a readme-only update of the commit the driver was written for."""
    import subprocess
    try:
        known = subprocess.run(["git", "-C", str(clone), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                               capture_output=True)
        if known.returncode != 0:
            return None
        proc = subprocess.run(["git", "-C", str(clone), "diff", "--quiet", commit, "--", *files],
                              capture_output=True)
    except OSError:
        return None
    return {0: True, 1: False}.get(proc.returncode)


# --- stand-ins for unused imports ---------------------------------------------------------------------------------

SCALARS: list[tuple[str, float, int]] = []  # (tag, value, step) of every SummaryWriter.add_scalar call


class RecordingSummaryWriter:
    """tensorboardX.SummaryWriter stand-in: nothing is written; add_scalar calls are kept in SCALARS."""

    def __init__(self, *args, **kwargs):
        pass

    def add_scalar(self, tag, value, global_step=None, *args, **kwargs):
        SCALARS.append((str(tag), float(value), -1 if global_step is None else int(global_step)))

    def __getattr__(self, name):  # add_image, add_histogram, flush, close, ...: no-ops
        return lambda *args, **kwargs: None


def stub_module(name: str, patches: list[str], why: str, **attrs) -> types.ModuleType:
    """sys.modules[name] = an empty module with `attrs` (parents created as needed), listed in `patches`."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            sys.modules[sub] = types.ModuleType(sub)
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[sub])
    mod = sys.modules[name]
    for k, v in attrs.items():
        setattr(mod, k, v)
    patches.append(f"import {name} -> a stand-in module ({why})")
    return mod


def stub_tensorboardx(patches: list[str]) -> None:
    stub_module("tensorboardX", patches, "not installed; the code only logs to it: its SummaryWriter writes nothing "
                "and keeps add_scalar values, from which the per-epoch test accuracy is read",
                SummaryWriter=RecordingSummaryWriter)


def scalars(tag: str) -> list[tuple[int, float]]:
    return [(step, value) for t, value, step in SCALARS if t == tag]


# --- the student swap ---------------------------------------------------------------------------------------------

def quantized_student(teacher, convention, wbit: int, abit: int):
    """dfqbench's quantized student of a copy of `teacher`, as dfqbench.methods.qat builds it: quantize_model with
    the run's convention, every weight quantizer dynamic (its grid recomputed from the current weights each step)."""
    from dfqbench.quant import quantize_model, weight_quantizers
    student = quantize_model(copy.deepcopy(teacher), convention, wbit, abit)
    for wq in weight_quantizers(student):
        wq.dynamic = True
    return student


def _calibrated_student_class():
    from torch import nn

    from dfqbench.train.ema import EMARangeObserver

    class CalibratedStudent(nn.Module):
        """The quantized student in the code's place. Its activation quantizers' ranges follow dfqbench's EMA
        observer (beta as the method's ema_beta) on a forward only while `calibrating` is on and `observe(self, x)`
        accepts it (default: a forward in train mode); `stop_calibration` freezes them for good."""

        def __init__(self, net, beta: float = 0.9, rng=None, observe=None):
            super().__init__()
            self.net = net
            self.observer = EMARangeObserver(net, beta, rng)
            self.observer.active = False
            self.calibrating = False
            self.observe = observe or (lambda module, x: module.training)
            self.observed_batches = 0

        def forward(self, x, *args, **kwargs):
            active = bool(self.calibrating and self.observe(self, x))
            self.observer.active = active
            try:
                return self.net(x, *args, **kwargs)
            finally:
                self.observer.active = False
                self.observed_batches += int(active)

        def stop_calibration(self) -> None:
            self.calibrating = False
            self.observer.close()

        def ranges(self) -> list:
            return [[float(q.lo.min()), float(q.hi.max())] if getattr(q, "calibrated", False) else None
                    for q in self.observer.quantizers]

    return CalibratedStudent


def calibrated_student(teacher, convention, wbit: int, abit: int, beta: float = 0.9, rng=None, observe=None):
    """The student swap: a CalibratedStudent around quantized_student(teacher, ...)."""
    return _calibrated_student_class()(quantized_student(teacher, convention, wbit, abit), beta, rng, observe)


def quantizer_counts(model) -> dict:
    from dfqbench.quant import act_quantizers, weight_quantizers
    return {"weight_quantizers": len(weight_quantizers(model)), "act_quantizers": len(act_quantizers(model))}


# --- the dfqbench side's configuration ----------------------------------------------------------------------------

def dfqbench_schedule_overrides(schedule_override: list[str]) -> list[str]:
    """--schedule-override K=V -> the dfqbench overrides that give the run that schedule: schedule.K=V, and
    ++method.schedule_overrides.K=V (a method's per_setting may set schedule_overrides, which would win over the
    schedule group; a key set on the command line wins over per_setting)."""
    out = []
    for item in schedule_override:
        if "=" not in item:
            raise SystemExit(f"--schedule-override {item!r}: expected KEY=VALUE")
        out += [f"schedule.{item}", f"++method.schedule_overrides.{item}"]
    return out


def method_overrides_list(a, method: str, seed: int | None = None) -> list[str]:
    """The dfqbench overrides of this cell (without the seed unless given)."""
    over = [f"method={method}", f"quant={a.quant}", f"schedule={a.schedule}", f"wbit={a.wbit}", f"abit={a.abit}",
            *dfqbench_schedule_overrides(a.schedule_override), *a.method_overrides, *common.teacher_overrides(a)]
    return over + ([f"seed={seed}"] if seed is not None else [])


def method_config(overrides: list[str]):
    """The composed dfqbench config of these overrides with the method's per_setting applied (as the run does)."""
    from dfqbench.method_overrides import apply_per_setting
    cfg = common.compose(overrides)
    apply_per_setting(cfg, overrides)
    return cfg


def effective_schedule(cfg) -> dict:
    """The schedule the method trains with: the schedule group with method.schedule_overrides over it."""
    from omegaconf import OmegaConf

    from dfqbench.methods.qat import _schedule
    group = OmegaConf.to_container(cfg.schedule, resolve=True)
    extra = cfg.method.get("schedule_overrides")
    extra = OmegaConf.to_container(extra, resolve=True) if extra is not None else {}
    return _schedule(group, extra).to_dict()


def method_convention(cfg):
    """The dfqbench run's convention: the quant preset with the method's convention_overrides (runner.py)."""
    from dfqbench.runner import build_convention, build_method
    method = build_method(cfg)
    return build_convention(cfg, method), method


# --- parent: seeds, records, dfqbench runs, the parity.csv row ----------------------------------------------------

@dataclass(frozen=True)
class DriverSpec:
    method: str               # dfqbench method name
    repo: str                 # owner/name of the re-implementation
    marker: str               # a file the clone must have
    expected_commit: str      # the commit the driver was written for (the code files' text is what counts)
    code_files: tuple         # files whose sha256 the records keep
    what: str                 # one line for the note: whose code, what it is
    default_lr_s: float       # the code's own student learning rate (its CLI default)


def add_arguments(p: argparse.ArgumentParser, spec: DriverSpec) -> None:
    p.add_argument("--official", required=True, help=f"a clone of {spec.repo} (unofficial re-implementation)")
    p.add_argument("--schedule", default="cpu", help="conf/schedule/<name>.yaml: the budget of both sides")
    p.add_argument("--schedule-override", nargs="*", default=[],
                   help="schedule keys for both sides, e.g. epochs=2 iters_per_epoch=1 warmup_epochs=1 (smoke checks)")
    p.add_argument("--wbit", type=int, default=4)
    p.add_argument("--abit", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="official: torch/numpy/random seeded with S before the code runs (it seeds nothing); "
                        "dfqbench seed=S (default 0 1 2)")
    p.add_argument("--lr-s", type=float, default=None,
                   help=f"the code's student learning rate (its own CLI argument; default: the code's "
                        f"{spec.default_lr_s:g}); a value other than the default also names the cell (--tag)")
    common.add_cell_arguments(
        p, spec.method, quant_help="dfqbench preset of both sides' student (default gdfq)",
        overrides_help="more dfqbench overrides (method.X=Y) for the dfqbench runs; the official side's student "
                       "also follows them where they change the convention or the schedule", variant="lr")
    p.add_argument("--dfqbench-variant", nargs="+", default=[], metavar=("NAME", "OVERRIDE"),
                   help="NAME then dfqbench overrides for the dfqbench side ONLY (e.g. the code's loop shape: "
                        "code_loop ++method.student_mode=train '++method.schedule_overrides={warmup_epochs:0}'): "
                        "the official seeds are the cell's own, unchanged; the records are "
                        "dfqbench-<quant>-NAME-s<S>, the parity.csv row's method gets -NAME")


def child_args(a, seed: int, scratch: Path, knob: list[str] = ()) -> list[str]:
    """The child's command line: the cell's arguments, then the driver's own `knob` (e.g. ["--lr-s", "0.1"])."""
    args = common.child_args(a, seed, a.wbit, a.abit) + ["--scratch", str(scratch), "--schedule", a.schedule,
                                                         "--quant", a.quant]
    args += ["--schedule-override", *a.schedule_override] if a.schedule_override else []
    args += ["--method-overrides", *a.method_overrides] if a.method_overrides else []
    args += list(knob)
    args += ["--cpu"] if a.cpu else []
    return args


def expected_settings(a, spec: DriverSpec, commit: str, sched: dict) -> dict:
    """What a finished official seed must have been run with to be reused (--resume)."""
    clone = Path(a.official).resolve()
    return {"official_commit": commit, "code_sha256": {f: file_sha256(clone / f) for f in spec.code_files},
            "schedule": sched, "wbit": a.wbit, "abit": a.abit,
            "lr_s": spec.default_lr_s if a.lr_s is None else a.lr_s, "quant": a.quant,
            "method_overrides": list(a.method_overrides), "max_samples": a.max_samples, "model": a.model,
            "dataset": a.dataset}


def cell_of(a, spec: DriverSpec) -> tuple[Path, str]:
    tag = a.tag or ("" if a.lr_s is None or a.lr_s == spec.default_lr_s else f"lrS{a.lr_s:g}")
    out = Path(a.out) if a.out else common.REPO / "results" / "parity" / spec.method
    out = out / tag if tag else out
    return out / f"w{a.wbit}a{a.abit}-{a.schedule}", tag


def _dfqbench_matches(r: dict, sched: dict, a, seed: int) -> bool:
    t = (r.get("info") or {}).get("training") or {}
    return (r.get("status") == "done" and r.get("seed") == seed and r.get("wbit") == a.wbit and r.get("abit") == a.abit
            and t.get("epochs") == sched["epochs"] and t.get("iters_per_epoch") == sched["iters_per_epoch"]
            and t.get("batch_size") == sched["batch_size"])


def run_official_seeds(a, cell: Path, method: str, seeds, expected: dict, script: Path, child_args, env: dict,
                       repo: str, commit: str, describe) -> list[dict]:
    """Each official seed in a child process (`child_args(a, seed, scratch)`), its result kept as
    official-s<S>.json; with --resume a kept one whose settings equal `expected` is reused (and a rerun's log is
    appended to the earlier attempts'). `describe(r)` -> the printed summary of a new seed."""
    runs = []
    for seed in seeds:
        path = cell / f"official-s{seed}.json"
        if a.resume and path.exists():
            old = json.loads(path.read_text())
            if "top1" in old and {k: old.get(k) for k in expected} == expected:
                runs.append(old)
                print(f"official {method} seed {seed}: reusing {common.rel(path)}", flush=True)
                continue
            print(f"official {method} seed {seed}: {common.rel(path)} was run with other settings; running it "
                  f"again", flush=True)
        scratch = Path("/tmp") / f"parity-{method}-{os.getpid()}-s{seed}"
        r = common.run_child(script, child_args(a, seed, scratch), cell / f"official-s{seed}.log.txt", env=env,
                             append=a.resume)
        r.update(seed=seed, official_repo=repo, official_commit=commit)
        differs = {k: (r.get(k), v) for k, v in expected.items() if r.get(k) != v}
        if differs:
            raise SystemExit(f"the child ran with other settings than the parent's: {differs}")
        common.write_json(path, r)
        runs.append(r)
        print(f"official {method} W{a.wbit}A{a.abit} [{a.schedule}] seed {seed}: {describe(r)}", flush=True)
    return runs


def dfqbench_variant(a) -> tuple[str, list[str]]:
    """(name, dfqbench-only overrides) of --dfqbench-variant, ("", []) without it (or for a driver without the
    option: zaq.py)."""
    spec = getattr(a, "dfqbench_variant", None)
    if not spec:
        return "", []
    name, *overrides = spec
    if not re.fullmatch(r"[A-Za-z0-9_]+", name) or not overrides:
        raise SystemExit(f"--dfqbench-variant {' '.join(spec)!r}: expected a NAME of letters, digits "
                         f"and _ followed by at least one dfqbench override")
    return name, overrides


def dfqbench_cell(a, cell: Path, method: str, sched: dict, seeds) -> tuple[list[dict], tuple, tuple]:
    """dfqbench's seeds of the cell (common.dfqbench_side, kept records checked against the schedule and bits),
    summarized into <cell>/dfqbench[-<variant>].json. Returns (records, top-1 mean/std, training s mean/std)."""
    variant, extra = dfqbench_variant(a)
    overrides = [*method_overrides_list(a, method), *extra]
    ours = common.dfqbench_side(
        cell, a.quant, seeds, a.resume,
        lambda seed: [*overrides, f"seed={seed}", f"threads={a.threads}", *(["device=cpu"] if a.cpu else [])],
        method + (f" ({variant})" if variant else ""), accept=lambda r, seed: _dfqbench_matches(r, sched, a, seed),
        variant=variant, in_sweeps=a.dfqbench_in_sweeps)
    d_top1 = common.mean_std([r["top1"] for r in ours])
    d_secs = common.mean_std([r["info"]["training"]["train_time_s"] for r in ours])
    print(f"dfqbench method={method} {' '.join(extra)} quant={a.quant} schedule={a.schedule} W{a.wbit}A{a.abit}: "
          f"top-1 {d_top1[0]:.2f} +- {d_top1[1]:.2f}, training {d_secs[0]:.0f} s", flush=True)
    common.write_json(cell / f"dfqbench{'-' + variant if variant else ''}.json",
                      {"seeds": seeds, "top1_mean": round(d_top1[0], 4), "top1_std": round(d_top1[1], 4),
                       "train_s_mean": round(d_secs[0], 3), "overrides": overrides})
    return ours, d_top1, d_secs


def parent(a, spec: DriverSpec, script: Path, describe_official) -> None:
    """Run the official seeds in child processes (one per seed), then with --dfqbench the dfqbench seeds, write
    the records and the parity.csv row. `describe_official(sched, runs)` -> the note's part on the official side."""
    variant, extra = dfqbench_variant(a)  # a bad --dfqbench-variant stops here, before any official seed runs
    repo, commit = common.clone_identity(Path(a.official), spec.repo, spec.marker)
    cfg = method_config(method_overrides_list(a, spec.method))
    sched = effective_schedule(cfg)
    cell, tag = cell_of(a, spec)
    env = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    official_seeds = a.seeds if a.official_seeds is None else a.official_seeds
    dfqbench_seeds = a.seeds if a.dfqbench_seeds is None else a.dfqbench_seeds
    knob = ["--lr-s", repr(a.lr_s)] if a.lr_s is not None else []
    runs = run_official_seeds(
        a, cell, spec.method, official_seeds, expected_settings(a, spec, commit, sched), script,
        lambda a, seed, scratch: child_args(a, seed, scratch, knob), env, repo, commit,
        lambda r: f"final-epoch top-1 {r['top1']:.2f} (dfqbench's evaluation of the same student "
                  f"{r['dfqbench_eval_top1']:.2f}), train {r['train_s']:.0f} s ({r['s_per_iteration']:.2f} "
                  f"s/iteration), wall {r['wall_s']:.0f} s")
    top1 = common.mean_std([r["top1"] for r in runs])
    secs = common.mean_std([r["train_s"] for r in runs])
    record = {"method": spec.method, "tag": tag, "official_repo": repo, "official_commit": commit,
              "driver_written_for": spec.expected_commit,
              "code_files_as_in_that_commit": same_code_as(Path(a.official), spec.expected_commit, spec.code_files),
              "official_is": "UNOFFICIAL re-implementation: " + spec.what, "wbit": a.wbit, "abit": a.abit,
              "seeds": official_seeds, "schedule_name": a.schedule, "schedule": sched,
              "top1_mean": round(top1[0], 4), "top1_std": round(top1[1], 4), "top1_is": "final epoch",
              "train_s_mean": round(secs[0], 3), "runs": runs, "model": runs[0]["model"],
              "dataset": runs[0]["dataset"], "n_test": runs[0]["n_test"], "device": runs[0]["device"],
              "teacher_overrides": common.teacher_overrides(a), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    common.write_json(cell / "official.json", record)
    print(f"official {spec.method} W{a.wbit}A{a.abit} [{a.schedule}]: final-epoch top-1 {top1[0]:.2f} +- "
          f"{top1[1]:.2f} over seeds {official_seeds}, train {secs[0]:.0f} s ({repo}@{commit[:10]}, unofficial)",
          flush=True)
    if not a.dfqbench:
        return
    ours, d_top1, d_secs = dfqbench_cell(a, cell, spec.method, sched, dfqbench_seeds)
    side = (f"dfqbench with {' '.join(extra)} (variant {variant}: the official seeds are the cell's, unchanged); "
            if variant else "")
    common.upsert_parity_row({
        "method": "-".join(filter(None, (spec.method, tag, variant))), "quant": a.quant, "schedule": a.schedule,
        "wbit": a.wbit, "abit": a.abit, "n_seeds": min(len(runs), len(ours)),
        "official_top1_mean": common.fmt(top1[0]), "official_top1_std": common.fmt(top1[1]),
        "dfqbench_top1_mean": common.fmt(d_top1[0]), "dfqbench_top1_std": common.fmt(d_top1[1]),
        "official_s": common.fmt(secs[0], 0), "dfqbench_s": common.fmt(d_secs[0], 0), "official_repo": repo,
        "official_commit": commit,
        "note": f"{side}unofficial re-implementation ({spec.what}); no official code exists, and the code never "
                f"quantizes: both sides train dfqbench's quantized student (quant={a.quant}, W{a.wbit}A{a.abit}, "
                f"weights dynamic); {describe_official(sched, runs)}; schedule {a.schedule} ({sched['epochs']} epochs "
                f"x {sched['iters_per_epoch']} iterations, batch {sched['batch_size']}, warm-up "
                f"{sched['warmup_epochs']}, calibration {sched['calib_epochs']}, milestones {sched['milestones']}); "
                f"final epoch on both sides; official seeds {' '.join(map(str, official_seeds))} (torch seeded "
                f"with S), dfqbench seeds {' '.join(map(str, dfqbench_seeds))}; seconds = training; "
                f"{runs[0]['n_test']} test images; records {common.rel(cell)}",
        "model": runs[0]["model"], "dataset": runs[0]["dataset"], "device": runs[0]["device"]}, Path(a.csv))


# --- child helpers ------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TimedLoader:
    """A DataLoader stand-in over the dfqbench test set (common.EvalLoader) with a `dataset` of the set's length
    (the codes divide by len(loader.dataset)); it adds up the seconds from each pass's start to its end (the
    code's test loop, forwards included)."""

    class _Sized:
        def __init__(self, n: int):
            self.n = n

        def __len__(self) -> int:
            return self.n

    def __init__(self, data, batch_size: int, device):
        self.inner = common.EvalLoader(data, batch_size, device)
        self.dataset = self._Sized(data.num_samples)
        self.seconds, self.passes = 0.0, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        t0 = time.perf_counter()
        try:
            yield from self.inner
        finally:
            self.seconds += time.perf_counter() - t0
            self.passes += 1


@dataclass
class ChildSetup:
    cuda: bool      # the official code runs on the GPU (else .cuda() is patched to the CPU by the driver)
    device: object  # torch.device
    cfg: object     # the dfqbench config of the method's run (method_config)
    sched: dict     # the schedule both sides train with (effective_schedule)
    convention: object
    loaded: object  # the dfqbench teacher (models.LoadedModel)
    data: object    # the dfqbench test set (EvalSet)


def child_setup(a, method: str) -> ChildSetup:
    """What every driver's child starts from: its threads, device, the dfqbench config, schedule and convention of
    the method's run, and the dfqbench teacher and test set."""
    import torch
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available() and not a.cpu
    cfg = method_config(method_overrides_list(a, method, a.seed))
    _, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    return ChildSetup(cuda, torch.device("cuda" if cuda else "cpu"), cfg, effective_schedule(cfg),
                      method_convention(cfg)[0], loaded, data)


def common_result(a, spec: DriverSpec, cfg, sched, loaded, data, convention, device, patches) -> dict:
    import torch
    clone = Path(a.official).resolve()
    return {"model": cfg.model.name, "dataset": str(cfg.dataset.name), "n_test": data.num_samples,
            "max_samples": a.max_samples, "schedule": sched, "wbit": a.wbit, "abit": a.abit, "quant": a.quant,
            "method_overrides": list(a.method_overrides), "convention": convention.to_dict(),
            "lr_s": spec.default_lr_s if a.lr_s is None else a.lr_s, "device": device.type,
            "threads": torch.get_num_threads(), "patches": patches,
            "code_sha256": {f: file_sha256(clone / f) for f in spec.code_files}, "teacher_sha256": loaded.sha256}


def lr_s_note(a, flag: str) -> str:
    return ("the code's default (0.1, a float student from scratch)" if a.lr_s is None else
            f"--lr-s (the code's {flag} argument)")


def hand_back(method: str, result: dict) -> None:
    """A child's last words: one line for the log, then the JSON result the parent reads (its last stdout line)."""
    print(f"official {method}: final-epoch top-1 {result['top1']:.2f} (dfqbench evaluate "
          f"{result['dfqbench_eval_top1']:.2f}), {result['s_per_iteration']:.2f} s/iteration", file=sys.stderr)
    print(json.dumps(result))


def main(argv, spec: DriverSpec, script: str, doc: str, child, describe_official) -> None:
    """A driver's entry point: the child (one official run) with --child, else the parent over the seeds."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_arguments(p, spec)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return
    parent(a, spec, Path(script).resolve(), describe_official)
