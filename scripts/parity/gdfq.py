"""Parity driver for GDFQ (and, through gdfq_family.FAMILY, the forks of its code): the official trainer on a
dfqbench teacher and test set at a dfqbench schedule's budget, beside `python -m dfqbench method=gdfq quant=gdfq
schedule=<schedule>` on the same cell.

    python scripts/parity/gdfq.py --official /path/to/GDFQ-clone [--schedule cpu] [--seeds 0 1 2] [--dfqbench]

The official side runs the clone's own main() (`--conf_path <hocon> --id S`; main() sets manualSeed = S + 1) in a
child process per seed, and changes at run time only:
  - the hocon: the clone's cifar100_resnet20.hocon (its only CIFAR file) with the schedule's budget appended:
    nEpochs, batchSize, warmup_epochs (epochs without a student step), step_S = step_G = the milestones,
    qw/qa, nClasses = the teacher's, nThreads = 0, save_path = a scratch folder; lr_S 1e-4, lr_G 1e-3, betas,
    temperature, alpha, momentum, weight decay stay the clone's. dataset stays "cifar100": it selects the code's
    CIFAR branches (the 32x32 generator, a test after every epoch); Option.paramscheck then sets nClasses = 100
    from that name, and the patched paramscheck puts back the teacher's class count;
  - source rewrites (gdfq_family.SourceRewrite, each found exactly once): Trainer.train's `iters = 200` -> the
    schedule's iters_per_epoch, ExperimentDesign.run's `if epoch < 4:` (activation-range calibration) -> the
    schedule's calib_epochs, and without a GPU the GPU-id assert of _set_gpu;
  - pytorchcv get_model('resnet20_cifar100', pretrained=True) -> the clone's own pytorchcv architecture of the
    dfqbench teacher (its resnet_cifar has the `out_feature` argument the trainer calls), built as pretrained=True
    builds it (same random-init draws), with the dfqbench checkpoint's state_dict (strict);
  - DataLoader -> the dfqbench test set (batch 200 as the clone's CIFAR test loader, the teacher's normalization);
  - without a GPU, .cuda() stays on the CPU and utils.data_parallel returns the model itself;
  - the torch RNG is reset to its start-up state before main() (dfqbench's teacher loading drew from it): main()
    builds the generator before it seeds anything, as in a fresh process.
The forks (--method, gdfq_family.FAMILY) add what their sources need, each listed in the record's patches:
  - ait (GDFQ_AIT/): run_cifar10_4bit.sh's flags; --threshold_decay_ep (gradient inundation's threshold x0.1, a
    type=int option whose list default is the paper's lr milestones) -> the schedule's milestones;
  - qimera_ait (Qimera_AIT/ of the same clone): its run_cifar10_4bit.sh's flags, the same --threshold_decay_ep
    rewrite and qimera's logged-statistic one;
  - arc_ait (AutoReCon_AIT/ of the same clone: GDFQ_AIT's trainer with the searched generator of
    generator_architecture.py): its run_cifar10_4bit.sh's flags and the same --threshold_decay_ep rewrite;
  - intraq, hast: stage 1 first, in the same child: data_generate/generate_data.py as __main__ once per group
    (run_generate_cifar10.sh's flags) on the same teacher, at the schedule's fixed_set_images (groups of up to 5
    batches of 256) and fixed_set_iterations (Adam steps per batch); torch/random/numpy seeded with S + 1 first
    (the code seeds nothing). Stage 2 (main_direct.py) reads those pickles (IntraQ: its "Path_to_data_pickle"
    placeholders; HAST: the hocon's generateDataPath/generateLabelPath) and the trainer's own `epoch < 4` /
    `epoch == 4` (warm-up generator, EMA calibration, no student step; HAST's feature-alignment hooks) follow
    calib_epochs (the hocon's warmup_epochs is not read by these codes). Neither runs a teacher test:
    fp32_top1 is null;
  - hast: main() is a torch.distributed one (no --id: manualSeed = S + 1 by a rewrite of its hard-coded 1), run as
    `torch.distributed.launch --nproc_per_node 1` would (env://, one process, --local_rank 0); without a GPU the
    gloo backend, .to(local_rank) -> the CPU and DistributedDataParallel (which refuses SyncBatchNorm on the CPU)
    -> a one-process stand-in. Its console output goes to train_test.log only;
  - adasg (AdaSG_code/CIFAR), adadfq (AdaDFQ/CIFAR): hfutqian's GDFQ forks, with cifar10_resnet20.hocon (batch 16 in
    the code; the schedule's batch appended as for GDFQ) and dataset "cifar100" (their main.py knows no other CIFAR
    name). Breakages of the shipped code mended at run time: main.py's ImageNet branch does not compile (an `if`
    without a body: `pass`), options.py does not read the hocon's `network` (nor AdaDFQ's alpha_ds, alpha_as,
    lambda_l, lambda_u, beta, gamma: read as shipped), marginal_loss's zero vector is hard-coded to batch 16 (->
    the batch's size; at 16 the same).
Every epoch's test result is read as Trainer.test returns it (the line the code prints or logs); the record's
`top1` is the FINAL epoch's (what dfqbench reports), `official_best_top1` the code's own "Best Result" (best
epoch on the test set), labelled.
The official code needs pyhocon and termcolor (requirements.txt; pip install --target DIR pyhocon termcolor and
--deps DIR, default /tmp/parity-deps when it exists).

Writes results/parity/<method>/[<tag>/]w<W>a<A>-<schedule>/official.json, one log per seed (driver output and the
code's own train_test.log), and with --dfqbench the dfqbench runs and the results/parity.csv row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gdfq_family  # noqa: E402

DEFAULT_DEPS = Path("/tmp/parity-deps")


def schedule_of(name: str, extra: list[str]) -> dict:
    from omegaconf import OmegaConf
    cfg = common.compose([f"schedule={name}", *[f"schedule.{o}" for o in extra]])
    return OmegaConf.to_container(cfg.schedule, resolve=True)


# --- child: one official run ---------------------------------------------------------------------------------------

CLONE_MODULES = ("pytorchcv", "utils", "options", "dataloader", "trainer", "trainer_direct", "quantization_utils",
                 "conditional_batchnorm", "optimizer", "distill_data", "generate_data", "main", "main_direct")


def synthesize(a, entry, root: Path, sched: dict, arch: str, patch_get_model, patches: list) -> dict:
    """Stage 1 of the fixed-set codes (entry.synth): the clone's generate_data.py as __main__, once per group, in
    this process; returns the values stage 2's rewrites and hocon keys need (where the pickles are, how many)."""
    import random
    import runpy

    import numpy as np
    import torch
    syn = entry.synth
    images, steps = int(sched["fixed_set_images"]), int(sched["fixed_set_iterations"])
    batch, per_group, groups = gdfq_family.synth_layout(images, syn.batch, syn.per_group)
    out = Path(a.scratch) / "synth"
    out.mkdir(parents=True, exist_ok=True)
    script = root / syn.script
    gdfq_family.purge_modules(CLONE_MODULES)
    added = [str(script.parent), str(root)]  # its own utils/ first (IntraQ's), then the clone's pytorchcv if any
    sys.path[:0] = added
    import pytorchcv.model_provider as provider
    patch_get_model(provider)
    __import__(syn.module)
    patches += [f"stage 1: {p}" for p in gdfq_family.apply_source_rewrites(
        syn.rewrites, {"synth_batches": per_group, "fixed_set_iterations": steps}, cpu=False)]
    seed = a.seed + 1
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    patches.append(f"stage 1: torch, random and numpy seeded with {seed} (the driver's seed + 1) before it; the "
                   f"code seeds nothing (torch at its start-up state, Python's random from the OS)")
    fill = {"model": arch, "batch": batch, "out": str(out)}
    argvs, t0, cwd = [], time.perf_counter(), os.getcwd()
    os.chdir(script.parent)
    try:
        for group in range(1, groups + 1):
            argv = [x.format(group=group, **fill) for x in syn.argv]
            argvs.append(argv)
            sys.argv = [script.name, *argv]
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:  # getDistilData ends with sys.exit() after writing the group's pickles
                if e.code not in (None, 0):
                    raise
    finally:
        os.chdir(cwd)
    synth_s = time.perf_counter() - t0
    for path in added:
        sys.path.remove(path)
    gdfq_family.purge_modules(CLONE_MODULES)

    def head(images: bool) -> str:  # <head>1.pickle: the images ("..refined_gaussian..") or the labels
        found = [f for f in sorted(out.glob("*1.pickle")) if ("refined_gaussian" in f.name) == images]
        if len(found) != 1:
            raise SystemExit(f"stage 1 wrote {[f.name for f in out.iterdir()]}: expected one group-1 "
                             f"{'image' if images else 'label'} pickle")
        return str(found[0])[:-len("1.pickle")]

    values = {"data_head": head(True), "label_head": head(False), "groups": groups}
    patches.append(f"stage 1: {syn.script} {' | '.join(' '.join(x) for x in argvs)} ({groups} group(s) of "
                   f"{per_group} batch(es) of {batch} = fixed_set_images {images}, {steps} steps each; the code: 4 "
                   f"groups of 5 x 256, 1,000 steps), {synth_s:.1f} s")
    return {**values, "synth_s": round(synth_s, 3), "synth_images": images, "synth_steps": steps}


def child(a) -> None:
    entry = gdfq_family.FAMILY[a.method]
    clone = Path(a.official).resolve()
    root = clone / entry.subdir if entry.subdir else clone
    import torch
    startup_seed = torch.initial_seed()  # a fresh process's (main() seeds only later)
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available() and not a.cpu
    device = torch.device("cuda" if cuda else "cpu")
    cfg, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    sched = json.loads(a.schedule_json)
    teacher_state = {k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()}
    num_classes = int(cfg.model.num_classes)
    arch = str(cfg.model.arch)
    patches: list[str] = []
    asked = []

    def patch_get_model(provider) -> None:
        """pytorchcv get_model -> the imported pytorchcv's architecture with the dfqbench teacher's weights."""
        clone_get_model = provider.get_model

        def get_model(name, pretrained=True, **kwargs):
            asked.append(name)
            net = clone_get_model(arch, pretrained=False, **kwargs)  # the same init draws as pretrained=True
            net.load_state_dict(teacher_state, strict=True)
            return net

        provider.get_model = get_model
        where = "the clone's" if Path(provider.__file__).resolve().is_relative_to(clone) else "the installed"
        note = (f"pytorchcv get_model(<name>, pretrained=True) -> {where} pytorchcv {arch} with the dfqbench "
                f"teacher's state_dict ({loaded.checkpoint or loaded.weights}, sha256 {loaded.sha256[:16]}), strict")
        if note not in patches:
            patches.append(note)

    if not cuda:
        common.cpu_only_cuda_calls(device)
        patches.append(".cuda() -> cpu")
    values = {"iters_per_epoch": int(sched["iters_per_epoch"]), "calib_epochs": int(sched["calib_epochs"]),
              "milestones": list(sched["milestones"]), "manual_seed": a.seed + 1, "root": str(root), "model": arch,
              "warmup_batch": a.warmup_batch}
    synth = synthesize(a, entry, root, sched, arch, patch_get_model, patches) if entry.synth else {}
    values.update({k: synth[k] for k in ("data_head", "label_head", "groups") if k in synth})

    # the clone's own modules (its pytorchcv, utils, trainer) take precedence over the venv's
    gdfq_family.purge_modules(CLONE_MODULES)
    sys.path.insert(0, str(root))

    import pytorchcv.model_provider as provider
    patch_get_model(provider)
    for module, name, source in entry.aliases:
        note = gdfq_family.add_alias(module, name, source)
        patches += [note] if note else []
    for name in entry.stubs:
        patches.append(gdfq_family.stub_module(name))

    import dataloader
    import options
    import utils

    class DataLoader:
        def __init__(self, *args, **kwargs):
            self.test = common.EvalLoader(data, 200, device)

        def getloader(self):
            return None, self.test

    dataloader.DataLoader = DataLoader
    patches.append(f"dataloader.DataLoader -> (None, the dfqbench {cfg.dataset.name} test set, "
                   f"{data.num_samples} images, batch 200)")

    paramscheck = options.Option.paramscheck

    def paramscheck_keep_classes(self, logger):
        paramscheck(self, logger)
        self.nClasses = num_classes

    options.Option.paramscheck = paramscheck_keep_classes
    patches.append(f"Option.paramscheck: nClasses back to the teacher's {num_classes} (the code sets it from the "
                   f"dataset name, {entry.dataset!r})")
    if not cuda:
        utils.data_parallel = lambda model, ngpus, gpu0=0: model.to(device)
        patches.append("utils.data_parallel -> the model itself")

    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    conf = scratch / "parity.hocon"
    appended = {
        "save_path": str(scratch / "save") + "/", "dataPath": "", "dataset": entry.dataset,
        "nThreads": 0, "nEpochs": int(sched["epochs"]), "batchSize": int(sched["batch_size"]),
        "warmup_epochs": int(sched["warmup_epochs"]), "step_S": list(sched["milestones"]),
        "step_G": list(sched["milestones"]), "qw": a.wbit, "qa": a.abit, "nClasses": num_classes,
        "experimentID": f"parity_{a.method}_w{a.wbit}a{a.abit}_",
    }
    appended.update({k: v.format(**values) for k, v in entry.hocon_extra})
    block = gdfq_family.write_hocon(root / entry.conf, conf, appended)
    patches.append(f"hocon: {entry.conf} with {json.dumps(appended, sort_keys=True)} appended")

    main_mod = gdfq_family.import_file(root / entry.main, Path(entry.main).stem, entry.script_rewrites, patches)
    trainer_mod = sys.modules[entry.trainer]
    if entry.distributed and not cuda:
        main_mod.DDP = gdfq_family.one_process_ddp()
        patches.append(f"{Path(entry.main).stem}.DDP (DistributedDataParallel, which refuses SyncBatchNorm layers "
                       f"on the CPU) -> a one-process stand-in: .module and forward() as DDP's (with one process "
                       f"DDP's gradient all-reduce and start-up broadcast change nothing; broadcast_buffers=False)")
    # one call: a function is recompiled once from the clone's text with all of its rewrites
    patches += gdfq_family.apply_source_rewrites(
        entry.rewrites + (entry.warmup_batch_rewrites if a.warmup_batch else ()), values, cpu=not cuda)

    # observe (not change): every epoch's test error and training seconds, the teacher's test error
    Trainer = trainer_mod.Trainer
    tests, teacher_tests, train_s = [], [], []
    test, test_teacher, train = Trainer.test, Trainer.test_teacher, Trainer.train

    def observed_test(self, epoch):
        out = test(self, epoch)
        tests.append((epoch, float(out[0]), float(out[2])))
        return out

    def observed_test_teacher(self, epoch):
        out = test_teacher(self, epoch)
        teacher_tests.append(float(out[0]))
        return out

    def observed_train(self, epoch, *args, **kwargs):  # IntraQ/HAST: also direct_dataload=
        t = time.perf_counter()
        out = train(self, epoch, *args, **kwargs)
        train_s.append(time.perf_counter() - t)
        return out

    Trainer.test, Trainer.test_teacher, Trainer.train = observed_test, observed_test_teacher, observed_train
    errors = []
    logger_error = main_mod.logging.Logger.error

    def record_error(self, msg, *args, **kwargs):  # run() catches every exception and only logs it
        errors.append(str(msg))
        return logger_error(self, msg, *args, **kwargs)

    main_mod.logging.Logger.error = record_error

    torch.manual_seed(startup_seed)  # the RNG as a fresh process has it (main() seeds only later)
    patches.append("torch RNG reset to its start-up state before main() (the driver's teacher loading"
                   + (" and stage 1" if entry.synth else "") + " drew from it)")
    if entry.distributed:  # what `python -m torch.distributed.launch --nproc_per_node 1` sets
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                    "LOCAL_RANK": "0"}
        os.environ.update(dist_env)
        patches.append(f"environment of a one-process torch.distributed launch: {dist_env}")
    argv = ["--conf_path", str(conf), *(["--id", str(a.seed)] if entry.id_argv else []), *entry.extra_argv]
    sys.argv = [entry.main, *argv]
    os.chdir(scratch)
    t0 = time.perf_counter()
    main_mod.main()
    wall = time.perf_counter() - t0
    if errors or len(tests) != int(sched["epochs"]):
        raise SystemExit(f"the official run did not finish: {len(tests)} of {sched['epochs']} epochs tested; "
                         f"errors: {errors}")
    logs = sorted(scratch.glob("**/train_test.log"))
    final = tests[-1]
    best = min(tests, key=lambda t: t[1])
    result = {
        "top1": round(100.0 - final[1], 4), "top5": round(100.0 - final[2], 4),
        "official_best_top1": round(100.0 - best[1], 4), "official_best_epoch": best[0] + 1,
        "epoch_top1": [round(100.0 - t[1], 4) for t in tests],
        "fp32_top1": round(100.0 - teacher_tests[0], 4) if teacher_tests else None,  # IntraQ/HAST: no teacher test
        "train_s": round(sum(train_s), 3), "epoch_train_s": [round(t, 3) for t in train_s],
        "wall_s": round(wall, 3), "argv": argv, "manual_seed": a.seed + 1, **synth,
        "patches": patches, "hocon_appended": block, "teacher_names_asked": asked, "device": device.type,
        "threads": torch.get_num_threads(), "official_log": str(logs[-1]) if logs else None,
        "n_test": data.num_samples, "model": cfg.model.name, "dataset": str(cfg.dataset.name), "schedule": sched,
    }
    print(json.dumps(result))


# --- child: the official quantizers beside dfqbench's (no training) -----------------------------------------------

def check_quantizers(a) -> None:
    """The clone's quantization_utils on the teacher and on synthetic tensors beside dfqbench's quant=<preset>:
    weights (per channel, every conv/linear), an activation quantizer's forward and backward at a range that
    clips, and the EMA range calibration over a stream of batches."""
    entry = gdfq_family.FAMILY[a.method]
    clone = Path(a.official).resolve()
    root = clone / entry.subdir if entry.subdir else clone
    import torch
    from omegaconf import OmegaConf
    from torch import nn

    from dfqbench.quant import ActQuantizer, Convention, quant_layers, quantize_model
    from dfqbench.train.ema import EMARangeObserver
    torch.set_num_threads(a.threads)
    cfg, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    quant_cfg = common.compose([*common.teacher_overrides(a), f"quant={a.quant}"]).quant
    conv = Convention.from_dict(OmegaConf.to_container(quant_cfg, resolve=True))
    gdfq_family.purge_modules(("quantization_utils",))
    sys.path.insert(0, str(root))
    from quantization_utils.quant_modules import AsymmetricQuantFunction, QuantAct
    out: dict = {"quant": a.quant, "act_ste": conv.act.ste, "wbit": a.wbit, "abit": a.abit}

    # 1. weights: the official per-row min/max grid (Quant_Conv2d / Quant_Linear.forward) vs dfqbench's
    teacher = loaded.model.eval()
    student = quantize_model(__import__("copy").deepcopy(teacher), conv, a.wbit, a.abit)
    layers, total, differ, worst = quant_layers(student), 0, 0, 0.0
    for layer in layers:
        w = layer.weight.detach()
        flat = w.reshape(w.shape[0], -1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        theirs = AsymmetricQuantFunction.apply(w, a.wbit, lo, hi)
        step = ((hi - lo) / (2 ** a.wbit - 1)).reshape(-1, *[1] * (w.dim() - 1))
        diff = ((theirs - layer.quantized_weight().detach()).abs() / step)
        differ += int((diff > 0.5).sum())
        total += w.numel()
        worst = max(worst, float(diff.max()))
    same_sign = sum(int(((l.weight.reshape(l.weight.shape[0], -1).min(1).values > 0)
                         | (l.weight.reshape(l.weight.shape[0], -1).max(1).values < 0)).sum()) for l in layers)
    out["weights"] = {"layers": len(layers), "weights": total, "weights_differing": differ,
                      "max_diff_in_steps": round(worst, 6), "channels_without_zero_in_range": same_sign}

    # 2. one activation quantizer at a range that clips: forward and backward (straight-through estimator)
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(64, 16, 8, 8, generator=g) * 2.0)
    hi = float(x.max()) * 0.6
    theirs = QuantAct(activation_bit=a.abit)
    theirs.x_min.fill_(0.0)
    theirs.x_max.fill_(hi)
    theirs.fix()
    ours = ActQuantizer(a.abit, symmetric=conv.act.symmetric, estimator=conv.act.estimator, ste=conv.act.ste)
    ours.set_range(0.0, hi)
    weight = torch.randn(x.shape, generator=g)
    grads = []
    for q in (theirs, ours):
        xi = x.clone().requires_grad_(True)
        y = q(xi)
        (y * weight).sum().backward()
        grads.append((y.detach(), xi.grad.detach()))
    above = x > hi
    out["activation"] = {
        "range": [0.0, round(hi, 6)], "elements": x.numel(), "above_range": int(above.sum()),
        "forward_max_abs_diff": float((grads[0][0] - grads[1][0]).abs().max()),
        "forward_differing": int(((grads[0][0] - grads[1][0]).abs() > 1e-6).sum()),
        "grad_differing": int(((grads[0][1] - grads[1][1]).abs() > 1e-6).sum()),
        "grad_differing_above_range": int((((grads[0][1] - grads[1][1]).abs() > 1e-6) & above).sum()),
        "official_grad_zero_above_range": int((grads[0][1][above] == 0).sum()),
        "dfqbench_grad_zero_above_range": int((grads[1][1][above] == 0).sum())}

    # 3. EMA range calibration (beta 0.9) over a stream of batches with maxima ~1 +- 0.1
    official_q = QuantAct(activation_bit=a.abit)
    holder = nn.Sequential(ActQuantizer(a.abit, estimator="minmax", ste=conv.act.ste))
    observer = EMARangeObserver(holder, 0.9)
    trace, checkpoints = [], {1, 2, 5, 10, 20, 50, 100, 150, 200, 240, 400, 800}
    for t in range(1, 801):
        peak = 1.0 + 0.1 * float(torch.randn((), generator=g))
        batch = torch.rand(8, 4, generator=g) * peak
        batch[0, 0] = peak
        with torch.no_grad():
            official_q(batch)
            holder(batch)
        if t in checkpoints:
            o, d = float(official_q.x_max), float(holder[0].hi)
            trace.append({"t": t, "official_hi": round(o, 6), "dfqbench_hi": round(d, 6),
                          "rel_diff": round(abs(o - d) / abs(d), 9)})
    out["ema"] = {"beta": 0.9, "trace": trace,
                  "note": "official: x_t = (beta x_{t-1} + (1-beta) r_t) / (1 - beta^t) on the stored, already "
                          "corrected x_{t-1}; dfqbench: Adam's m_t / (1 - beta^t)"}
    print(json.dumps(out))


# --- parent ----------------------------------------------------------------------------------------------------------

def _keep_seed(cell: Path, seed: int, r: dict, commit: str, wbit: int, abit: int,
               warmup_batch: int | None = None) -> dict:
    """One official seed's result, with the code's own log copied beside it, kept as official-s<seed>.json."""
    log = r.get("official_log")
    if log and Path(log).is_absolute():
        if Path(log).exists():
            (cell / f"official-s{seed}.train_test.log.txt").write_text(Path(log).read_text())
        r["official_log"] = common.rel(cell / f"official-s{seed}.train_test.log.txt")
    r.update(seed=seed, official_commit=commit, wbit=wbit, abit=abit, warmup_batch=warmup_batch)
    common.write_json(cell / f"official-s{seed}.json", r)
    return r


def _finished_seed(cell: Path, seed: int, commit: str, sched: dict, wbit: int, abit: int,
                   warmup_batch: int | None = None) -> dict | None:
    """A finished official seed (--resume): its official-s<seed>.json, or the result line that ends its driver log
    (a driver stopped after that seed); None if there is none for this commit, schedule and bit-widths."""
    path = cell / f"official-s{seed}.json"
    if path.exists():
        r = json.loads(path.read_text())
    else:
        log = cell / f"official-s{seed}.log.txt"
        try:
            r = json.loads(log.read_text().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            return None
        command = log.read_text().splitlines()[0] + " "
        if f"--seed {seed} " not in command:
            return None
        ran_with = re.search(r"--warmup-batch (\d+) ", command)
        r = _keep_seed(cell, seed, r, commit, wbit, abit, int(ran_with.group(1)) if ran_with else None)
    ok = (r.get("official_commit") == commit and r.get("schedule") == sched and r.get("wbit") == wbit
          and r.get("abit") == abit and r.get("warmup_batch") == warmup_batch and "top1" in r)
    return r if ok else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="a clone of the method's repository (gdfq: xushoukai/GDFQ)")
    p.add_argument("--method", default="gdfq", choices=sorted(gdfq_family.FAMILY),
                   help="which entry of gdfq_family.FAMILY: gdfq (xushoukai/GDFQ), qimera, ait (iamkanghyunchoi/ait, "
                        "GDFQ_AIT), qimera_ait (the same clone, Qimera_AIT), arc_ait (the same clone, AutoReCon_AIT), "
                        "intraq (zysxmu/IntraQ), hast (lihuantong/HAST), adasg (hfutqian/AdaSG, AdaSG_code/CIFAR), "
                        "adadfq (hfutqian/AdaDFQ, AdaDFQ/CIFAR); clusterq: clusterq.py")
    p.add_argument("--schedule", default="cpu", help="conf/schedule/<name>.yaml: the budget of both sides")
    p.add_argument("--schedule-override", nargs="*", default=[],
                   help="schedule keys for both sides, e.g. epochs=2 iters_per_epoch=3 (smoke checks)")
    p.add_argument("--wbit", type=int, default=4)
    p.add_argument("--abit", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="official --id S (manualSeed S+1) / dfqbench seed=S (default 0 1 2)")
    p.add_argument("--deps", default=str(DEFAULT_DEPS) if DEFAULT_DEPS.is_dir() else "",
                   help="a folder with the official code's extra packages (pyhocon, termcolor), put on PYTHONPATH")
    p.add_argument("--warmup-batch", type=int, default=None,
                   help="IntraQ/HAST: the generator warm-up's batch on both sides (the code's hard-coded 16 -> N; "
                        "dfqbench method.warmup_batch_size=N): a labelled variant cell, tag warmupB<N>")
    p.add_argument("--check-quantizers", dest="check_only", action="store_true",
                   help="only compare the clone's quantizers with dfqbench's quant=<--quant> (seconds, no training): "
                        "<cell>/quantizer-check.json")
    common.add_cell_arguments(p, "<method>", "dfqbench preset for --dfqbench (default gdfq)",
                              "more dfqbench overrides for --dfqbench",
                              "warm-up batch; or the result line of a finished official-s<S>.log.txt")
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--schedule-json", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        (check_quantizers if a.check else child)(a)
        return
    entry = gdfq_family.FAMILY[a.method]
    if a.warmup_batch is not None and (a.warmup_batch < 1 or not entry.warmup_batch_rewrites):
        with_it = sorted(k for k, e in gdfq_family.FAMILY.items() if e.warmup_batch_rewrites)
        p.error(f"--warmup-batch {a.warmup_batch}: a positive batch, for a method with a generator warm-up "
                f"({', '.join(with_it)}), not {a.method}")
    if a.warmup_batch and not a.tag:
        a.tag = f"warmupB{a.warmup_batch}"
    marker = f"{entry.subdir}/{entry.trainer}.py" if entry.subdir else f"{entry.trainer}.py"
    repo, commit = common.clone_identity(Path(a.official), entry.repo, marker)
    sched = schedule_of(a.schedule, a.schedule_override)
    out = Path(a.out) if a.out else common.REPO / "results" / "parity" / a.method
    out = out / a.tag if a.tag else out
    cell = out / f"w{a.wbit}a{a.abit}-{a.schedule}"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [a.deps, os.environ.get("PYTHONPATH", "")]))}
    env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    if a.check_only:
        args = ["--official", str(Path(a.official).resolve()), "--method", a.method, "--model", a.model,
                "--dataset", a.dataset, "--wbit", str(a.wbit), "--abit", str(a.abit), "--threads", str(a.threads),
                "--quant", a.quant, "--check", *(["--teacher", *a.teacher] if a.teacher else [])]
        r = common.run_child(Path(__file__), args, cell / "quantizer-check.log.txt", env=env)
        r.update(official_repo=repo, official_commit=commit, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        common.write_json(cell / "quantizer-check.json", r)
        print(json.dumps({k: r[k] for k in ("weights", "activation")}, indent=1))
        return
    official_seeds = a.seeds if a.official_seeds is None else a.official_seeds
    dfqbench_seeds = a.seeds if a.dfqbench_seeds is None else a.dfqbench_seeds
    runs = []
    for seed in official_seeds:
        done = _finished_seed(cell, seed, commit, sched, a.wbit, a.abit, a.warmup_batch) if a.resume else None
        if done is not None:
            runs.append(done)
            print(f"official {a.method} seed {seed}: reusing {common.rel(cell / f'official-s{seed}.json')}", flush=True)
            continue
        scratch = Path("/tmp") / f"parity-{a.method}-{os.getpid()}-s{seed}"
        args = ["--official", str(Path(a.official).resolve()), "--method", a.method, "--model", a.model,
                "--dataset", a.dataset, "--seed", str(seed), "--wbit", str(a.wbit), "--abit", str(a.abit),
                "--threads", str(a.threads), "--scratch", str(scratch), "--schedule-json", json.dumps(sched)]
        args += ["--teacher", *a.teacher] if a.teacher else []
        args += ["--max-samples", str(a.max_samples)] if a.max_samples else []
        args += ["--cpu"] if a.cpu else []
        args += ["--warmup-batch", str(a.warmup_batch)] if a.warmup_batch else []
        r = common.run_child(Path(__file__), args, cell / f"official-s{seed}.log.txt", env=env)
        r = _keep_seed(cell, seed, r, commit, a.wbit, a.abit, a.warmup_batch)
        runs.append(r)
        print(f"official {a.method} W{a.wbit}A{a.abit} [{a.schedule}] seed {seed}: final-epoch top-1 {r['top1']:.2f} "
              f"(official best epoch {r['official_best_epoch']}: {r['official_best_top1']:.2f}), "
              f"train {r['train_s']:.0f} s, wall {r['wall_s']:.0f} s", flush=True)
    top1 = common.mean_std([r["top1"] for r in runs])
    best = common.mean_std([r["official_best_top1"] for r in runs])
    secs = common.mean_std([r["train_s"] for r in runs])
    record = {"method": a.method, "official_repo": repo, "official_commit": commit, "wbit": a.wbit, "abit": a.abit,
              "seeds": official_seeds, "schedule_name": a.schedule, "schedule": sched,
              "top1_mean": round(top1[0], 4), "top1_std": round(top1[1], 4), "top1_is": "final epoch",
              "official_best_top1_mean": round(best[0], 4), "official_best_top1_std": round(best[1], 4),
              "official_best_top1_is": "the code's 'Best Result': best epoch on the test set (not comparable)",
              "train_s_mean": round(secs[0], 3), "runs": runs, "model": runs[0]["model"],
              "dataset": runs[0]["dataset"], "n_test": runs[0]["n_test"], "device": runs[0]["device"],
              "teacher_overrides": common.teacher_overrides(a), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    common.write_json(cell / "official.json", record)
    print(f"official {a.method} W{a.wbit}A{a.abit} [{a.schedule}]: final-epoch top-1 {top1[0]:.2f} +- {top1[1]:.2f} "
          f"(official best-epoch {best[0]:.2f} +- {best[1]:.2f}) over seeds {official_seeds}, train {secs[0]:.0f} s "
          f"({repo}@{commit[:10]})", flush=True)
    if not a.dfqbench:
        return
    ours = common.dfqbench_side(
        cell, a.quant, dfqbench_seeds, a.resume, lambda seed: [
            f"method={a.method}", f"quant={a.quant}", f"schedule={a.schedule}", f"wbit={a.wbit}", f"abit={a.abit}",
            f"seed={seed}", f"threads={a.threads}", *[f"schedule.{o}" for o in a.schedule_override],
            *([f"method.warmup_batch_size={a.warmup_batch}"] if a.warmup_batch else []),
            *a.method_overrides, *common.teacher_overrides(a)],
        a.method, allow_diverged=True, in_sweeps=a.dfqbench_in_sweeps)
    finished = [r for r in ours if not common.diverged(r)]
    n_diverged = len(ours) - len(finished)
    d_top1 = common.mean_std([r["top1"] for r in finished]) if finished else (None, None)
    d_secs = common.mean_std([r["quantize_time_s"] for r in finished]) if finished else (None, None)
    diverged_note = (f"; dfqbench: {n_diverged} of {len(ours)} seeds diverged (TrainingDiverged, no top-1: "
                     + ", ".join(common._outcome(r).split(": ", 1)[1] for r in ours if common.diverged(r)) + ")"
                     if n_diverged else "")
    print(f"dfqbench method={a.method} quant={a.quant} schedule={a.schedule} W{a.wbit}A{a.abit}: "
          + "; ".join(filter(None, [f"top-1 {d_top1[0]:.2f} +- {d_top1[1]:.2f}, quantize {d_secs[0]:.0f} s"
                                    if finished else "", diverged_note.removeprefix("; ")])), flush=True)
    common.upsert_parity_row({
        "method": f"{a.method}-{a.tag}" if a.tag else a.method, "quant": a.quant, "schedule": a.schedule,
        "wbit": a.wbit, "abit": a.abit, "n_seeds": min(len(runs), len(ours)),
        "official_top1_mean": common.fmt(top1[0]), "official_top1_std": common.fmt(top1[1]),
        "dfqbench_top1_mean": common.fmt(d_top1[0]), "dfqbench_top1_std": common.fmt(d_top1[1]),
        "official_s": common.fmt(secs[0], 0), "dfqbench_s": common.fmt(d_secs[0], 0), "official_repo": repo,
        "official_commit": commit,
        "note": f"final epoch on both sides (the official code's own best-epoch-on-test number: {best[0]:.2f} +- "
                f"{best[1]:.2f}); schedule {a.schedule} ({sched['epochs']} epochs x {sched['iters_per_epoch']} "
                f"iterations, batch {sched['batch_size']}, warm-up {sched['warmup_epochs']}, calibration "
                f"{sched['calib_epochs']}, milestones {sched['milestones']}); official seeds "
                f"{' '.join(map(str, official_seeds))} (--id S, manualSeed S+1), dfqbench seeds "
                f"{' '.join(map(str, dfqbench_seeds))}; seconds = training; {runs[0]['n_test']} test images; "
                f"records {common.rel(cell)}" + _official_nan_note(cell, official_seeds) + diverged_note
                + (f"; warm-up batch {a.warmup_batch} on both sides (the code's: 16)" if a.warmup_batch else ""),
        "dfqbench_diverged": n_diverged,
        "model": runs[0]["model"], "dataset": runs[0]["dataset"], "device": runs[0]["device"]}, Path(a.csv))


def _official_nan_note(cell: Path, seeds) -> str:
    """How many official seeds' own logs show a NaN training loss (the code goes on training and testing)."""
    logs = [cell / f"official-s{seed}.train_test.log.txt" for seed in seeds]
    nan = [seed for seed, log in zip(seeds, logs) if log.exists() and re.search(r"loss: nan\b", log.read_text())]
    return (f"; official: the training loss is NaN in the logs of seeds {' '.join(map(str, nan))} of "
            f"{len(seeds)}" if nan else "")


if __name__ == "__main__":
    main()
