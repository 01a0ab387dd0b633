"""Run-time patching shared by the parity drivers of the GDFQ training family (xushoukai/GDFQ and the forks built on
its code: Qimera, AIT, IntraQ, HAST). Their repositories share one frame: a main script (`--conf_path X.hocon
--id N`) whose ExperimentDesign loads pytorchcv teachers, wraps them in ZeroQ-style quantizers, builds a
Trainer(trainer.py / trainer_direct.py) and calls run(); the budget is partly in the hocon file (nEpochs,
batchSize, warmup_epochs, step_S/step_G) and partly hard-coded (`iters = 200` in Trainer.train, `epoch < 4` for
the activation-range calibration in ExperimentDesign.run).

What this module changes in a clone, at run time only, in the driver's child process:
  - the hocon file: the clone's own, with the budget appended (HOCON: a later key overrides an earlier one);
  - source rewrites of named functions: exact substrings of the clone's source, each found the stated number of
    times or the run stops (`SourceRewrite`); the rewritten function is compiled from the clone's text and set on
    its class; every rewrite is listed in the record;
  - the teacher (pytorchcv get_model -> the clone's own pytorchcv architecture with the dfqbench checkpoint's
    state_dict: the clone's resnet_cifar has the `out_feature` argument the trainers call), the test loader (the
    dfqbench test set), the device (.cuda() -> cpu, utils.data_parallel -> the model itself).

`FAMILY` is the table of entry points. Only `gdfq` has been run (results/parity/gdfq/); the others are what their
repositories' sources show and have not been run yet (`tested: False`): check them before trusting a number.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SourceRewrite:
    """Replace `old` by `new` in the source of `owner.attr` (owner: "module:Class" or "module"), where `old` must
    occur exactly `count` times."""
    owner: str
    attr: str
    old: str
    new: str
    count: int = 1
    why: str = ""
    cpu_only: bool = False


@dataclass(frozen=True)
class Entry:
    repo: str                      # owner/name
    main: str                      # the entry script, relative to the clone (or its subdir)
    trainer: str                   # the trainer module name
    conf: str                      # the CIFAR hocon file the budget is appended to
    subdir: str = ""               # where main.py lives inside the clone (AIT: GDFQ_AIT/, Qimera_AIT/)
    dataset: str = "cifar100"      # the `dataset` key: selects the code's CIFAR branches
    extra_argv: tuple = ()         # more arguments of main()
    rewrites: tuple = field(default_factory=tuple)
    tested: bool = False


def _budget_rewrites(main_mod: str, trainer_mod: str, trainer_cls: str = "Trainer", run_cls: str = "ExperimentDesign",
                     calib_in_trainer: int = 0, gpu_assert: bool = True, accuracy_view: bool = False) -> tuple:
    out = [
        SourceRewrite(f"{trainer_mod}:{trainer_cls}", "train", "iters = 200", "iters = {iters_per_epoch}",
                      why="iterations per epoch (hard-coded 200) -> the schedule's"),
        SourceRewrite(f"{main_mod}:{run_cls}", "run", "if epoch < 4:", "if epoch < {calib_epochs}:",
                      why="activation-range calibration epochs (hard-coded 4) -> the schedule's calib_epochs"),
    ]
    if gpu_assert:
        out.append(SourceRewrite(f"{main_mod}:{run_cls}", "_set_gpu",
                                 'assert self.settings.GPU <= torch.cuda.device_count() - 1, "Invalid GPU ID"', "pass",
                                 why="no GPU: the GPU-id check is left out", cpu_only=True))
    if accuracy_view:  # GDFQ's utils/compute.py (the forks already use .reshape or .contiguous())
        out.append(SourceRewrite("utils.compute", "accuracy", "correct[:k].view(-1)", "correct[:k].reshape(-1)",
                                 why="PyTorch >= 1.13 keeps the transposed layout of `correct`, which .view(-1) "
                                     "refuses (RuntimeError); the same numbers"))
    if calib_in_trainer:
        out.append(SourceRewrite(f"{trainer_mod}:{trainer_cls}", "train", "if epoch < 4:",
                                 "if epoch < {calib_epochs}:", count=calib_in_trainer,
                                 why="the trainer's own calibration-epoch test (hard-coded 4)"))
    return tuple(out)


FAMILY: dict[str, Entry] = {
    "gdfq": Entry("xushoukai/GDFQ", "main.py", "trainer", "cifar100_resnet20.hocon",
                  rewrites=_budget_rewrites("main", "trainer", accuracy_view=True), tested=True),
    # the forks (entry points read from their sources; not run yet)
    # run_cifar10_4bit.sh's flags: superposed samples (prob 0.4, 2 classes) and random embeddings; without them
    # main.py's defaults train GDFQ with teacher-classifier embeddings (multi_label_prob 0.0), not Qimera
    "qimera": Entry("iamkanghyunchoi/qimera", "main.py", "trainer", "cifar10_resnet20.hocon", dataset="cifar10",
                    rewrites=_budget_rewrites("main", "trainer") + (SourceRewrite(
                        "trainer:Trainer", "train",
                        "d_acc = np.mean(np.argmax(output_teacher_batch.data.cpu().numpy(), axis=1) == gt)",
                        "d_acc = np.mean(np.argmax(output_teacher_batch.data.cpu().numpy(), axis=1) == gt) "
                        "if gt.ndim == 1 else 0.0",
                        why="a logged statistic only: on a superposed batch gt is [B, K]; numpy < 1.25 compared "
                            "the mismatched shapes to a scalar False (mean 0.0), numpy >= 1.25 raises"),),
                    extra_argv=("--multi_label_prob", "0.4", "--multi_label_num", "2", "--randemb"), tested=True),
    # GDFQ_AIT/run_cifar10_4bit.sh's flags (its --qw/--qa come from the hocon the driver writes)
    "ait": Entry("iamkanghyunchoi/ait", "main.py", "trainer", "cifar10_resnet20.hocon", subdir="GDFQ_AIT",
                 dataset="cifar10", rewrites=_budget_rewrites("main", "trainer"),
                 extra_argv=("--ce_scale", "0.0", "--kd_scale", "1.0", "--lrs", "0.0001", "--passing_threshold", "0.001",
                             "--adalr")),
    "intraq": Entry("zysxmu/IntraQ", "main_direct.py", "trainer_direct", "cifar10_resnet20.hocon", dataset="cifar10",
                    rewrites=_budget_rewrites("main_direct", "trainer_direct", calib_in_trainer=2)),
    "hast": Entry("lihuantong/HAST", "main_direct.py", "trainer_direct", "config/cifar10_resnet20.hocon",
                  dataset="cifar10", rewrites=_budget_rewrites("main_direct", "trainer_direct", calib_in_trainer=2,
                                                                gpu_assert=False)),
}


# --- the hocon file ------------------------------------------------------------------------------------------------

def hocon_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(hocon_value(x) for x in v) + "]"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def write_hocon(base: Path, dest: Path, overrides: dict) -> str:
    """The clone's hocon text with `overrides` appended (later keys win); returns the appended block."""
    block = "\n# --- appended by the dfqbench parity driver (run-time budget and paths) ---\n" + "".join(
        f"{k} = {hocon_value(v)}\n" for k, v in overrides.items())
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(Path(base).read_text() + "\n" + block)
    return block


# --- source rewrites ------------------------------------------------------------------------------------------------

def rewrite_function(owner, attr: str, replacements: list[tuple[str, str, int]]) -> None:
    """Recompile `owner.attr` from its own source with exact substring replacements (each found `count` times)."""
    func = getattr(owner, attr)
    func = getattr(func, "__func__", func)
    src = textwrap.dedent(inspect.getsource(func))
    if "super()" in src:
        raise SystemExit(f"{owner.__name__}.{attr}: zero-argument super() cannot be recompiled outside its class")
    for old, new, count in replacements:
        found = src.count(old)
        if found != count:
            raise SystemExit(f"{owner.__name__}.{attr}: {old!r} found {found} times in the clone's source, "
                             f"expected {count}; this clone differs from the one the driver was written for")
        src = src.replace(old, new)
    filename = inspect.getsourcefile(func) or "<official>"
    ns: dict = {}
    exec(compile(src, f"{filename} (rewritten by the parity driver)", "exec"), func.__globals__, ns)
    setattr(owner, attr, ns[func.__name__])


def apply_rewrites(entry: Entry, values: dict, cpu: bool) -> list[str]:
    """Apply entry.rewrites ({...} in `new` filled from `values`) to the imported modules (sys.modules). Returns
    the patch descriptions."""
    grouped: dict[tuple[str, str], list] = {}
    notes = []
    for rw in entry.rewrites:
        if rw.cpu_only and not cpu:
            continue
        new = rw.new.format(**values)
        grouped.setdefault((rw.owner, rw.attr), []).append((rw.old, new, rw.count))
        notes.append(f"{rw.owner.replace(':', '.')}.{rw.attr}: {rw.old!r} -> {new!r} ({rw.why})")
    for (owner, attr), reps in grouped.items():
        mod_name, _, cls_name = owner.partition(":")
        obj = sys.modules[mod_name]
        if cls_name:
            obj = getattr(obj, cls_name)
        rewrite_function(obj, attr, reps)
    return notes


def import_file(path: Path, name: str):
    """Import the clone's entry script as module `name` (its `if __name__ == '__main__'` stays idle)."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def purge_modules(prefixes: tuple[str, ...]) -> None:
    """Forget already-imported modules (the venv's pytorchcv) so that the clone's own copies are imported."""
    for name in list(sys.modules):
        if name.split(".")[0] in prefixes:
            del sys.modules[name]
