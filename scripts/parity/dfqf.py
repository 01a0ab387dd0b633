"""Parity driver for DFQF (Li et al., ACML 2020): the official code BowenLi94/DFQF (dfkd.py = stage 1, the
generator; dfqf.py = stage 2, the quantized fine-tuning with its own quantizer) run on the dfqbench teacher and test
set at a dfqbench schedule's budget, beside `python -m dfqbench method=dfqf quant=dfqf schedule=<schedule>`.

    git clone /work/.mirror/BowenLi94+DFQF/repo /tmp/off-dfqf
    python scripts/parity/dfqf.py --official /tmp/off-dfqf [--seeds 0 1 2] [--dfqbench --dfqbench-in-sweeps]
        [--resume] [--schedule-override epochs=1 iters_per_epoch=2]   # the last: a smoke check

Both official scripts run in one child process per seed, as __main__, with the code's own arguments: stage 1
`dfkd.py --batch_size B --n_epochs E --seed S` (its lr_G 5e-3, lr_S 0.1, latent 1000, p_is 40, p_bn 0.1, p_adv 5,
x0.1 at 40 % / 80 % of the epochs), stage 2 `dfqf.py --batch_size B --s_epochs E --q_wbit W --q_abit A --seed S`
(its s_lr 1e-3 unless --lr-s, q_clip ft, q_lb 0.5). B, E and the iterations per epoch I are the schedule's (cpu:
64, 10, 60), as dfqbench's DFQF runs each stage. The code's own quantizer (utils/collect.py, utils/quant_linear.py)
quantizes: per-tensor symmetric weights, the first conv and the classifier at 8 bit, unsigned activations after
every ReLU, learned clips; dfqbench's side is quant=dfqf, its preset of the same setting.
Run-time changes, each listed in the record's "patches":
  D1 dfkd.py text: `for i in range(120):` -> range(I) (the iterations per epoch are a constant in the code);
  D2 dfkd.py text: the stage-1 generator is saved after every epoch, so stage 2 loads the FINAL one (the code keeps
     the epoch whose FP student scored best on the TEST set; dfqbench reports final models; the per-epoch FP
     student accuracies are kept in the record);
  D3 utils/misc.py text: the terminal width from `stty size` (fails without a terminal at import) -> 80 columns;
  D4 models.get_model -> the dfqbench teacher's architecture: the teacher loads the dfqbench checkpoint (written as
     the code's ./checkpoint/<t_model>_<dataset>.pth in the run's scratch folder); stage 1's FP student is the same
     architecture re-initialized, then the code's own models.resnet_cifar._weights_init (kaiming_normal_ on every
     conv and linear weight, as the code's resnet20 is built);
  D5 utils.dataset.get_dataset -> the dfqbench test set (the teacher's normalization) and, for stage 2's training
     loop (`for i, (imgs, _) in enumerate(trainloader)`, images unused without --m_real), a stand-in of I items;
  D6 without a GPU: .cuda() -> cpu, torch.cuda.device_count() -> 1 and torch.cuda.set_device -> a no-op (dfkd.py
     checks its --gpus against the count; nn.DataParallel runs the module itself without CUDA);
  D7 modules imported and not used on this path (tensorboardX without --logger, seaborn, scipy for q_clip=kl/aciq
     only) -> stand-ins, when not installed.
The record's `top1` is the code's own test() of the final stage-2 student (the code prints the best epoch as
"DFQF best": kept as `best_epoch_top1`, not used); `dfqbench_eval_top1` is dfqbench's evaluate() of that student.

Writes results/parity/dfqf/[<tag>/]w<W>a<A>-<schedule>/: official-s<S>.json and .log.txt per seed, official.json;
with --dfqbench the dfqbench records, dfqbench.json and the results/parity.csv row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import third_party as tp  # noqa: E402

SPEC = tp.DriverSpec(
    method="dfqf", repo="BowenLi94/DFQF", marker="dfqf.py", expected_commit="b8ba6acc07f7fa6644d17ec43ab04672d9288219",
    code_files=("dfkd.py", "dfqf.py", "utils/collect.py", "utils/quant_linear.py", "utils/clip.py",
                "models/generator.py"),
    what="the official code of the paper (its own quantizer and both stages)", default_lr_s=1e-3)

STAGE1 = (
    tp.TextRewrite("D1", "for i in range(120):", "for i in range({iters}):",
                   why="the iterations per epoch: the schedule's"),
    tp.TextRewrite("D2", "if S_acc > accr_best:", "if True or S_acc > accr_best:",
                   why="save the generator after every epoch: stage 2 loads the final one, not the best-on-TEST one"),
)
MISC = (tp.TextRewrite("D3", "_, term_width = os.popen('stty size', 'r').read().split()",
                       "_, term_width = '24 80'.split()",
                       why="`stty size` fails without a terminal; the width only lays out a progress bar"),)
EPOCH_LINE = re.compile(r"Test Loss: [-\d.naninf]+ \| Acc: ([\d.]+)")
STAGE1_LINE = re.compile(r"^Test Avg\. Loss: [-\d.naninf]+, Accuracy: ([\d.]+)", re.M)


class _Tee(io.TextIOBase):
    """stdout for the official scripts: written through to the log and kept (their per-epoch test lines)."""

    def __init__(self, out):
        self.out, self.kept = out, io.StringIO()

    def write(self, s):
        self.kept.write(s)
        return self.out.write(s)

    def flush(self):
        self.out.flush()


class _Steps:
    """Stage 2's `trainloader` stand-in: I (images, labels) items, never read by the code without --m_real."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch
        return iter([(torch.empty(0), torch.empty(0))] * self.n)


def _install_stubs(patches: list[str]) -> None:
    import importlib
    tp.stub_tensorboardx(patches)
    for name, why in (("seaborn", "utils/quant_linear.py imports it and never calls it"),
                      ("scipy", "utils/clip.py: curve_fit and stats, for q_clip=kl/aciq only (this run: ft)")):
        try:
            importlib.import_module(name)
        except ImportError:
            tp.stub_module(name, patches, why)
            if name == "scipy":
                tp.stub_module("scipy.optimize", patches, why, curve_fit=None)
                tp.stub_module("scipy.stats", patches, why)
                sys.modules["scipy"].stats = sys.modules["scipy.stats"]


def child(a) -> None:
    import torch

    from dfqbench.evaluate import evaluate
    setup = tp.child_setup(a, SPEC.method)
    cuda, device, cfg, sched = setup.cuda, setup.device, setup.cfg, setup.sched
    convention, loaded, data = setup.convention, setup.loaded, setup.data
    clone = Path(a.official).resolve()
    scratch = Path(a.scratch)
    (scratch / "checkpoint").mkdir(parents=True, exist_ok=True)
    E, I, B = int(sched["epochs"]), int(sched["iters_per_epoch"]), int(sched["batch_size"])
    lr_s = SPEC.default_lr_s if a.lr_s is None else a.lr_s
    patches: list[str] = []

    _install_stubs(patches)
    tp.purge_modules(("utils", "models"))
    sys.path.insert(0, str(clone))
    import utils
    misc, notes, _ = tp.load_module(clone / "utils" / "misc.py", "utils.misc", MISC)
    utils.misc = misc
    patches += notes
    import models
    import models.resnet_cifar as code_resnet
    import utils.dataset as code_dataset

    t_model = "resnet20"  # the code's default --t_model / --s_model names; the architecture is dfqbench's
    torch.save(loaded.model.state_dict(), scratch / "checkpoint" / f"{t_model}_cifar10.pth")
    built = []

    def get_model(name, args):
        if int(args.num_classes) != int(cfg.dataset.num_classes):
            raise SystemExit(f"the code asks for {args.num_classes} classes; the teacher has "
                             f"{cfg.dataset.num_classes}")
        net = copy.deepcopy(loaded.model)
        for m in net.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        net.apply(code_resnet._weights_init)
        built.append(name)
        return net.train()

    models.get_model = get_model
    patches.append(f"D4 models.get_model -> {cfg.model.name}'s architecture, re-initialized with the code's "
                   f"_weights_init; the teacher loads the dfqbench checkpoint (sha256 {loaded.sha256[:16]}) from "
                   f"./checkpoint/{t_model}_cifar10.pth")
    tests = tp.TimedLoader(data, 200, device)

    def get_dataset(args):
        args.channels, args.img_size, args.num_classes = 3, int(cfg.dataset.image_size), int(cfg.dataset.num_classes)
        return _Steps(I), tests

    code_dataset.get_dataset = get_dataset
    patches.append(f"D5 utils.dataset.get_dataset -> the dfqbench {cfg.dataset.name} test set ({data.num_samples} "
                   f"images) and a stand-in train loader of {I} items (stage 2's iterations per epoch)")
    if not cuda:
        common.cpu_only_cuda_calls(device)
        torch.cuda.device_count = lambda: 1
        torch.cuda.set_device = lambda *args, **kwargs: None
        patches.append("D6 .cuda() -> cpu; torch.cuda.device_count() -> 1, torch.cuda.set_device -> no-op")

    os.chdir(scratch)
    argv1 = ["--dataset", "cifar10", "--batch_size", str(B), "--n_epochs", str(E), "--seed", str(a.seed),
             "--t_model", t_model, "--s_model", t_model]
    argv2 = ["--dataset", "cifar10", "--batch_size", str(B), "--s_epochs", str(E), "--q_wbit", str(a.wbit),
             "--q_abit", str(a.abit), "--s_lr", repr(lr_s), "--seed", str(a.seed), "--t_model", t_model]
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        t0 = time.perf_counter()
        g1, notes, _ = tp.run_script(clone / "dfkd.py", argv1, STAGE1, {"iters": I})
        stage1_s = time.perf_counter() - t0
        patches += notes
        stage1_tests = tests.seconds
        fp_student = [float(v) for v in STAGE1_LINE.findall(tee.kept.getvalue())]
        mark = len(tee.kept.getvalue())
        t0 = time.perf_counter()
        g2, _, _ = tp.run_script(clone / "dfqf.py", argv2)
        stage2_s = time.perf_counter() - t0
    stage2_text = tee.kept.getvalue()[mark:]
    epochs = [float(v) for v in EPOCH_LINE.findall(stage2_text)]
    best = re.findall(r"DFQF best= ([\d.]+)", stage2_text)
    if len(epochs) != E or len(fp_student) != E or not best:
        raise SystemExit(f"the official run did not finish: {len(fp_student)} stage-1 and {len(epochs)} stage-2 "
                         f"epochs of {E} tested")
    student = g2["student"]
    top1 = 100.0 * g2["test"](student, tests)[0]  # the code's own test of the final student
    ours = evaluate(student, data, int(cfg.eval.batch_size), device)
    test_s = tests.seconds
    train_s = stage1_s + stage2_s - test_s
    result = tp.common_result(a, SPEC, cfg, sched, loaded, data, convention, device, patches)
    result.update({
        "top1": round(top1, 4), "epoch_top1": [round(100.0 * v, 4) for v in epochs],
        "best_epoch_top1": round(100.0 * float(best[-1]), 4),
        "stage1_fp_student_epoch_top1": [round(100.0 * v, 4) for v in fp_student],
        "dfqbench_eval_top1": round(ours["top1"], 4), "train_s": round(train_s, 3),
        "stage1_s": round(stage1_s - stage1_tests, 3), "stage2_s": round(stage2_s - (test_s - stage1_tests), 3),
        "test_s": round(test_s, 3), "wall_s": round(stage1_s + stage2_s, 3),
        "s_per_iteration": round(train_s / (2 * E * I), 3), "argv_stage1": argv1, "argv_stage2": argv2,
        "seed": a.seed, "models_built": built,
        "student": {"type": type(student).__name__,
                    "clips": sum(1 for n, _ in student.named_parameters() if n.endswith(("clip_a", "clip_w")))}})
    tp.hand_back(SPEC.method, result)


def describe_official(sched: dict, runs: list) -> str:
    r = runs[0]
    best = common.fmt(common.mean_std([x["best_epoch_top1"] for x in runs])[0])
    return (f"official side: dfkd.py then dfqf.py (the code's own quantizer), --batch_size {sched['batch_size']}, "
            f"{sched['epochs']} epochs x {sched['iters_per_epoch']} iterations in each stage, s_lr {r['lr_s']:g}, "
            f"the final stage-1 generator (the code keeps the best-on-TEST one) and the final stage-2 student "
            f"(the code's 'DFQF best' over epochs: {best} on average)")


def parent(a) -> None:
    """The official seeds in child processes, then with --dfqbench the dfqbench seeds and the parity.csv row."""
    repo, commit = common.clone_identity(Path(a.official), SPEC.repo, SPEC.marker)
    cfg = tp.method_config(tp.method_overrides_list(a, SPEC.method))
    sched = tp.effective_schedule(cfg)
    cell, tag = tp.cell_of(a, SPEC)
    env = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    official_seeds = a.seeds if a.official_seeds is None else a.official_seeds
    dfqbench_seeds = a.seeds if a.dfqbench_seeds is None else a.dfqbench_seeds
    knob = ["--lr-s", repr(a.lr_s)] if a.lr_s is not None else []
    runs = tp.run_official_seeds(
        a, cell, SPEC.method, official_seeds, tp.expected_settings(a, SPEC, commit, sched), Path(__file__).resolve(),
        lambda a, seed, scratch: tp.child_args(a, seed, scratch, knob), env, repo, commit,
        lambda r: f"final-epoch top-1 {r['top1']:.2f} (dfqbench's evaluation of the same student "
                  f"{r['dfqbench_eval_top1']:.2f}; the code's best epoch {r['best_epoch_top1']:.2f}), train "
                  f"{r['train_s']:.0f} s (stage 1 {r['stage1_s']:.0f} s)")
    top1 = common.mean_std([r["top1"] for r in runs])
    secs = common.mean_std([r["train_s"] for r in runs])
    common.write_json(cell / "official.json", {
        "method": SPEC.method, "tag": tag, "official_repo": repo, "official_commit": commit, "wbit": a.wbit,
        "abit": a.abit, "seeds": official_seeds, "schedule_name": a.schedule, "schedule": sched,
        "top1_mean": round(top1[0], 4), "top1_std": round(top1[1], 4), "top1_is": "final epoch",
        "train_s_mean": round(secs[0], 3), "runs": runs, "model": runs[0]["model"], "dataset": runs[0]["dataset"],
        "n_test": runs[0]["n_test"], "device": runs[0]["device"], "teacher_overrides": common.teacher_overrides(a),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    print(f"official dfqf W{a.wbit}A{a.abit} [{a.schedule}]: final-epoch top-1 {top1[0]:.2f} +- {top1[1]:.2f} "
          f"over seeds {official_seeds}, train {secs[0]:.0f} s ({repo}@{commit[:10]})", flush=True)
    if not a.dfqbench:
        return
    ours, d_top1, _ = tp.dfqbench_cell(a, cell, SPEC.method, sched, dfqbench_seeds)
    # both stages, as the official seconds; a run whose stage 1 came from dfqbench's cache has no stage-1 time
    both = [r["info"]["stage1"]["train_time_s"] + r["info"]["training"]["train_time_s"] for r in ours
            if "train_time_s" in (r["info"].get("stage1") or {})]
    d_secs = common.mean_std(both)
    common.upsert_parity_row({
        "method": "-".join(filter(None, (SPEC.method, tag))), "quant": a.quant, "schedule": a.schedule,
        "wbit": a.wbit, "abit": a.abit, "n_seeds": min(len(runs), len(ours)),
        "official_top1_mean": common.fmt(top1[0]), "official_top1_std": common.fmt(top1[1]),
        "dfqbench_top1_mean": common.fmt(d_top1[0]), "dfqbench_top1_std": common.fmt(d_top1[1]),
        "official_s": common.fmt(secs[0], 0), "dfqbench_s": common.fmt(d_secs[0], 0), "official_repo": repo,
        "official_commit": commit,
        "note": f"{describe_official(sched, runs)}; dfqbench quant={a.quant}; seconds = both stages' training on "
                f"each side; official seeds "
                f"{' '.join(map(str, official_seeds))} (the code's --seed), dfqbench seeds "
                f"{' '.join(map(str, dfqbench_seeds))}; {runs[0]['n_test']} test images; records {common.rel(cell)}",
        "model": runs[0]["model"], "dataset": runs[0]["dataset"], "device": runs[0]["device"]}, Path(a.csv))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tp.add_arguments(p, SPEC)
    p.set_defaults(quant="dfqf")
    a = p.parse_args(argv)
    if a.child:
        child(a)
    else:
        parent(a)


if __name__ == "__main__":
    main()
