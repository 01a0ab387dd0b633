"""Parity driver for DSG (post-training): the official code (htqin/DSG, post_training_quantization/) on a dfqbench
teacher and test set, beside `python -m dfqbench method=dsg method.margins=none quant=gdfq` on the same cell.

    python scripts/parity/dsg.py --official /path/to/DSG-clone [--wbit 4 --abit 4] [--seeds 0 1 2] [--dfqbench]

The official side runs the clone's own post_training_quantization/uniform_test.py (`--dataset cifar10 --model
<arch> --batch_size 40 --w_bit W --a_bit A --seed S --test_batch_size 256`; act_q_method ema and onehot 1 are its
defaults) in a child process per seed: getDistilData (one batch of 40 images, 500 Adam steps), quantize_model,
update (one pass: the `ema` range of every QuantAct, quantizing as it goes), freeze_model, test.

The slack margins. distill_data.py loads them every step from `./m_n_perc/m.npy` and `n.npy` (one scalar per BN
layer, "Load percentile from local"), files that are not in the repository (htqin/DSG issue #2) and whose
computation is not published either: the paper takes them as a percentile of real data's deviation from the BN
statistics, i.e. they need real training images. The driver gives **zero margins** (np.load of those two paths
returns zeros, one per BN layer): the official slack alignment becomes ZeroQ's plain alignment, every other term
(layer-wise enhancement, CE on random labels, TV / L2 priors, the SCI term) stays the code's. The dfqbench side
runs the same thing: `method.margins=none` (dfqbench's data-free `gaussian` margins have no official counterpart
to compare with).

Run-time patches, and nothing else:
  - np.load('./m_n_perc/m.npy' | './m_n_perc/n.npy') -> zeros, one per BatchNorm2d of the teacher (above);
  - pytorchcv's get_model returns the dfqbench teacher; uniform_test.py's --model choices do not hold
    preresnet20_cifar10: for another teacher the argument stays resnet20_cifar10 and get_model returns that
    teacher all the same (recorded);
  - utils.getTestData returns the dfqbench test set (same images, normalization and order as a dfqbench run);
  - torch.eig (removed in torch 2.x; compute_sci's eigen-decomposition) -> torch.linalg.eig, returned in
    torch.eig's layout ([n, 2] real / imaginary eigenvalues, real eigenvectors); compute_sci wraps the result in
    Variable(...), which detaches it: the term moves no image, it only enters the loss value the plateau
    scheduler sees;
  - ReduceLROnPlateau(..., verbose=False): torch >= 2.7 has no `verbose` (it only printed): dropped; the driver
    also counts the scheduler's learning-rate cuts (recorded as lr_cuts, final_lr);
  - pytorchcv >= 0.0.70 moved ConvBlock (imported, unused, by utils/quantize_model.py) to
    pytorchcv.models.common.conv: it is put back under pytorchcv.models.common; distill_data.py imports cv2
    (OpenCV), which it never uses: an empty module stands in when it is not installed;
  - without a GPU, .cuda() stays on the CPU (nn.DataParallel then calls the model directly).
The official code needs `progress` and `tensorboardX` (pip install --target DIR progress tensorboardX; the driver
puts /tmp/parity-deps on PYTHONPATH when it exists).
With --compare (default on) the child also quantizes the teacher with dfqbench (quant=gdfq), counts the weights
that differ from the official ones by more than half a step, calibrates it with dfqbench's `ema` range
(dfqbench.methods.dsg.calibrate) on the *official* generated batch, and compares the activation ranges (forward
order) and the top-1: the quantizer side checked apart from the synthesis.

Writes results/parity/dsg/[<tag>/]w<W>a<A>/official.json with one log per seed; with --dfqbench the dfqbench runs
and the results/parity.csv row.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import runpy
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import zeroq  # noqa: E402

DEFAULT_REPO = "htqin/DSG"
OUT = common.REPO / "results" / "parity" / "dsg"
ARCHS = ("resnet18", "resnet50", "inceptionv3", "mobilenetv2_w1", "shufflenet_g1_w1", "resnet20_cifar10",
         "sqnxt23_w2", "bn_vgg16")  # uniform_test.py's --model choices
SAME_CELL = ["method.margins=none"]  # the dfqbench side of the official run with zero margins
QUANT_NOTES = {
    "gdfq": "dfqbench quant=gdfq (C1, DSG-PTQ's placement: ZeroQ's quantize_model) with method.margins=none (the "
            "official run's m_n_perc margins are unpublished: zero on both sides)",
}


# --- child: one official run ----------------------------------------------------------------------------------

def child(a) -> None:
    official = Path(a.official).resolve() / "post_training_quantization"
    sys.path.insert(0, str(official))
    import numpy as np
    import torch
    from torch import nn
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    teacher = loaded.model.eval()
    arch = str(cfg.model.arch)
    model_arg = arch if arch in ARCHS else "resnet20_cifar10"
    patches = []

    import pytorchcv.model_provider as provider

    def get_model(name, pretrained=True, **kwargs):
        if name != model_arg:
            raise SystemExit(f"official uniform_test.py asked for {name!r}, expected {model_arg!r}")
        return copy.deepcopy(teacher)

    provider.get_model = get_model
    patches.append(f"pytorchcv get_model({model_arg}) -> the dfqbench teacher {arch} "
                   f"({loaded.checkpoint or loaded.weights}, sha256 {loaded.sha256[:16]})")

    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    load = np.load

    def np_load(path, *args, **kwargs):
        if str(path).replace("\\", "/").endswith(("m_n_perc/m.npy", "m_n_perc/n.npy")):
            return np.zeros(num_bn)
        return load(path, *args, **kwargs)

    np.load = np_load
    patches.append(f"np.load('./m_n_perc/m.npy' | './m_n_perc/n.npy') -> zeros({num_bn}) (files not published: "
                   "zero margins)")

    def eig(A, eigenvectors=False):
        w, v = torch.linalg.eig(A)
        vals = torch.stack([w.real, w.imag], dim=1)
        return vals, (v.real if eigenvectors else A.new_empty(0))

    torch.eig = eig
    patches.append("torch.eig(A, eigenvectors=True) -> torch.linalg.eig in torch.eig's layout (removed in torch 2)")

    plateau_cls = torch.optim.lr_scheduler.ReduceLROnPlateau
    lr_log = []

    class Plateau(plateau_cls):
        def __init__(self, optimizer, *args, verbose=False, **kwargs):  # `verbose` is gone in torch >= 2.7
            super().__init__(optimizer, *args, **kwargs)
            self.cuts = 0
            lr_log.append(self)

        def step(self, metrics, *args, **kwargs):
            before = [g["lr"] for g in self.optimizer.param_groups]
            super().step(metrics, *args, **kwargs)
            self.cuts += int([g["lr"] for g in self.optimizer.param_groups] != before)

    torch.optim.lr_scheduler.ReduceLROnPlateau = Plateau
    patches.append("ReduceLROnPlateau(..., verbose=False): the argument dropped (removed in torch 2.7; it only "
                   "printed)")

    import pytorchcv.models.common as ptcv_common
    if not hasattr(ptcv_common, "ConvBlock"):
        from pytorchcv.models.common.conv import ConvBlock
        ptcv_common.ConvBlock = ConvBlock
        patches.append("pytorchcv.models.common.ConvBlock -> pytorchcv.models.common.conv.ConvBlock (imported by "
                       "utils/quantize_model.py, unused on ResNets; moved in pytorchcv 0.0.70+)")
    try:
        import cv2  # noqa: F401
    except ImportError:
        sys.modules["cv2"] = types.ModuleType("cv2")
        patches.append("cv2: an empty module (imported, unused, by distill_data.py)")

    import utils  # the clone's post_training_quantization/utils
    utils.getTestData = lambda dataset="imagenet", batch_size=1024, path="", shuffle=False, for_inception=False: \
        common.EvalLoader(data, batch_size, device)
    patches.append(f"utils.getTestData -> the dfqbench {cfg.dataset.name} test set ({data.num_samples} images)")
    if device.type == "cpu":
        common.cpu_only_cuda_calls(device)
        patches.append(".cuda() -> cpu")

    import distill_data
    timings, captured = {}, {}
    distil = distill_data.getDistilData

    def get_distil_data(*args, **kwargs):
        t0 = time.perf_counter()
        out = distil(*args, **kwargs)
        timings["distill_s"] = time.perf_counter() - t0
        captured["batches"] = [b.detach().clone() for b in out]
        return out

    distill_data.getDistilData = get_distil_data
    update = utils.update

    def timed_update(model, batches):
        t0 = time.perf_counter()
        out = update(model, batches)
        timings["update_s"] = time.perf_counter() - t0
        captured["qmodel"] = model
        return out

    utils.update = distill_data.update = timed_update  # (distill_data star-imports utils: uniform_test reads both)
    test = utils.test

    def kept_test(model, loader):
        acc = test(model, loader)
        captured["acc"] = acc
        return acc

    utils.test = distill_data.test = kept_test

    sys.argv = ["uniform_test.py", "--dataset", str(cfg.dataset.name), "--model", model_arg,
                "--batch_size", str(a.batch_size), "--w_bit", str(a.wbit), "--a_bit", str(a.abit),
                "--seed", str(a.seed), "--test_batch_size", str(a.test_batch_size)]
    os.chdir(official)
    t0 = time.perf_counter()
    runpy.run_path(str(official / "uniform_test.py"), run_name="__main__")
    wall = time.perf_counter() - t0
    result = {"top1": round(100.0 * captured["acc"], 4), "distill_s": round(timings["distill_s"], 3),
              "update_s": round(timings["update_s"], 3),
              "quantize_s": round(timings["distill_s"] + timings["update_s"], 3), "wall_s": round(wall, 3),
              "lr_cuts": [p.cuts for p in lr_log], "final_lr": [p.optimizer.param_groups[0]["lr"] for p in lr_log],
              "argv": sys.argv[1:], "patches": patches, "device": device.type, "threads": torch.get_num_threads(),
              "n_test": data.num_samples, "model": cfg.model.name, "arch": arch, "dataset": str(cfg.dataset.name),
              "margins": "zero"}
    if a.compare:
        try:
            result["check"] = compare(captured["qmodel"], captured["batches"], teacher, cfg, data, a, device)
        except Exception as exc:  # the check must not cost the official number
            result["check_error"] = repr(exc)
    print(json.dumps(result))


def compare(official_model, batches, teacher, cfg, data, a, device) -> dict:
    """ZeroQ's check (scripts/parity/zeroq.py: DSG's code is a fork of ZeroQ's) with DSG's `ema` calibration."""
    from dfqbench.methods.dsg import calibrate

    from zeroq import compare as zeroq_compare
    return zeroq_compare(official_model, batches, teacher, cfg, data, a, device,
                         calibrate=lambda model, bs: calibrate(model, bs, "ema"))


# --- parent: seeds, records, parity.csv -----------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    zeroq.add_arguments(p, DEFAULT_REPO, "uniform_test.py --seed (default 0 1 2)", 40, "generated batch", 256)
    p.add_argument("--method-overrides", nargs="*", default=SAME_CELL,
                   help=f"dfqbench method overrides for --dfqbench (default: {' '.join(SAME_CELL)})")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return
    repo, commit, cell, runs, reused = zeroq.official_side(
        a, Path(__file__), "DSG", DEFAULT_REPO, "post_training_quantization/uniform_test.py",
        detail=lambda r: f", lr cuts {r['lr_cuts']}")
    official = common.official_summary(cell, a, "dsg", "DSG", repo, commit, a.wbit, a.abit, runs, reused,
                                       margins="zero (m_n_perc/*.npy not published)",
                                       **common.batch_check_summary(runs))
    if not a.dfqbench:
        return
    for quant in a.quant:
        def overrides(seed: int, quant=quant) -> list[str]:
            return ["method=dsg", f"quant={quant}", f"wbit={a.wbit}", f"abit={a.abit}", f"seed={seed}",
                    f"method.batch_size={a.batch_size}", f"method.num_images={a.batch_size}", f"threads={a.threads}",
                    *a.method_overrides, *common.teacher_overrides(a)]
        ours, n_fresh = common.post_training_side(
            cell, quant, a.seeds, a.reuse_dfqbench, overrides,
            f"method=dsg quant={quant} {' '.join(a.method_overrides)} W{a.wbit}A{a.abit}",
            common.same_overrides(overrides))
        common.write_row(
            a.csv, method="dsg", quant=quant, wbit=a.wbit, abit=a.abit, n_seeds=len(a.seeds), official=official,
            dfqbench=ours, repo=repo, commit=commit, run=runs[0],
            note=f"{QUANT_NOTES.get(quant, 'dfqbench quant=' + quant)}; dfqbench overrides "
                 f"{' '.join(a.method_overrides) or 'none'}; seeds {' '.join(map(str, a.seeds))}; seconds = "
                 f"generation + calibration (dfqbench: the {n_fresh} seed(s) not read from its cache); "
                 f"{runs[0]['n_test']} test images; records {common.rel(cell)}")


if __name__ == "__main__":
    main()
