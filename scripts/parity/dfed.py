"""Parity driver for DFED (Hao et al., ACM MM 2021): DFED.py of Hao840/CDFKD-MFS (a re-implementation by the
paper's first author, not the paper's released code: none exists) run on the dfqbench ensemble (the run's teacher +
the teacher pool of conf/method/dfed.yaml) and test set at a dfqbench schedule's budget, with its float student
replaced by dfqbench's quantized student, beside `python -m dfqbench method=dfed quant=gdfq schedule=<schedule>`.

    git clone /work/.mirror/Hao840+CDFKD-MFS/repo /tmp/dfed-code
    python scripts/parity/dfed.py --official /tmp/dfed-code [--schedule cpu] [--seeds 0 1 2] [--dfqbench] [--resume]

The official side runs DFED.py as __main__ in a child process per seed, with its own arguments --dataset cifar10
--model_t dfqbench_teacher --model_s dfqbench_student --num_t K --epochs E --iters I --bsz B --lr_milestone M...
--num_workers 0 --no_img_saving (E x I, batch and milestones: the dfqbench schedule's, 10 x 60, 64, [8] on `cpu`;
DFED has no warm-up: its loop runs every epoch, 5 student steps then 1 generator step per iteration); lr_s 0.1
(unless --lr-s), lr_g 1e-3, weight_bns 0.1, nz 256 stay the code's. Run-time changes, listed in "patches":
  D1 registry.datainfo['cifar10'] (the code knows cifar100, caltech101, miniimagenet): its CIFAR generator
     (nets.gan.Generator, 32 px), 10 classes;
  D2 registry.models['dfqbench_teacher'] builds the k-th ensemble member in the order dfqbench's Ensemble has them
     (the run's teacher, then the pool as dfqbench.pool.load_pool loads it), wrapped to accept the code's
     `model(x, out_feature)` call (pytorchcv/dfqbench models take one argument; out_feature False is asserted);
     ckp/cifar10-dfqbench_teacher-<k>.pt are written from the dfqbench checkpoints as {'state': state_dict}, so
     that the code's own torch.load + load_state_dict load them;
  D3 registry.models['dfqbench_student'] -> the student swap (third_party.CalibratedStudent: dfqbench's
     quantize_model of a copy of the run's teacher with the dfqbench run's convention, gdfq + method=dfed's act
     STE override, weights dynamic); its EMA activation ranges are updated on the student-step batches (the
     generator's no-grad images: the input does not require grad) of the first calib_epochs epochs, then frozen
     (DFED trains the student from the first iteration; dfqbench calibrates during its generator-only warm-up);
  D4 utils.get_loader -> (None, the dfqbench test set at the code's batch 256, the teacher's normalization);
  D5 DFED.py text: `rescale = [5] + [1. ...(len(hooks[0]) - 1)]` -> as long as the longest member's BN list
     (the members differ: 21, 6, 52 BatchNorms; the code indexes rescale by each member's BN index, IndexError
     otherwise); the same weights: 5 on each member's first BN, 1 elsewhere;
  D6 (only when K != 3) DFED.py text: the BN loss's `for i in range(3)` -> range(args.num_t);
  D7 DFED.py text: `meter_train.reset()` -> also `_parity.start_epoch(epoch)` (calibration on/off per epoch);
  D8 tensorboardX (recorder.py) and sklearn (utils/classification_dataset/utils.py: split_data, unused) ->
     stand-ins; the tensorboardX one keeps the per-epoch 'accuracy' the code logs;
  D9 without a GPU, .cuda() -> the CPU; torch/numpy/random seeded with S before the script (it seeds nothing).
The record's `top1` is the code's own test of the FINAL epoch; `dfqbench_eval_top1` is dfqbench's evaluate() of the
same final student.

What still differs between the sides (the task report gives the verdicts): DFED's student trains in train mode
(BatchNorm on batch statistics, running statistics from generated images) at SGD lr 0.1 (unless --lr-s),
momentum 0.9, weight decay 5e-4, no Nesterov, from the first iteration; dfqbench's (GDFQ frame) in eval mode at
lr 1e-4 Nesterov, weight decay 1e-4 after a 4-epoch generator-only warm-up; in an iteration DFED takes its 5
student steps before the generator step, dfqbench after it; the RNG streams. (Since 2026-12-04 both sides draw
a fresh batch for every student step and use the generator's BN eps 0.8.) The ablations of the first two
differences are in results/explore/dfed-student-mode/; the parity cell's second row runs dfqbench with both
removed beside the same official seeds:

    python scripts/parity/dfed.py --official /tmp/dfed-code --lr-s 1e-4 --dfqbench --resume \
        --dfqbench-variant code_loop ++method.student_mode=train '++method.schedule_overrides={warmup_epochs:0}' \
        method.name=dfed-student_train-no_warmup

Writes results/parity/dfed/[<tag>/]w<W>a<A>-<schedule>/ (as scripts/parity/advkd.py) and the results/parity.csv row
(method `dfed` or `dfed-<tag>`).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import third_party as tp  # noqa: E402

SPEC = tp.DriverSpec(
    method="dfed", repo="Hao840/CDFKD-MFS", marker="DFED.py",
    expected_commit="9197b94d4198112126cf95834fc81d23c45f30a4",
    code_files=("DFED.py", "registry.py", "nets/gan.py", "utils/forward.py"),
    what="Hao840/CDFKD-MFS DFED.py, a float-student re-implementation by the paper's first author; the paper has "
         "no released code",
    default_lr_s=0.1)

TEACHER, STUDENT = "dfqbench_teacher", "dfqbench_student"

REWRITES = (
    tp.TextRewrite("D5", "rescale = [5] + [1. for _ in range(len(hooks[0]) - 1)]",
                   "rescale = [5] + [1. for _ in range(max(len(h) for h in hooks) - 1)]",
                   why="members with different BN counts: the list as long as the longest member's (IndexError "
                       "otherwise); the same weights"),
    tp.TextRewrite("D7", "meter_train.reset()", "meter_train.reset(); _parity.start_epoch(epoch)",
                   why="the student's EMA range calibration on during the first calib_epochs epochs"),
)
THREE_TEACHERS = tp.TextRewrite("D6", "for i in range(3))", "for i in range(args.num_t))",
                                why="the BN loss sums over 3 hooked teachers whatever --num_t is")


class Hooks:
    """What the rewritten DFED.py calls (`_parity`); `students()` lists the students the script built."""

    def __init__(self, calib_epochs: int, students):
        self.calib_epochs, self.students, self.epochs = calib_epochs, students, 0
        self.frozen_at = None

    def start_epoch(self, epoch: int) -> None:
        self.epochs = epoch + 1
        student = self.students()[-1]
        if epoch < self.calib_epochs:
            student.calibrating = True
        elif self.frozen_at is None:
            student.stop_calibration()
            self.frozen_at = epoch


def _adapter_class():
    from torch import nn

    class OutFeatureAdapter(nn.Module):
        """A one-argument model under the code's `model(x, out_feature)` call."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, out_feature=False):
            if out_feature:
                raise RuntimeError("DFED.py asked for features (out_feature=True): not supported by the driver")
            return self.net(x)

    return OutFeatureAdapter


def child(a) -> None:
    import types

    import torch
    from torch import nn

    from dfqbench.evaluate import evaluate
    from dfqbench.pool import load_pool
    from dfqbench.quant.kernels.backend import resolve_backend_name, use_backend
    from omegaconf import OmegaConf
    setup = tp.child_setup(a, SPEC.method)
    cuda, device, cfg, sched = setup.cuda, setup.device, setup.cfg, setup.sched
    convention, loaded, data = setup.convention, setup.loaded, setup.data
    num_classes = int(cfg.dataset.num_classes)
    ctx = types.SimpleNamespace(model_sha256=loaded.sha256, num_classes=num_classes, device=device)
    pool, ids = load_pool(OmegaConf.to_container(cfg.method.pool, resolve=True), cfg.paths.models_dir, ctx)
    members = [loaded.model.eval(), *pool]
    bn_counts = [sum(isinstance(m, nn.BatchNorm2d) for m in member.modules()) for member in members]
    K = len(members)
    clone = Path(a.official).resolve()
    lr_s = SPEC.default_lr_s if a.lr_s is None else a.lr_s
    scratch = Path(a.scratch)
    (scratch / "ckp").mkdir(parents=True, exist_ok=True)
    patches: list[str] = []

    tp.stub_tensorboardx(patches)

    class _Unused:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("sklearn stand-in: split_data is not used by DFED.py")

    tp.stub_module("sklearn.model_selection", patches, "not installed; only utils.classification_dataset.split_data "
                   "uses it, which DFED.py never calls", StratifiedShuffleSplit=_Unused)
    tp.purge_modules(("utils", "nets", "registry"))
    sys.path.insert(0, str(clone))
    import registry
    import utils
    from nets import gan

    registry.datainfo["cifar10"] = {"generator": gan.Generator, "num_classes": 10, "img_size": 32,
                                    "train_num": 50000, "mean": tuple(cfg.dataset.mean), "std": tuple(cfg.dataset.std)}
    patches.append("D1 registry.datainfo['cifar10'] = the code's CIFAR entry (nets.gan.Generator, 32 px) with 10 "
                   "classes and the dfqbench normalization")
    Adapter = _adapter_class()
    built = []

    def teacher_factory(num_classes: int):
        k = len(built)
        if k >= K:
            raise SystemExit(f"the code asks for more than {K} teachers")
        net = Adapter(copy.deepcopy(members[k]))
        built.append(net)
        return net

    for k, member in enumerate(members, start=1):
        torch.save({"state": Adapter(member).state_dict()}, scratch / "ckp" / f"cifar10-{TEACHER}-{k}.pt")
    registry.models[TEACHER] = teacher_factory
    patches.append(f"D2 registry.models[{TEACHER!r}] -> the k-th ensemble member, in dfqbench's order: "
                   f"{cfg.model.name} (sha256 {loaded.sha256[:16]}), {', '.join(ids)}, each accepting "
                   f"model(x, out_feature=False); ckp/cifar10-{TEACHER}-<k>.pt written from their state_dicts "
                   f"(BatchNorm2d layers per member: {bn_counts})")
    made = []

    def student_factory(num_classes: int):
        s = tp.calibrated_student(loaded.model, convention, a.wbit, a.abit, beta=float(cfg.method.ema_beta),
                                  rng=torch.Generator().manual_seed(a.seed),
                                  observe=lambda module, x: module.training and not x.requires_grad)
        made.append(s)
        return s

    registry.models[STUDENT] = student_factory
    patches.append(f"D3 registry.models[{STUDENT!r}] -> the student swap: dfqbench quantize_model (quant={a.quant}, "
                   f"W{a.wbit}A{a.abit}, convention with method=dfed's overrides: act STE "
                   f"{convention.act.ste}) of a copy of the run's teacher, weights dynamic; EMA ranges (beta "
                   f"{cfg.method.ema_beta}) on the student-step batches of the first {sched['calib_epochs']} epochs")
    loader = tp.TimedLoader(data, 256, device)

    def get_loader(dataset, batch_size, num_workers=4, *args, **kwargs):
        loader.inner.batch_size = batch_size
        return None, loader

    utils.get_loader = get_loader
    patches.append(f"D4 utils.get_loader -> (None, the dfqbench {cfg.dataset.name} test set, {data.num_samples} "
                   f"images, the code's batch 256)")
    if not cuda:
        common.cpu_only_cuda_calls(device)
        patches.append("D9 .cuda() -> cpu")
    hooks = Hooks(int(sched["calib_epochs"]), lambda: made)
    rewrites = REWRITES + ((THREE_TEACHERS,) if K != 3 else ())
    milestones = [int(m) for m in sched["milestones"]] or [int(sched["epochs"]) + 1]
    argv = ["--exp_name", f"parity-s{a.seed}", "--dataset", "cifar10", "--model_t", TEACHER, "--model_s", STUDENT,
            "--epochs", str(sched["epochs"]), "--iters", str(sched["iters_per_epoch"]),
            "--bsz", str(sched["batch_size"]), "--lr_s", repr(lr_s), "--lr_milestone", *map(str, milestones),
            "--num_t", str(K), "--num_workers", "0", "--no_img_saving"]
    tp.seed_everything(a.seed)
    patches.append(f"D9 torch/numpy/random seeded with {a.seed} before the script (it seeds nothing)")
    os.chdir(scratch)
    t0 = time.perf_counter()
    with use_backend(resolve_backend_name(convention.backend, device)):
        g, notes, _ = tp.run_script(clone / "DFED.py", argv, rewrites, inject={"_parity": hooks})
    wall = time.perf_counter() - t0
    patches += notes
    tests = tp.scalars("accuracy")
    if len(tests) != int(sched["epochs"]) or len(made) != 1 or len(built) != K:
        raise SystemExit(f"the official run did not finish: {len(tests)} of {sched['epochs']} epochs tested, "
                         f"{len(made)} students, {len(built)} teachers built")
    student = g["student"]
    assert student is made[0]
    calib_iters = min(int(sched["calib_epochs"]), int(sched["epochs"])) * int(sched["iters_per_epoch"])
    if student.observed_batches != calib_iters * 5:
        raise SystemExit(f"{student.observed_batches} batches observed for the ranges, expected {calib_iters * 5}")
    with use_backend(resolve_backend_name(convention.backend, device)):
        ours = evaluate(student.net, data, int(cfg.eval.batch_size), device)
    train_s = wall - loader.seconds
    iterations = int(sched["epochs"]) * int(sched["iters_per_epoch"])
    result = tp.common_result(a, SPEC, cfg, sched, loaded, data, convention, device, patches)
    result.update({
        "top1": round(100.0 * tests[-1][1], 4), "epoch_top1": [round(100.0 * v, 4) for _, v in tests],
        "dfqbench_eval_top1": round(ours["top1"], 4), "train_s": round(train_s, 3), "wall_s": round(wall, 3),
        "test_s": round(loader.seconds, 3), "s_per_iteration": round(train_s / iterations, 3), "argv": argv,
        "seed": a.seed, "ensemble": [f"{cfg.model.name}:{loaded.sha256}", *ids], "bn_counts": bn_counts,
        "calibration": {"batches_observed": student.observed_batches, "frozen_at_epoch": hooks.frozen_at,
                        "ranges": student.ranges()},
        "student": {"type": type(student).__name__, **tp.quantizer_counts(student)},
        "lr_s_note": tp.lr_s_note(a, "--lr_s")})
    tp.hand_back("dfed", result)


def describe_official(sched: dict, runs: list) -> str:
    r = runs[0]
    return (f"official side: DFED.py with --epochs {sched['epochs']} --iters {sched['iters_per_epoch']} --bsz "
            f"{sched['batch_size']} --lr_milestone {' '.join(map(str, sched['milestones']))}, no warm-up, student "
            f"lr {r['lr_s']:g} (dfqbench 1e-4) in train mode, ensemble {len(r['ensemble'])} teachers as dfqbench's; "
            f"the student's ranges calibrated on the student-step batches of the first {sched['calib_epochs']} "
            f"epochs{_around_the_freeze(runs)}")


def _around_the_freeze(runs: list) -> str:
    """The code's own per-epoch test (mean over the seeds), '|' where the ranges freeze ('' for older runs)."""
    frozen = {r.get("calibration", {}).get("frozen_at_epoch") for r in runs}
    tests = [r.get("epoch_top1") or [] for r in runs]
    if len(frozen) != 1 or None in frozen or not tests[0] or any(len(t) != len(tests[0]) for t in tests):
        return ""
    k = frozen.pop()
    means = [f"{sum(col) / len(col):.1f}" for col in zip(*tests)]
    return (f"; the code's per-epoch test, mean over the seeds, '|' where the ranges freeze: "
            f"{' '.join(means[:k])} | {' '.join(means[k:])}")


def main(argv=None) -> None:
    tp.main(argv, SPEC, __file__, __doc__, child, describe_official)


if __name__ == "__main__":
    main()
