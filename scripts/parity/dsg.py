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
import sys
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
    c = zeroq.Child(a, "post_training_quantization", ARCHS)
    import numpy as np
    import torch
    from torch import nn
    patches = c.patches
    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in c.teacher.modules())
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

    try:
        import cv2  # noqa: F401
    except ImportError:
        sys.modules["cv2"] = types.ModuleType("cv2")
        patches.append("cv2: an empty module (imported, unused, by distill_data.py)")

    import utils  # the clone's post_training_quantization/utils
    c.patch(utils)

    import distill_data
    c.instrument(distill_data, utils)
    c.run(["--dataset", str(c.cfg.dataset.name), "--model", c.model_arg, "--batch_size", str(a.batch_size),
           "--w_bit", str(a.wbit), "--a_bit", str(a.abit), "--seed", str(a.seed),
           "--test_batch_size", str(a.test_batch_size)], compare, margins="zero")


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
    common.add_output_arguments(p, OUT)
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
