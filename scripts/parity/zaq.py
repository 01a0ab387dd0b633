"""Parity driver for ZAQ (Liu et al., CVPR 2021, "Zero-shot Adversarial Quantization"): the official code
FLHonker/ZAQ-code (main.py: the zero-shot adversarial quantization; quantize.py is its QAT on REAL data, not ZAQ)
run on the dfqbench teacher and test set at a dfqbench schedule's budget, beside `python -m dfqbench method=zaq
quant=gdfq schedule=<schedule>` on the same cell.

    git clone /work/.mirror/FLHonker+ZAQ-code/repo /tmp/off-FLHonker+ZAQ-code
    python scripts/parity/zaq.py --official /tmp/off-FLHonker+ZAQ-code [--schedule cpu] [--seeds 0 1 2] [--dfqbench]
        [--resume] [--alpha 0] [--relu-per-use] [--frozen-test-ranges]

The official side runs the clone's own main.main() in a child process per seed, with the code's arguments
--model resnet20 --dataset cifar10 --ckpt <the teacher> --weight_bit W --activation_bit A --seed S and the budget as
dfqbench's method=zaq trains (the schedule group with conf/method/zaq.yaml's schedule_overrides: on `cpu` 10 epochs
x 60 iterations, batch 64, no warm-up, milestones [8]): --epochs E --epoch_itrs I --batch_size B. Everything else
stays the code's: lr_Q 0.1 (SGD, momentum 0.9, weight decay 5e-4), lr_G 1e-3 (Adam, PyTorch's betas), x0.1 (its
--gamma) at the milestones for both, nz 256, --alpha 1 (SCRM, on both sides of the game; `--alpha X` runs the code
with another weight, in its own cell `alpha<X>`), --beta 0.1 (the activation term), 5 student steps then 1
generator step per iteration, the student quantized by the code's own quantization.quantize_model (ZeroQ's
Quant_Conv2d / Quant_Linear per-channel weights at --weight_bit, a QuantAct after every ReLU at --activation_bit,
whose running min/max range is never frozen), its test before training and after every epoch. The student is
the code's quantized copy of the teacher: the code's pipeline, not dfqbench's student.
Run-time changes, each listed in the record's "patches":
  Z1 visdom (utils/visualizer.py imports it; main.py builds a VisdomPlotter at import, which connects to a
     server): not installed -> a stand-in whose Visdom.line keeps the values (the code's Loss_Q / Loss_G / Acc);
     pydot and graphviz (quantization/torchTransformer.py's graph drawing, imported by quantization/quantize.py,
     never called by main.py): not installed -> stand-ins (graphviz.Digraph raises if called);
  Z2 dataloader.get_dataloader -> (None, the dfqbench test set) at the code's test batch (its --batch_size), the
     teacher's normalization, in a fixed order (the code's test loader shuffles);
  Z3 the teacher: --ckpt is a file the driver writes: the dfqbench teacher's state_dict (pytorchcv
     resnet20_cifar10) under the code's own ResNet20 names (network/resnet20.py, option B: the same network, a
     1x1 conv + BN projection on the downsampling shortcuts), which the code's own load_state_dict (strict) loads;
     before the run the driver checks that the code's ResNet20 with those weights gives the teacher's logits
     (`teacher_check`). The code's ResNet20 is kept, not the dfqbench module: it has the `out_feat` forward the
     code calls, and its quantize_model places the QuantActs as on the code's own models (one ReLU module per
     block, used twice: one QuantAct, one range, for both uses);
  Z4 main.py text: the lr milestones `[100, 200]` (twice: student and generator) -> the schedule's milestones;
  Z5 main.py text: `args.param_bits` (the log file's name after the last epoch; args has no such field:
     AttributeError once training is over) -> `args.weight_bit`;
  Z6 only with --cpu on a machine with a GPU: torch.cuda.is_available -> False (the code picks its device with
     it; without a GPU it runs on the CPU unpatched, it calls no .cuda()).
  Z7 only with --alpha 0: main.py's SCRM -> a stand-in returning 0 (skip_scrm_at_alpha0): the code computes SCRM
     and its backward at every step and multiplies them by alpha, which is most of an iteration's time on CPU.
  Z8 only with --relu-per-use, an ablation (cell `<alpha tag>-relu_per_use`): network/resnet20.py's BasicBlock
     gets a second ReLU module for its inner activation, so the code's own quantize_model gives each ReLU use its
     own QuantAct (19 ranges, dfqbench's placement) instead of one range per block for both uses (10 ranges). The
     plain cell's parity row then quotes this cell's official top-1 as the placement's measured share of the gap.
  Z9 only with --frozen-test-ranges, an ablation (cell `<tags>-frozen_test_ranges`): main.test runs after the
     code's own freeze_model, so the ranges never grow on the test images (dfqbench's ranges see generated images
     only); the plain cell's row quotes every ablation cell (Z8, Z9, both) that has its official side.
Not a change of the code: the child process keeps freed memory as every dfqbench run does (dfqbench.cpu_allocator,
glibc's mmap/trim thresholds; speed only). Observation only: main.train and main.test are timed and their
accuracies kept. The record's `top1` is the code's own test after the FINAL epoch; `official_best_top1` is the
code's "Best Acc" (best epoch on the test set), labelled; `quant_top1_before_training` is the code's test of the
quantized model before training (its ranges then come from the test images: the code's own calibration).

What still differs between the sides (see the module's DEVIATIONS and the task report): SCRM (the code's alpha 1;
dfqbench's zaq.yaml leaves it out), the code's activation ranges also grow on the test images (before training and
at every test) and on the generator step's batches, the QuantAct placement (one per block on the code's ResNet20,
one per ReLU on dfqbench's), the order of the steps (dfqbench: the generator step first, its batch reused by the
first student step), the RNG streams. The placement is the measured cause of the alpha-0 cell's gap: with Z8 the
sides agree (results/parity/README.md, ZAQ).

At the code's --alpha 1 an official seed takes hours at the cpu schedule (600 iterations; the reduced-budget run
in results/parity/zaq/sanity-5x40-1000img measured 17.6 s/iteration on a shared machine), at --alpha 0 with Z7
under an hour (4.18 s/iteration, results/parity/zaq/alpha0/): each saves its state after every epoch to
official-s<S>.resume.pt (EpochResume), and a rerun with --resume carries a stopped seed on from its last epoch, its
log appended to the stopped attempt's.

Writes results/parity/zaq/[<tag>/]w<W>a<A>-<schedule>/: official-s<S>.json and .log.txt per seed, official.json;
with --dfqbench dfqbench-<quant>-s<S>.record.json, dfqbench.log.txt, dfqbench.json and the results/parity.csv row
(method `zaq`, or `zaq-<tag>`).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import third_party as tp  # noqa: E402

METHOD = "zaq"
REPO = "FLHonker/ZAQ-code"
MARKER = "quantization/quant_utils/quant_modules.py"
EXPECTED_COMMIT = "e7e9f55791e36c6784d58c356d3ced76a7583369"  # "Update resnet.py", the clone's HEAD
CODE_FILES = ("main.py", "dataloader.py", "network/__init__.py", "network/gan.py", "network/resnet20.py",
              "quantization/__init__.py", "quantization/quantize_model.py",
              "quantization/quant_utils/quant_modules.py", "quantization/quant_utils/quant_utils.py",
              "utils/loss.py", "utils/visualizer.py")
DEFAULT_ALPHA = 1.0   # main.py --alpha (the SCRM weight)
STUDENT_STEPS = 5     # main.py train(): `for k in range(5)` student steps, then one generator step
CODE_DATASETS = ("cifar10", "cifar100")  # main.py --dataset choices
CLONE_MODULES = ("network", "utils", "quantization", "dataloader", "visdom", "pydot", "graphviz", "zaq_main")

REWRITES = (
    tp.TextRewrite("Z4", "[100, 200]", "{milestones}", count=2,
                   why="the student's and the generator's MultiStepLR milestones (the paper's 300-epoch run) -> "
                       "the schedule's"),
    tp.TextRewrite("Z5", "args.param_bits", "args.weight_bit",
                   why="the csv log's name after the last epoch: args has no param_bits (AttributeError once "
                       "training is over)"),
)
# Z8, an ablation (--relu-per-use): BasicBlock's one ReLU module, used twice, becomes two, so that the code's own
# quantize_model gives each use its own QuantAct (19 ranges, dfqbench's after_relu placement) instead of one range
# shared by the block's inner and output activations (10 ranges)
RELU_PER_USE = (
    tp.TextRewrite("Z8", "        self.bn2 = nn.BatchNorm2d(planes)\n        self.relu = nn.ReLU()\n",
                   "        self.bn2 = nn.BatchNorm2d(planes)\n"
                   "        self.relu = nn.ReLU(); self.relu_inner = nn.ReLU()\n",
                   why="an ablation: a second ReLU module for the block's inner activation"),
    tp.TextRewrite("Z8", "        out = self.relu(self.bn1(self.conv1(x)))\n        out = self.bn2",
                   "        out = self.relu_inner(self.bn1(self.conv1(x)))\n        out = self.bn2",
                   why="an ablation: the block's inner activation through its own ReLU module (same values)"),
)

# the ablations (run-time changes of the code beyond Z1-Z7, each its own cell): flag -> (short, what it changes)
ABLATIONS = {
    "relu_per_use": ("one QuantAct per ReLU use (Z8, dfqbench's placement) instead of one per block",
                     "Z8 --relu-per-use: the code's ResNet20 with one QuantAct per ReLU use (19 ranges, dfqbench's "
                     "placement) instead of one per block"),
    "frozen_test_ranges": ("ranges frozen during the tests (Z9, as dfqbench: grown on generated batches only)",
                           "Z9 --frozen-test-ranges: the code's QuantAct ranges frozen during its tests"),
}


# What differs between the official code and dfqbench's method=zaq (conf/method/zaq.yaml over gdfq.yaml,
# src/dfqbench/train/trainer.py, losses.py, generators/base.py), as read line by line; the task report has them
# with file:line on both sides.
DEVIATIONS = (
    "SCRM: main.py trains both sides with --alpha 1 (utils/loss.py SCRM on the three stage outputs); zaq.yaml leaves "
    "it out (documented decision; +method.student_losses.scrm / +method.generator_losses.scrm add it)",
    "step order: main.py train() runs 5 student steps on fresh batches, then the generator step; dfqbench's "
    "trainer runs the generator step first and its first student step reuses that step's batch (generated before "
    "the generator's update), 4 fresh ones follow",
    "activation ranges: the code's QuantAct running min/max (from 0) also grows on the generator step's batch and "
    "on the test images (the whole test set before training, and at every epoch's test); dfqbench's "
    "running_minmax sees the student steps' generated batches only (from the first batch's range) and is frozen "
    "for the evaluation",
    "QuantAct placement: the code's ResNet20 has one ReLU module per block used twice (one range for the block's "
    "inner and output activations); dfqbench quantizes after each of pytorchcv's ReLU modules (19 ranges vs 10)",
    "evaluation: the code tests after every epoch (its 'Best Acc' is the best epoch on the test set); dfqbench "
    "evaluates once after training",
    "budget: the paper/code runs 300 epochs x 60 iterations of batch 256, milestones 100/200; both sides here run "
    "the dfqbench schedule",
    "RNG: the code seeds torch/numpy/random with --seed S and draws z with torch.randn; dfqbench draws from its own "
    "torch.Generator(seed)",
)


class RecordingVisdom:
    """visdom.Visdom stand-in (Z1): nothing is sent; line() values are kept per window (the code's Loss_Q, Loss_G
    every --log-interval iterations, Acc every epoch)."""

    lines: dict = {}

    def __init__(self, *args, **kwargs):
        pass

    def line(self, X=None, Y=None, win=None, **kwargs):
        for x, y in zip(X or [], Y or []):
            RecordingVisdom.lines.setdefault(str(win), []).append([float(x), round(float(y), 6)])

    def __getattr__(self, name):  # image, text, heatmap: no-ops
        return lambda *args, **kwargs: None


def _unused(name: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in of the parity driver (Z1): main.py does not use it")
    return fail


def skip_scrm_at_alpha0(main_mod, alpha: float, patches: list[str]) -> None:
    """Z7, only at --alpha 0: main.py builds SCRM() in train() and adds alpha x SCRM to both losses, so at alpha 0
    it still computes SCRM and its backward (its 1,024 x 1,024 spatial relations are most of an iteration's time
    on CPU) to multiply them by 0. The stand-in returns that 0 directly: the same losses and gradients, unless
    SCRM is inf or NaN, where the code's 0 x SCRM would be NaN."""
    if alpha != 0:
        return
    import torch

    class NoSCRM(torch.nn.Module):
        def forward(self, g_q, g_p):
            return torch.zeros((), device=g_q[0].device)

    main_mod.SCRM = NoSCRM
    patches.append("Z7 --alpha 0: main.SCRM -> a stand-in returning 0 (the code computes SCRM and its backward to "
                   "multiply them by alpha = 0; the same losses unless SCRM is inf/NaN)")


# --- resuming inside a seed (an official seed at --alpha 1 takes hours at the cpu schedule) --------------------

def freeze_ranges_at_test(main_mod, patches: list[str]) -> None:
    """Z9, an ablation (--frozen-test-ranges): main.test runs after the code's own freeze_model
    (quantization/quantize_model.py: QuantAct.fix, running_stat False), so the QuantAct ranges never grow on the
    test images: they come from the generated batches only, as dfqbench's. Afterwards running_stat is set back to
    True by hand: the code's unfreeze_model calls a QuantAct.unfix that the code never defines. Before training
    the ranges are still 0, where the code's AsymmetricQuantFunction takes each batch's own min/max
    (x_min == x_max): that first test is labelled so."""
    from quantization.quantize_model import freeze_model
    test = main_mod.test

    def test_with_frozen_ranges(args, model, test_loader, epoch=0):
        freeze_model(model)
        try:
            return test(args, model, test_loader, epoch)
        finally:
            for m in model.modules():
                if type(m).__name__ == "QuantAct":
                    m.running_stat = True

    main_mod.test = test_with_frozen_ranges
    patches.append("Z9 main.test after the code's freeze_model (running_stat set back to True after it; the code's "
                   "unfreeze_model calls an undefined QuantAct.unfix): the QuantAct ranges never grow on the test "
                   "images (the test before training then quantizes each batch on its own min/max: the ranges are "
                   "still 0)")


class EpochResume:
    """--resume inside one official seed. main.py's loop is: train(epoch), both schedulers step, test(epoch).
    After each epoch's test this saves what main.main() carries into the next epoch (the student with its BN and
    QuantAct buffers, the generator, both optimizers with the lr the schedulers left, the torch/numpy/random RNG
    states) and what the driver observed, atomically, to `path`. A rerun with the same settings replays the kept
    epochs without computing them (train returns at once, test returns the kept accuracy, main's schedulers still
    step once per epoch) and loads the state at the last kept epoch's test, so the next epoch trains on from where
    the stopped run was. The code's computation is unchanged: tests/test_parity_zaq.py checks that a stopped and
    resumed run ends with the same weights as an uninterrupted one. Observation only, like the timers."""

    def __init__(self, path: Path | None, settings: dict, resume: bool):
        import torch
        self.path, self.settings, self.kept = path, settings, None
        if path is not None and resume and path.exists():
            kept = torch.load(path, weights_only=False)
            if kept.get("settings") == settings:
                self.kept = kept
                print(f"resuming after epoch {kept['epoch']} from {path}", file=sys.stderr, flush=True)
            else:
                print(f"{path} was saved with other settings: starting over", file=sys.stderr, flush=True)
        self.tests: list[tuple[int, float, float]] = []  # (epoch, accuracy, seconds) of every test
        self.train_s: list[float] = []
        self.students: list = []  # the model the last test saw
        self.live: dict = {}  # the generator and optimizers main() passes to train()
        self.wall_before, self.t0 = 0.0, time.perf_counter()

    @property
    def resumed_from_epoch(self) -> int | None:
        return None if self.kept is None else int(self.kept["epoch"])

    @property
    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def _replays(self, epoch: int) -> bool:
        return self.kept is not None and epoch <= self.kept["epoch"]

    def wrap_train(self, train):
        def timed_train(args, *rest, **kwargs):
            self.live.update(generator=kwargs["generator"], optimizers=list(kwargs["optimizer"]))
            if self._replays(int(kwargs["epoch"])):
                return None
            t = time.perf_counter()
            try:
                return train(args, *rest, **kwargs)
            finally:
                self.train_s.append(time.perf_counter() - t)
        return timed_train

    def wrap_test(self, test):
        def observed_test(args, model, test_loader, epoch=0):
            self.students[:] = [model]
            if self._replays(int(epoch)):
                if epoch == self.kept["epoch"]:
                    self._load(model)
                return self.kept["tests"][int(epoch)][1]
            t = time.perf_counter()
            acc = test(args, model, test_loader, epoch)
            self.tests.append((int(epoch), float(acc), time.perf_counter() - t))
            if epoch >= 1 and self.path is not None:
                self._save(int(epoch), model)
            return acc
        return observed_test

    def _save(self, epoch: int, model) -> None:
        import random

        import numpy as np
        import torch
        state = {"settings": self.settings, "epoch": epoch, "q_model": model.state_dict(),
                 "generator": self.live["generator"].state_dict(),
                 "optimizers": [o.state_dict() for o in self.live["optimizers"]],
                 "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()},
                 "tests": list(self.tests), "train_s": list(self.train_s), "wall_s": self.wall_s,
                 "visdom": copy.deepcopy(RecordingVisdom.lines)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def _load(self, model) -> None:
        import random

        import numpy as np
        import torch
        k = self.kept
        model.load_state_dict(k["q_model"])
        self.live["generator"].load_state_dict(k["generator"])
        for opt, s in zip(self.live["optimizers"], k["optimizers"], strict=True):
            opt.load_state_dict(s)
        torch.set_rng_state(k["rng"]["torch"])
        np.random.set_state(k["rng"]["numpy"])
        random.setstate(k["rng"]["random"])
        self.tests, self.train_s = [tuple(t) for t in k["tests"]], list(k["train_s"])
        self.wall_before, self.t0 = float(k["wall_s"]), time.perf_counter()
        RecordingVisdom.lines = copy.deepcopy(k["visdom"])

    def done(self) -> None:
        """The run finished: its state is no longer needed."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


# --- the teacher under the code's ResNet20 names ------------------------------------------------------------------

_UNIT_PARTS = (("body.conv1.conv.", "conv1."), ("body.conv1.bn.", "bn1."), ("body.conv2.conv.", "conv2."),
               ("body.conv2.bn.", "bn2."), ("identity_conv.conv.", "shortcut.0."), ("identity_conv.bn.", "shortcut.1."))


def official_key(key: str) -> str:
    """A pytorchcv CIFAR ResNet state_dict key -> network/resnet20.py's ResNet_2 key (option-B shortcuts)."""
    for old, new in (("features.init_block.conv.", "conv1."), ("features.init_block.bn.", "bn1."),
                     ("output.", "linear.")):
        if key.startswith(old):
            return new + key[len(old):]
    m = re.fullmatch(r"features\.stage(\d+)\.unit(\d+)\.(.+)", key)
    if m:
        for old, new in _UNIT_PARTS:
            if m[3].startswith(old):
                return f"layer{m[1]}.{int(m[2]) - 1}.{new}{m[3][len(old):]}"
    raise SystemExit(f"teacher state_dict key {key!r} has no place in the code's ResNet20 (network/resnet20.py)")


def official_state_dict(state: dict) -> dict:
    out = {official_key(k): v.detach().cpu().clone() for k, v in state.items()}
    if len(out) != len(state):
        raise SystemExit("two teacher keys map to the same ResNet20 key")
    return out


# --- the budget ------------------------------------------------------------------------------------------------------

def check_schedule(sched: dict) -> None:
    """The code has no warm-up and never freezes its ranges: only a schedule with both as dfqbench's zaq.yaml sets
    them (warmup_epochs 0, calib_epochs = epochs) maps onto it."""
    if int(sched["warmup_epochs"]) != 0 or int(sched["calib_epochs"]) != int(sched["epochs"]):
        raise SystemExit(f"schedule warmup_epochs={sched['warmup_epochs']} calib_epochs={sched['calib_epochs']}: "
                         f"ZAQ's code has no warm-up and never freezes its ranges (0 and epochs={sched['epochs']})")


def official_argv(a, sched: dict, dataset: str, data_root: str, ckpt: str) -> list[str]:
    """main.py's command line for this seed and budget (the code's own arguments)."""
    if dataset not in CODE_DATASETS:
        raise SystemExit(f"dataset {dataset!r}: ZAQ's main.py knows {CODE_DATASETS}")
    argv = ["--model", "resnet20", "--dataset", dataset, "--data_root", data_root, "--ckpt", ckpt,
            "--epochs", str(sched["epochs"]), "--epoch_itrs", str(sched["iters_per_epoch"]),
            "--batch_size", str(sched["batch_size"]), "--weight_bit", str(a.wbit), "--activation_bit", str(a.abit),
            "--seed", str(a.seed)]
    return argv + (["--alpha", repr(float(a.alpha))] if a.alpha is not None else [])


def alpha_of(a) -> float:
    return DEFAULT_ALPHA if a.alpha is None else float(a.alpha)


# --- child: one official run ------------------------------------------------------------------------------------------

def child(a) -> None:
    import torch

    from dfqbench.cpu_allocator import keep_freed_memory
    allocator = keep_freed_memory()  # the process's malloc settings, as every dfqbench run has them (speed only)
    torch.set_num_threads(a.threads)
    gpu = torch.cuda.is_available()
    cfg = tp.method_config(tp.method_overrides_list(a, METHOD, a.seed))
    sched = tp.effective_schedule(cfg)
    check_schedule(sched)
    arch = str(cfg.model.arch)
    if not re.fullmatch(r"resnet20_cifar(10|100)", arch):
        raise SystemExit(f"--model {a.model} ({arch}): the driver maps pytorchcv resnet20_cifar10/100 onto the code's "
                         f"ResNet20; another teacher needs another mapping")
    _, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    classes = int(cfg.dataset.num_classes)
    clone = Path(a.official).resolve()
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    patches: list[str] = []

    tp.purge_modules(CLONE_MODULES)
    RecordingVisdom.lines = {}
    tp.stub_module("visdom", patches, "Z1: not installed; utils/visualizer.py imports it and main.py builds a "
                   "VisdomPlotter at import (a server connection): line() values are kept, nothing is sent",
                   Visdom=RecordingVisdom)
    for name, attrs in (("pydot", {}), ("graphviz", {"Digraph": _unused("graphviz.Digraph")})):
        tp.stub_module(name, patches, "Z1: not installed; quantization/torchTransformer.py (imported by the "
                       "package's quantize.py) imports it for its graph drawing, which main.py never calls", **attrs)
    sys.path.insert(0, str(clone))

    # Z3: the teacher's weights under the code's names, and the check that the code's ResNet20 is the teacher
    state = official_state_dict(loaded.model.state_dict())
    ckpt = scratch / "resnet20_dfqbench_teacher.pt"
    torch.save(state, ckpt)
    import network
    if a.relu_per_use:
        code, notes, _ = tp.compile_rewritten(clone / "network" / "resnet20.py", RELU_PER_USE)
        exec(code, network.resnet20.__dict__)  # the module's classes redefined in place; get_model finds them there
        patches.extend(notes)
    net = network.resnet20.ResNet20(num_classes=classes)
    net.load_state_dict(state)
    x, _ = next(iter(common.EvalLoader(data, 256, "cpu")))
    with torch.no_grad():
        ours, theirs = loaded.model.eval()(x), net.eval()(x)
    teacher_check = {"images": int(x.shape[0]), "max_abs_logit_diff": float((ours - theirs).abs().max()),
                     "same_argmax": bool((ours.argmax(1) == theirs.argmax(1)).all())}
    if teacher_check["max_abs_logit_diff"] > 1e-3 or not teacher_check["same_argmax"]:
        raise SystemExit(f"the code's ResNet20 with the mapped weights is not the teacher: {teacher_check}")
    del net
    patches.append(f"Z3 --ckpt {ckpt.name}: the dfqbench teacher {cfg.model.name} (sha256 {loaded.sha256[:16]}) "
                   f"state_dict under network/resnet20.py's ResNet20 names ({len(state)} tensors), loaded by the "
                   f"code's own load_state_dict; the code's ResNet20 with them gives the teacher's logits "
                   f"(max |diff| {teacher_check['max_abs_logit_diff']:.2e} on {teacher_check['images']} test images)")

    # Z2: the dfqbench test set as the code's test loader
    import dataloader
    loader = tp.TimedLoader(data, int(sched["batch_size"]), "cpu")

    def get_dataloader(args):
        loader.inner.batch_size, loader.inner.device = int(args.batch_size), args.device
        return None, loader

    dataloader.get_dataloader = get_dataloader
    patches.append(f"Z2 dataloader.get_dataloader -> (None, the dfqbench {cfg.dataset.name} test set: "
                   f"{data.num_samples} images, the teacher's normalization, batch = --batch_size as the code's test "
                   f"loader, fixed order: the code's loader shuffles)")
    if gpu and a.cpu:
        torch.cuda.is_available = lambda: False
        patches.append("Z6 torch.cuda.is_available -> False (--cpu on a machine with a GPU)")
    main_mod, notes, _ = tp.load_module(clone / "main.py", "zaq_main", REWRITES,
                                        {"milestones": [int(m) for m in sched["milestones"]]})
    patches += notes
    skip_scrm_at_alpha0(main_mod, alpha_of(a), patches)

    # observe (not change): every test's accuracy and seconds, every epoch's training seconds, the student; with
    # --resume, carry on from the last epoch a stopped run of the same settings saved
    argv = official_argv(a, sched, str(cfg.dataset.name), str(scratch / "data"), str(ckpt))
    settings = {"argv": [x for x in argv if not x.startswith(str(scratch))], "teacher_sha256": loaded.sha256,
                "code_sha256": {f: tp.file_sha256(clone / f) for f in CODE_FILES}, "n_test": data.num_samples,
                "method_overrides": list(a.method_overrides), "patches": patches}
    run = EpochResume(Path(a.epoch_state) if a.epoch_state else None, settings, a.resume)
    if a.frozen_test_ranges:
        freeze_ranges_at_test(main_mod, patches)
    main_mod.train, main_mod.test = run.wrap_train(main_mod.train), run.wrap_test(main_mod.test)
    sys.argv = ["main.py", *argv]
    os.chdir(scratch)
    main_mod.main()
    wall = run.wall_s
    tests, train_s, students = run.tests, run.train_s, run.students
    E, I = int(sched["epochs"]), int(sched["iters_per_epoch"])
    if len(tests) != E + 1 or len(train_s) != E or [t[0] for t in tests] != list(range(E + 1)):
        raise SystemExit(f"the official run did not finish: tests at epochs {[t[0] for t in tests]}, "
                         f"{len(train_s)} of {E} epochs trained")
    epochs = tests[1:]
    best = max(epochs, key=lambda t: t[1])  # main.py: best_acc over epochs 1..E (first of equals, as `acc>best_acc`)
    q_model = students[0]
    acts = [m for m in q_model.modules() if type(m).__name__ == "QuantAct"]
    kinds = {}
    for m in q_model.modules():
        kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    csv_log = sorted(scratch.glob("log/ZAQ-*.csv"))
    trained = sum(train_s)
    result = {
        "top1": round(100.0 * epochs[-1][1], 4), "top1_is": "the code's test() after the final epoch",
        "epoch_top1": [round(100.0 * t[1], 4) for t in epochs],
        "quant_top1_before_training": round(100.0 * tests[0][1], 4),
        "official_best_top1": round(100.0 * best[1], 4), "official_best_epoch": best[0],
        "official_best_is": "the code's 'Best Acc': best epoch on the test set (not comparable)",
        "train_s": round(trained, 3), "epoch_train_s": [round(t, 3) for t in train_s],
        "test_s": round(sum(t[2] for t in tests), 3), "wall_s": round(wall, 3),
        "s_per_iteration": round(trained / (E * I), 3), "iterations": E * I,
        "student_steps": STUDENT_STEPS * E * I, "generator_steps": E * I,
        "argv": argv, "seed": a.seed, "alpha": alpha_of(a), **{k: bool(getattr(a, k)) for k in ABLATIONS},
        "patches": patches, "teacher_check": teacher_check,
        "resumed_from_epoch": run.resumed_from_epoch,
        "act_ranges": [[round(float(m.x_min), 6), round(float(m.x_max), 6)] for m in acts],
        "modules": {k: kinds[k] for k in ("Quant_Conv2d", "Quant_Linear", "QuantAct", "BatchNorm2d") if k in kinds},
        "visdom": RecordingVisdom.lines, "code_acc_list_csv": csv_log[-1].read_text().strip() if csv_log else None,
        "model": cfg.model.name, "dataset": str(cfg.dataset.name), "n_test": data.num_samples,
        "max_samples": a.max_samples, "schedule": sched, "wbit": a.wbit, "abit": a.abit,
        "method_overrides": list(a.method_overrides), "device": "cuda" if (gpu and not a.cpu) else "cpu",
        "threads": torch.get_num_threads(), "allocator_keeps_freed_memory": allocator,
        "teacher_sha256": loaded.sha256,
        "code_sha256": {f: tp.file_sha256(clone / f) for f in CODE_FILES}}
    print(f"official zaq: final-epoch top-1 {result['top1']:.2f} (best epoch {best[0]}: "
          f"{result['official_best_top1']:.2f}; before training {result['quant_top1_before_training']:.2f}), "
          f"{result['s_per_iteration']:.2f} s/iteration", file=sys.stderr)
    run.done()
    print(json.dumps(result), flush=True)


# --- parent: seeds, records, dfqbench runs, the parity.csv row --------------------------------------------------------

def expected_settings(a, commit: str, sched: dict) -> dict:
    clone = Path(a.official).resolve()
    return {"official_commit": commit, "code_sha256": {f: tp.file_sha256(clone / f) for f in CODE_FILES},
            "schedule": sched, "wbit": a.wbit, "abit": a.abit, "alpha": alpha_of(a),
            "method_overrides": list(a.method_overrides), "max_samples": a.max_samples, "model": a.model,
            "dataset": a.dataset, **{k: True for k in ABLATIONS if getattr(a, k)}}


def cell_of(a) -> tuple[Path, str]:
    tag = a.tag or "-".join(([] if alpha_of(a) == DEFAULT_ALPHA else [f"alpha{alpha_of(a):g}"])
                            + [k for k in ABLATIONS if getattr(a, k)])
    out = Path(a.out) if a.out else common.REPO / "results" / "parity" / METHOD
    out = out / tag if tag else out
    return out / f"w{a.wbit}a{a.abit}-{a.schedule}", tag


def child_args(a, seed: int, scratch: Path) -> list[str]:
    """The child's command line; it saves its epochs' state to <cell>/official-s<S>.resume.pt (EpochResume) and
    carries on from it with --resume."""
    knob = ["--alpha", repr(float(a.alpha))] if a.alpha is not None else []
    knob += [f"--{k.replace('_', '-')}" for k in ABLATIONS if getattr(a, k)]
    knob += ["--epoch-state", str(cell_of(a)[0] / f"official-s{seed}.resume.pt")] + (["--resume"] if a.resume else [])
    return tp.child_args(a, seed, scratch, knob)


def parent(a) -> None:
    repo, commit = common.clone_identity(Path(a.official), REPO, MARKER)
    cfg = tp.method_config(tp.method_overrides_list(a, METHOD))
    sched = tp.effective_schedule(cfg)
    check_schedule(sched)
    cell, tag = cell_of(a)
    env = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    official_seeds = a.seeds if a.official_seeds is None else a.official_seeds
    dfqbench_seeds = a.seeds if a.dfqbench_seeds is None else a.dfqbench_seeds
    runs = tp.run_official_seeds(
        a, cell, METHOD, official_seeds, expected_settings(a, commit, sched), Path(__file__).resolve(), child_args,
        env, repo, commit, lambda r: f"final-epoch top-1 {r['top1']:.2f} (official best epoch "
                                     f"{r['official_best_epoch']}: {r['official_best_top1']:.2f}; before training "
                                     f"{r['quant_top1_before_training']:.2f}), train {r['train_s']:.0f} s "
                                     f"({r['s_per_iteration']:.2f} s/iteration), wall {r['wall_s']:.0f} s")
    top1 = common.mean_std([r["top1"] for r in runs])
    best = common.mean_std([r["official_best_top1"] for r in runs])
    secs = common.mean_std([r["train_s"] for r in runs])
    record = {"method": METHOD, "tag": tag, "official_repo": repo, "official_commit": commit,
              "driver_written_for": EXPECTED_COMMIT,
              "code_files_as_in_that_commit": tp.same_code_as(Path(a.official), EXPECTED_COMMIT, CODE_FILES),
              "official_is": "the official code (main.py: ZAQ) with its own quantized copy of the teacher",
              "wbit": a.wbit, "abit": a.abit, "alpha": alpha_of(a), "seeds": official_seeds,
              "schedule_name": a.schedule, "schedule": sched,
              "top1_mean": round(top1[0], 4), "top1_std": round(top1[1], 4), "top1_is": "final epoch",
              "official_best_top1_mean": round(best[0], 4), "official_best_top1_std": round(best[1], 4),
              "official_best_top1_is": "the code's 'Best Acc': best epoch on the test set (not comparable)",
              "train_s_mean": round(secs[0], 3), "deviations": list(DEVIATIONS), "runs": runs,
              "model": runs[0]["model"], "dataset": runs[0]["dataset"], "n_test": runs[0]["n_test"],
              "device": runs[0]["device"], "teacher_overrides": common.teacher_overrides(a),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    common.write_json(cell / "official.json", record)
    print(f"official {METHOD} W{a.wbit}A{a.abit} [{a.schedule}]: final-epoch top-1 {top1[0]:.2f} +- {top1[1]:.2f} "
          f"(best epoch on test {best[0]:.2f} +- {best[1]:.2f}) over seeds {official_seeds}, train {secs[0]:.0f} s "
          f"({repo}@{commit[:10]})", flush=True)
    if not a.dfqbench:
        return
    ours, d_top1, d_secs = tp.dfqbench_cell(a, cell, METHOD, sched, dfqbench_seeds)
    scrm = "SCRM alpha 1 as the code" if alpha_of(a) == DEFAULT_ALPHA else f"--alpha {alpha_of(a):g} (SCRM weight)"
    changed = "; ".join(ABLATIONS[k][1] for k in ABLATIONS if getattr(a, k))
    ablation = measured_ablations(a) if not any(getattr(a, k) for k in ABLATIONS) and not a.tag else ""
    common.upsert_parity_row({
        "method": METHOD + (f"-{tag}" if tag else ""), "quant": a.quant, "schedule": a.schedule,
        "wbit": a.wbit, "abit": a.abit, "n_seeds": min(len(runs), len(ours)),
        "official_top1_mean": common.fmt(top1[0]), "official_top1_std": common.fmt(top1[1]),
        "dfqbench_top1_mean": common.fmt(d_top1[0]), "dfqbench_top1_std": common.fmt(d_top1[1]),
        "official_s": common.fmt(secs[0], 0), "dfqbench_s": common.fmt(d_secs[0], 0), "official_repo": repo,
        "official_commit": commit,
        "note": f"official main.py on the teacher (its ResNet20 with the teacher's weights, its own quantize_model at "
                f"W{a.wbit}A{a.abit}: QuantAct running min/max never frozen, also on the test images), lr_Q 0.1, "
                f"lr_G 1e-3 Adam default betas, {scrm}{'; ' + changed if changed else ''}; dfqbench "
                f"method=zaq quant={a.quant} "
                f"(no SCRM{', ' + ' '.join(a.method_overrides) if a.method_overrides else ''}); final epoch on both "
                f"sides (the code's best epoch on test: {best[0]:.2f} +- {best[1]:.2f}); schedule {a.schedule} "
                f"({sched['epochs']} epochs x {sched['iters_per_epoch']} iterations x 5+1 steps, batch "
                f"{sched['batch_size']}, milestones {sched['milestones']}); official seeds "
                f"{' '.join(map(str, official_seeds))} (--seed S), dfqbench seeds "
                f"{' '.join(map(str, dfqbench_seeds))}; seconds = training; {runs[0]['n_test']} test images; "
                f"records {common.rel(cell)}{ablation}",
        "model": runs[0]["model"], "dataset": runs[0]["dataset"], "device": runs[0]["device"]}, Path(a.csv))


def measured_ablations(a) -> str:
    """The note's part for the same cell run with ablations (every combination whose official side is there):
    the share of the gap each change of the code explains, measured."""
    found = []
    for n in range(1, len(ABLATIONS) + 1):
        for combo in itertools.combinations(ABLATIONS, n):
            f = cell_of(argparse.Namespace(**{**vars(a), **{k: k in combo for k in ABLATIONS}}))[0] / "official.json"
            if not f.is_file():
                continue
            ab = json.loads(f.read_text())
            before = common.mean_std([r["quant_top1_before_training"] for r in ab["runs"]])
            found.append(f"{' and '.join(ABLATIONS[k][0] for k in combo)}: {ab['top1_mean']:.2f} +- "
                         f"{ab['top1_std']:.2f} over seeds {' '.join(map(str, ab['seeds']))}, {before[0]:.2f} before "
                         f"training ({common.rel(f.parent)})")
    return f"; the gap measured on the code itself, changed at run time: {'; '.join(found)}" if found else ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--official", required=True, help=f"a clone of {REPO}")
    p.add_argument("--schedule", default="cpu", help="conf/schedule/<name>.yaml: the budget of both sides")
    p.add_argument("--schedule-override", nargs="*", default=[],
                   help="schedule keys for both sides, e.g. epochs=2 iters_per_epoch=3 (smoke checks)")
    p.add_argument("--wbit", type=int, default=4, help="the code's --weight_bit / dfqbench wbit")
    p.add_argument("--abit", type=int, default=4, help="the code's --activation_bit / dfqbench abit")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="official --seed S (the code seeds torch/numpy/random with it) / dfqbench seed=S")
    p.add_argument("--alpha", type=float, default=None,
                   help="the code's --alpha (SCRM weight; default: the code's 1); another value names the cell")
    p.add_argument("--relu-per-use", action="store_true",
                   help="ablation Z8: one QuantAct per ReLU use in the code's ResNet20 (dfqbench's placement) instead "
                        "of one per block; names the cell <alpha tag>-relu_per_use")
    p.add_argument("--frozen-test-ranges", action="store_true",
                   help="ablation Z9: the code's QuantAct ranges frozen during its tests (never grown on test "
                        "images); names the cell <tags>-frozen_test_ranges")
    p.add_argument("--epoch-state", default="", help=argparse.SUPPRESS)  # the child's EpochResume file
    common.add_cell_arguments(
        p, METHOD, quant_help="dfqbench preset of the dfqbench side (default gdfq)",
        overrides_help="more dfqbench overrides (method.X=Y) for the dfqbench runs (the schedule they give applies "
                       "to both sides)", variant="alpha")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    a = p.parse_args(argv)
    (child if a.child else parent)(a)


if __name__ == "__main__":
    main()
