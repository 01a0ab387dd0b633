"""Parity driver for AdvKD (Choi et al., CVPRW 2020): the UNOFFICIAL re-implementation
da2so/Data-Free_Network_Quantization_With_Adversarial_Knowledge_Distillation (R5; the paper has no code) run on
the dfqbench teacher and test set at a dfqbench schedule's budget, with its float student replaced by dfqbench's
quantized student, beside `python -m dfqbench method=advkd quant=gdfq schedule=<schedule>` on the same cell.

    git clone /work/.mirror/da2so+Data-Free_Network_Quantization_With_Adversarial_Knowledge_Distillation/repo /tmp/advkd-code
    (the mirror lacks the clone's CIFAR-10 pickles: if the checkout stops, `git -C /tmp/advkd-code checkout HEAD --
     $(git -C /tmp/advkd-code ls-tree -r --name-only HEAD | grep -v '^trainer/dataset/')` brings back the code)
    python scripts/parity/advkd.py --official /tmp/advkd-code [--schedule cpu] [--seeds 0 1 2] [--dfqbench] [--resume]

The official side runs the clone's own main.main() (main.py -> dfqad.DFQAD(opt).build(summary)) in a child process
per seed, with the code's arguments --dataset cifar10 --do_warmup True --do_Ttrain False and the budget as the
dfqbench method trains (the schedule group with conf/method/advkd.yaml's per_setting: on `cpu` 10 epochs x 6
iterations, batch 64, 4 warm-up epochs): --batch_size B, --iter I (per epoch, warm-up and main), --n_epochs
E - W (the main epochs; W = the warm-up epochs, which R5 runs before its main ones: the same 24 + 36 generator and
360 student steps as the dfqbench run); everything else stays the code's (lr_S 0.1 unless --lr-s, lr_G 1e-3,
alpha 0.01, latent 512, cosine schedules with T_max = --n_epochs, 1 G and 10 S steps per iteration).
Run-time changes, each listed in the record's "patches":
  A1 dfqad.py text: `self.warm_up(summary)` -> `self.warm_up(summary, epochs=W)` (the warm-up length is only a
     default argument, 50);
  A2 dfqad.py text: the epoch-0 progress print names `l_l`, defined nowhere (NameError at the first main
     iteration): that field is left out of the print;
  A3 dfqad.py text: after each warm-up generator step, `_parity.after_warmup_step(self, epoch, gen_imgs)`:
     while epoch < calib_epochs, the quantized student's EMA activation ranges are calibrated on 10 generated
     batches drawn as R5's student steps draw them (student.train(), generator.eval(), fresh z ~ N(0, I)), no
     optimizer step: the code has no quantizer, and dfqbench calibrates during its warm-up on the same number of
     batches (warm-up iterations x 10 student steps); the generator is put back in train mode;
  A4 dfqad.py text: at the end of the warm-up `_parity.warmup_done(self)` and after each main epoch's test
     `_parity.after_epoch(self, epoch)`: calibration continues on the student-step batches of main epochs while
     W + epoch < calib_epochs (none on `cpu`), then the ranges are frozen;
  A5 utils.core: ResNet18 -> the student swap (third_party.CalibratedStudent: dfqbench.quant.quantize_model of a
     copy of the dfqbench teacher with the dfqbench run's convention, weights dynamic), so the code's own
     load_student_n_testdataset builds its SGD(lr_S, momentum 0.9, nesterov) over the quantized student;
     CIFAR10 / DataLoader -> the dfqbench test set (the teacher's normalization, batch = --batch_size as the code);
  A6 dfqad.load_teacher -> the dfqbench teacher (eval mode) instead of the code's ResNet-34 checkpoint;
  A7 tensorboardX -> a stand-in (not installed; its add_scalar values give the per-epoch test accuracy);
  A8 without a GPU, .cuda() -> the CPU; torch, numpy and random seeded with S before main() (the code seeds
     nothing).
Observation only: DFQAD.warm_up / DFQAD.test timed. The record's `top1` is the code's own test of the FINAL epoch
(R5 also saves its best epoch on the test set: not used); `dfqbench_eval_top1` is dfqbench's evaluate() of the same
final student (they agree unless the batch order matters).

What still differs between the sides (the parity measures it; see the task report for the verdicts): the student
lr (0.1 here unless --lr-s 1e-4; dfqbench 1e-4), weight decay (none / 1e-4), cosine (T_max = main epochs, the
generator's stepped in the warm-up too) vs x0.1 at the milestones, R5's student-step images from the generator in
eval mode (running BatchNorm statistics) and always fresh (dfqbench: train mode, the first student step reuses the
generator step's batch), R5's generator step with the student in eval mode (dfqbench: train mode), the RNG streams.

Writes results/parity/advkd/[<tag>/]w<W>a<A>-<schedule>/: official-s<S>.json and .log.txt per seed,
official.json; with --dfqbench dfqbench-<quant>-s<S>.record.json, dfqbench.log.txt, dfqbench.json and the
results/parity.csv row (method `advkd`, or `advkd-<tag>`; `--lr-s X` other than 0.1 tags the cell `lrS<X>`).
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
    method="advkd", repo="da2so/Data-Free_Network_Quantization_With_Adversarial_Knowledge_Distillation",
    marker="dfqad.py", expected_commit="802cf52613db859236f8cdee4923db385949fb1e",
    code_files=("main.py", "dfqad.py", "utils/core.py", "utils/loss.py", "network/generator.py"),
    what="da2so/Data-Free_Network_Quantization_With_Adversarial_Knowledge_Distillation, a float-student KD "
         "re-implementation; the paper has no code",
    default_lr_s=0.1)

STUDENT_STEPS = 10  # R5's `for _ in range(10)` student steps per iteration (dfqad.py)

REWRITES = (
    tp.TextRewrite("A1", "self.warm_up(summary)", "self.warm_up(summary, epochs={warmup_epochs})",
                   why="the warm-up epochs (a default argument, 50) -> the schedule's warmup_epochs"),
    tp.TextRewrite("A2", "[loss_logit: %f] ", "",
                   why="the epoch-0 print names l_l, defined nowhere: NameError at the first main iteration"),
    tp.TextRewrite("A2", "l_l.item(),", "", why="(the same print's argument)"),
    tp.TextRewrite("A3", "l_s.backward()\n                self.optimizer_G.step()",
                   "l_s.backward()\n                self.optimizer_G.step(); "
                   "_parity.after_warmup_step(self, epoch, gen_imgs)",
                   why="after each warm-up generator step: the quantized student's EMA range calibration while "
                       "epoch < calib_epochs (no optimizer step)"),
    tp.TextRewrite("A4", "print('-'*30+'Warm up end'+'-'*30)",
                   "print('-'*30+'Warm up end'+'-'*30); _parity.warmup_done(self)",
                   why="calibration state after the warm-up"),
    tp.TextRewrite("A4", "self.test(summary,epoch)", "self.test(summary,epoch); _parity.after_epoch(self, epoch)",
                   why="calibration state after each main epoch (ranges frozen once W + epoch + 1 >= calib_epochs)"),
)


class Hooks:
    """What the rewritten dfqad.py calls (`_parity`)."""

    def __init__(self, warmup_epochs: int, calib_epochs: int, student_steps: int = STUDENT_STEPS):
        self.warmup_epochs, self.calib_epochs, self.student_steps = warmup_epochs, calib_epochs, student_steps
        self.obj = None
        self.warmup_steps = self.calib_passes = 0
        self.frozen_after = None  # (phase, epoch) at which the ranges were frozen

    def after_warmup_step(self, obj, epoch: int, gen_imgs) -> None:
        import torch
        self.obj = obj
        self.warmup_steps += 1
        if epoch >= self.calib_epochs:
            self._freeze(obj, ("warm-up", epoch))
            return
        student, gen = obj.student, obj.generator
        device = next(gen.parameters()).device
        was_s, was_g = student.training, gen.training
        student.calibrating = True
        student.train()
        gen.eval()
        try:
            with torch.no_grad():
                for _ in range(self.student_steps):  # as R5's student steps draw their batches
                    z = torch.randn(obj.opt.batch_size, obj.opt.latent_dim).to(device)  # R5: .cuda()
                    student(gen(z))
                    self.calib_passes += 1
        finally:
            student.train(was_s)
            gen.train(was_g)
            student.calibrating = False

    def warmup_done(self, obj) -> None:
        self.obj = obj
        self._set_main(obj, 0)

    def after_epoch(self, obj, epoch: int) -> None:
        self.obj = obj
        self._set_main(obj, epoch + 1)

    def _set_main(self, obj, next_epoch: int) -> None:
        if self.warmup_epochs + next_epoch < self.calib_epochs:
            obj.student.calibrating = True  # the main loop's student steps (train mode) are observed
        else:
            self._freeze(obj, ("main", next_epoch))

    def _freeze(self, obj, when) -> None:
        if self.frozen_after is None:
            obj.student.stop_calibration()
            self.frozen_after = list(when)


def child(a) -> None:
    import torch

    from dfqbench.evaluate import evaluate
    from dfqbench.quant.kernels.backend import resolve_backend_name, use_backend
    setup = tp.child_setup(a, SPEC.method)
    cuda, device, cfg, sched = setup.cuda, setup.device, setup.cfg, setup.sched
    convention, loaded, data = setup.convention, setup.loaded, setup.data
    teacher = copy.deepcopy(loaded.model).to(device).eval()
    clone = Path(a.official).resolve()
    W, E = int(sched["warmup_epochs"]), int(sched["epochs"])
    n_main = E - W
    lr_s = SPEC.default_lr_s if a.lr_s is None else a.lr_s
    patches: list[str] = []

    tp.stub_tensorboardx(patches)
    tp.purge_modules(("utils", "network", "trainer", "dfqad", "main"))
    sys.path.insert(0, str(clone))
    hooks = Hooks(W, int(sched["calib_epochs"]))
    dfqad, notes, _ = tp.load_module(clone / "dfqad.py", "dfqad", REWRITES, {"warmup_epochs": W},
                                     inject={"_parity": hooks})
    patches += notes
    import utils.core as core

    made = []

    def student_factory(num_classes: int = 10):
        if num_classes != int(cfg.dataset.num_classes):
            raise SystemExit(f"the code asks for a {num_classes}-class student; the teacher has "
                             f"{cfg.dataset.num_classes}")
        s = tp.calibrated_student(teacher, convention, a.wbit, a.abit, beta=float(cfg.method.ema_beta),
                                  rng=torch.Generator().manual_seed(a.seed))
        made.append(s)
        return s

    loader = tp.TimedLoader(data, 64, device)

    def data_loader(dataset, batch_size=1, num_workers=0, **kwargs):
        loader.inner.batch_size = batch_size
        return loader

    core.ResNet18 = student_factory
    core.CIFAR10 = lambda *args, **kwargs: loader.dataset
    core.DataLoader = data_loader
    patches.append(f"A5 utils.core.ResNet18 -> the student swap: dfqbench quantize_model (quant={a.quant}, "
                   f"W{a.wbit}A{a.abit}, convention {convention.name} with method=advkd's overrides) of a copy of "
                   f"the teacher, weights dynamic, EMA ranges (beta {cfg.method.ema_beta}) only while calibrating; "
                   f"utils.core.CIFAR10 / DataLoader -> the dfqbench {cfg.dataset.name} test set "
                   f"({data.num_samples} images, batch = --batch_size)")
    dfqad.load_teacher = lambda dataset_name, teacher_path: teacher
    patches.append(f"A6 dfqad.load_teacher -> the dfqbench teacher {cfg.model.name} (sha256 {loaded.sha256[:16]}), "
                   f"eval mode")
    if not cuda:
        common.cpu_only_cuda_calls(device)
        patches.append("A8 .cuda() -> cpu")
    timings = {"warm_up": 0.0, "test": 0.0}
    warm_up, test = dfqad.DFQAD.warm_up, dfqad.DFQAD.test

    def timed_warm_up(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return warm_up(self, *args, **kwargs)
        finally:
            timings["warm_up"] += time.perf_counter() - t

    def timed_test(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return test(self, *args, **kwargs)
        finally:
            timings["test"] += time.perf_counter() - t

    dfqad.DFQAD.warm_up, dfqad.DFQAD.test = timed_warm_up, timed_test
    main_mod = tp.load_module(clone / "main.py", "advkd_main")[0]  # its __main__ block stays idle
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    argv = ["--dataset", "cifar10", "--n_epochs", str(n_main), "--iter", str(sched["iters_per_epoch"]),
            "--batch_size", str(sched["batch_size"]), "--lr_S", repr(lr_s), "--do_warmup", "True",
            "--do_Ttrain", "False", "--data", str(scratch / "data") + "/",
            "--saved_img_path", str(scratch / "outputs" / "saved_img") + "/",
            "--saved_model_path", str(scratch / "outputs" / "saved_model") + "/"]
    if int(cfg.dataset.num_classes) != 10:
        raise SystemExit("the code's --dataset cifar10 branch builds a 10-class student: use a CIFAR-10 teacher")
    tp.seed_everything(a.seed)
    patches.append(f"A8 torch/numpy/random seeded with {a.seed} before main() (the code seeds nothing)")
    sys.argv = ["main.py", *argv]
    os.chdir(scratch)
    t0 = time.perf_counter()
    with use_backend(resolve_backend_name(convention.backend, device)):
        main_mod.main()
    wall = time.perf_counter() - t0
    tests = tp.scalars("main/test_acc")
    if len(tests) != n_main or len(made) != 1 or hooks.obj is None:
        raise SystemExit(f"the official run did not finish: {len(tests)} of {n_main} main epochs tested, "
                         f"{len(made)} students built")
    student = hooks.obj.student
    expected_calib = min(W, hooks.calib_epochs) * int(sched["iters_per_epoch"]) * STUDENT_STEPS
    if hooks.calib_passes != expected_calib or hooks.warmup_steps != W * int(sched["iters_per_epoch"]):
        raise SystemExit(f"calibration passes {hooks.calib_passes} (expected {expected_calib}), warm-up generator "
                         f"steps {hooks.warmup_steps} (expected {W * int(sched['iters_per_epoch'])})")
    with use_backend(resolve_backend_name(convention.backend, device)):
        ours = evaluate(student.net, data, int(cfg.eval.batch_size), device)
    train_s = wall - timings["test"]
    main_s = train_s - timings["warm_up"]
    iterations = E * int(sched["iters_per_epoch"])
    result = tp.common_result(a, SPEC, cfg, sched, loaded, data, convention, device, patches)
    result.update({
        "top1": round(100.0 * tests[-1][1], 4), "epoch_top1": [round(100.0 * v, 4) for _, v in tests],
        "dfqbench_eval_top1": round(ours["top1"], 4), "train_s": round(train_s, 3), "wall_s": round(wall, 3),
        "warmup_s": round(timings["warm_up"], 3), "main_s": round(main_s, 3), "test_s": round(timings["test"], 3),
        "s_per_iteration": round(train_s / iterations, 3),
        "s_per_main_iteration": round(main_s / (n_main * int(sched["iters_per_epoch"])), 3),
        "s_per_warmup_iteration": round(timings["warm_up"] / max(1, W * int(sched["iters_per_epoch"])), 3),
        "argv": argv, "seed": a.seed, "calibration": {
            "batches_observed": student.observed_batches, "passes": hooks.calib_passes,
            "frozen_after": hooks.frozen_after, "ranges": student.ranges()},
        "student": {"type": type(student).__name__, **tp.quantizer_counts(student)},
        "lr_s_note": tp.lr_s_note(a, "--lr_S")})
    tp.hand_back("advkd", result)


def describe_official(sched: dict, runs: list) -> str:
    r = runs[0]
    return (f"official side: the code's main() with --n_epochs {sched['epochs'] - sched['warmup_epochs']} --iter "
            f"{sched['iters_per_epoch']} --batch_size {sched['batch_size']}, warm-up {sched['warmup_epochs']} "
            f"epochs, student lr {r['lr_s']:g} (dfqbench 1e-4), cosine schedules; the student's ranges calibrated "
            f"on {r['calibration']['passes']} generated batches during the warm-up as dfqbench's")


def main(argv=None) -> None:
    tp.main(argv, SPEC, __file__, __doc__, child, describe_official)


if __name__ == "__main__":
    main()
