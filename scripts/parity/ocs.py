"""Parity driver for OCS: the official code (cornell-zhang/dnn-quant-ocs, Distiller-based) on a dfqbench teacher and
test set, beside `python -m dfqbench method=ocs quant=official_ocs` on the same cell.

    python scripts/parity/ocs.py --official /path/to/dnn-quant-ocs-clone [--bits 4] [--seeds 0 1 2] [--dfqbench]

The official side runs the clone's own OCS-CNN/compress_classifier.py with the flags of its example.sh / ocs_script.py
(`--evaluate --quantize-method ocs --act-bits A --weight-bits W --weight-expand-ratio 0.02 --weight-clip-threshold
1.0 --act-clip-threshold 1.0 --profile-batches 4 -b 128 --vs 0`) in a child process per seed. Its evaluate_model:
OCSQuantizer wraps every nn.Conv2d (not the FC: the code registers no Linear replacement; not a conv with 3 input
channels: the first conv stays float), splits and quantizes the weights (distiller/quantization/ocs.py, ocs_impl.py),
profiles each wrapped conv's input max |x| on 4 training batches concatenated (one forward, float weights), then
tests: each wrapped conv quantizes its input on a signed symmetric grid and its output too, at A bits with the range
of the batch's own max |output| (RangeLinearQuantWrapper.post_quantized_forward).

Run-time patches (listed per run in the record), nothing else:
  - models.create_model returns the dfqbench teacher (model=..., its checkpoint);
  - apputils.load_data: the official cifar10_load_data's training loader (SubsetRandomSampler, RandomCrop(32, 4) and
    flip) over the dfqbench training split (torchvision ImageFolder, the teacher's normalization instead of the
    code's (0.5, 0.5, 0.5)); the test loader is the dfqbench test set (same images, normalization and order as a
    dfqbench run). The seed seeds torch/numpy/random before main(): it picks the 512 profiling images;
  - -j 0 (data loading in the process; the code's -j 1 forks a worker);
  - without a GPU, .cuda() and .to('cuda') stay on the CPU;
  - stubs for modules only imported by loggers the run never uses: visdom (torchnet.logger), tensorflow
    (distiller's TensorBoard backend; TensorBoardLogger -> None, compress_classifier builds one and never logs to it).
The clone's requirements pin torch 0.4 / Python 3.5; it runs here on the dfqbench venv's torch with pydot, tabulate,
gitpython, pandas, torchnet (--no-deps) and six installed into a separate --deps dir (PYTHONPATH), and scipy.
It reads the top-1 from the code's own "==> Top1:" log line, the quantization seconds from prepare_model to the end
of the profiling pass.

Writes results/parity/ocs/w<W>a<A>/official.json with one log per seed, and with --dfqbench the dfqbench runs
(dfqbench-<quant>-s<seed>.record.json) and the results/parity.csv rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import runpy
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_REPO = "cornell-zhang/dnn-quant-ocs"
OUT = common.REPO / "results" / "parity" / "ocs"
OFFICIAL_ARCH = {"resnet20_cifar10": "resnet20_cifar", "preresnet20_cifar10": "preresnet20_cifar"}
QUANT_NOTES = {
    "official_ocs": "dfqbench with the official placement (conv inputs on a signed grid from the max |x| of 512 "
                    "training images through the float model, every conv output at A bits on its batch's own "
                    "max |y|, first conv and FC float, split shifted by -/+ a quarter step)",
    "ocs": "dfqbench's own OCS preset (unsigned grid after ReLUs, BN-derived ranges, FC at wbit)",
}


# --- child: one official run ----------------------------------------------------------------------------------

def child(a) -> None:
    official = Path(a.official).resolve()
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    device = torch.device("cpu")  # the code moves weights through numpy on the CPU; its GPU path is .cuda()
    cfg, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    teacher = loaded.model.eval()
    name = str(cfg.model.name)
    arch = OFFICIAL_ARCH.get(name)
    if arch is None:
        raise SystemExit(f"no official arch name for {name} (known: {OFFICIAL_ARCH})")
    patches = []
    for stub in ("visdom", "tensorflow"):
        if stub not in sys.modules:
            sys.modules[stub] = types.ModuleType(stub)
            patches.append(f"import {stub} -> an empty stub module (only imported by unused loggers)")
    sys.path.insert(0, str(official / "OCS-CNN"))
    sys.path.insert(0, str(official))
    import distiller  # before apputils, as compress_classifier.py does (they import each other)
    import apputils
    import distiller.data_loggers
    import distiller.quantization as quantization
    import models
    import torchvision
    from torchvision import transforms

    distiller.data_loggers.TensorBoardLogger = lambda *args, **kwargs: None
    patches.append("distiller.data_loggers.TensorBoardLogger -> None (never logged to in --evaluate)")

    holder = {}

    def create_model(pretrained, dataset, arch_, parallel=True, device_ids=None):
        if arch_ != arch:
            raise SystemExit(f"official code asked for {arch_!r}, the dfqbench teacher is {name!r} ({arch!r})")
        holder["model"] = copy.deepcopy(teacher).to(device)

        def keep_profile_images(module, args):  # the profiling pass's images, for the paired dfqbench check
            if sys.modules["distiller.quantization.ocs"].PROFILE_MODE:
                holder["profile_images"] = args[0].detach().clone()

        holder["model"].register_forward_pre_hook(keep_profile_images)
        return holder["model"]

    models.create_model = create_model
    patches.append(f"models.create_model({arch}) -> the dfqbench teacher {name} ({loaded.checkpoint or loaded.weights}"
                   f", sha256 {loaded.sha256[:16]})")

    norm = cfg.model.normalize or cfg.dataset
    train_dir = Path(str(cfg.dataset.root)).expanduser() / (list(cfg.dataset.get("train_dirs") or ["train"])[0])
    load_data = apputils.load_data
    dl = sys.modules["apputils.data_loaders"]

    class TrainFolder(torchvision.datasets.ImageFolder):
        """datasets.CIFAR10 in cifar10_load_data: the training split as an ImageFolder, the teacher's
        normalization; the test split is never read from here (an empty stand-in, replaced below)."""

        def __new__(cls, root, train=True, download=False, transform=None):
            return super().__new__(cls) if train else []

        def __init__(self, root, train=True, download=False, transform=None):
            ts = [transforms.Normalize(tuple(norm.mean), tuple(norm.std)) if isinstance(t, transforms.Normalize)
                  else t for t in transform.transforms]
            super().__init__(str(train_dir), transforms.Compose(ts))

    class TestLoader(common.EvalLoader):
        @property
        def sampler(self):
            return range(self.data.num_samples)

    def patched_load_data(dataset, data_dir, batch_size, workers, valid_size=0.1, deterministic=False, crop_size=224):
        dl.datasets.CIFAR10 = TrainFolder
        train_loader, _, _, shape = load_data(dataset, data_dir, batch_size, workers, valid_size, deterministic,
                                              crop_size)
        test_loader = TestLoader(data, batch_size, device)
        return train_loader, test_loader, test_loader, shape

    apputils.load_data = patched_load_data
    patches.append(f"apputils.load_data -> cifar10_load_data's training loader over {train_dir} (ImageFolder, "
                   f"RandomCrop(32, 4) + flip, Normalize{tuple(norm.mean)}/{tuple(norm.std)}); test loader -> the "
                   f"dfqbench {cfg.dataset.name} test set ({data.num_samples} images, batch {a.batch_size})")
    common.cpu_only_cuda_calls(device)
    to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):
        args = tuple("cpu" if isinstance(x, str) and x.startswith("cuda") else x for x in args)
        return to(self, *args, **kwargs)

    torch.Tensor.to = to_cpu
    patches.append(".cuda() / .to('cuda') -> cpu")
    times = {}
    prepare = quantization.Quantizer.prepare_model

    def timed_prepare(self):
        times["start"] = time.perf_counter()
        return prepare(self)

    quantization.Quantizer.prepare_model = timed_prepare
    set_profile = quantization.ocs_set_profile_mode

    def timed_profile(pm):
        set_profile(pm)
        if not pm:
            times["done"] = time.perf_counter()

    quantization.ocs_set_profile_mode = timed_profile
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    sys.argv = ["compress_classifier.py", str(cfg.dataset.root), "-a", arch, "--evaluate",
                "--quantize-method", "ocs", "--act-bits", str(a.abit), "--weight-bits", str(a.wbit),
                "--weight-expand-ratio", str(a.expand_ratio), "--weight-clip-threshold", str(a.weight_clip),
                "--act-clip-threshold", str(a.act_clip), "--profile-batches", str(a.profile_batches),
                "-b", str(a.batch_size), "-j", "0", "--vs", "0", "--out-dir", str(scratch), "--name", f"s{a.seed}"]
    patches.append("-j 0 (the example's -j 1 forks one loader worker)")
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    random.seed(a.seed)
    os.chdir(official / "OCS-CNN")
    t0 = time.perf_counter()
    g = runpy.run_path(str(official / "OCS-CNN" / "compress_classifier.py"), run_name="__not_main__")
    g["main"]()
    wall = time.perf_counter() - t0
    logs = sorted(scratch.glob("**/*.log"))
    text = logs[-1].read_text() if logs else ""
    top = [line for line in text.splitlines() if "==> Top1:" in line]
    if not top:
        raise SystemExit(f"no '==> Top1:' line in the official log ({logs})")
    top1 = float(top[-1].split("==> Top1:")[1].split()[0])
    splits = [line for line in text.splitlines() if "OCSParamLayerWrapper" in line]
    result = {"top1": top1, "quantize_s": round(times["done"] - times["start"], 4) if len(times) == 2 else None,
              "wall_s": round(wall, 3), "argv": sys.argv[1:], "patches": patches, "device": device.type,
              "threads": torch.get_num_threads(), "official_log": str(logs[-1]) if logs else None,
              "n_test": data.num_samples, "model": name, "dataset": str(cfg.dataset.name),
              "wrapped_convs": len(splits)}
    result["check"] = compare(holder["model"], a)
    if a.paired:
        result["paired"] = paired(holder, teacher, cfg, data, a, device)
    print(json.dumps(result))


def paired(holder, teacher, cfg, data, a, device) -> dict:
    """dfqbench (method=ocs quant=official_ocs) on the SAME 512 profiling images as this official run (its
    augmented training images): the top-1 on the same test set at the same batch size, and the activation ranges
    beside the official act_clip_max_abs. Takes the seed's image draw out of the comparison."""
    import torch
    from omegaconf import OmegaConf

    import dfqbench.methods.ocs as ocs_module
    from dfqbench.methods.base import QuantContext
    from dfqbench.quant import Convention, act_quantizers
    from distiller.quantization.ocs import OCSParamLayerWrapper
    conv_cfg = common.compose([*common.teacher_overrides(a), "quant=official_ocs", f"abit={a.abit}"]).quant
    convention = Convention.from_dict(OmegaConf.to_container(conv_cfg, resolve=True))
    images = holder["profile_images"]
    ocs_module.calibration_batches = lambda *args, **kwargs: [images.to(device)]
    ctx = QuantContext(convention, a.wbit, a.abit, a.seed, device, tuple(images.shape[1:]),
                       int(cfg.dataset.num_classes), progress=False)
    qmodel = ocs_module.OCS().quantize(copy.deepcopy(teacher).to(device).eval(), ctx)
    correct = 0
    with torch.no_grad():
        for x, y in data.batches(a.batch_size, device):
            correct += int((qmodel(x).argmax(1) == y).sum())
    theirs = sorted(float(m.act_clip_max_abs) for m in holder["model"].modules()
                    if isinstance(m, OCSParamLayerWrapper) and hasattr(m, "act_clip_max_abs"))
    ours = sorted(float(q.hi) for q in act_quantizers(qmodel) if q.enabled)
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(theirs, ours)]
    return {"images": int(images.shape[0]), "dfqbench_top1": round(100.0 * correct / data.num_samples, 4),
            "act_quantizers": [len(theirs), len(ours)], "act_range_max_rel_diff": max(rel, default=0.0)}


def compare(official_model, a) -> dict:
    """The official split-and-quantized conv weights beside dfqbench's OCSWeightQuantizer (per tensor, symmetric,
    method.split=quarter, clip max, the same expand ratio) on the same float weights: merged back per input channel,
    in grid steps."""
    import torch

    from dfqbench.methods.ocs import OCSWeightQuantizer
    from dfqbench.quant.quantizers import WeightQuantizer
    from distiller.quantization.ocs import OCSParamLayerWrapper
    layers = differing = total = splits = 0
    for m in official_model.modules():
        if not isinstance(m, OCSParamLayerWrapper) or not hasattr(m, "w_scale"):
            continue
        w = m.weight_orig.detach().float()
        q_int = m.wrapped_module.weight.detach().float()
        c_in = w.shape[1]
        merged = q_int[:, :c_in].clone()
        if m.channels_to_split is not None:
            for j, c in enumerate(m.channels_to_split.tolist()):
                merged[:, c] += q_int[:, c_in + j]
        ours = OCSWeightQuantizer(WeightQuantizer(a.wbit, per_channel=False, symmetric=True), a.expand_ratio, "max",
                                  "quarter")
        with torch.no_grad():
            ours_q = ours(w)
        diff = (ours_q / ours.grid.scale - merged).abs()
        scale_rel = abs(float(1.0 / ours.grid.scale) - float(m.w_scale)) / float(m.w_scale)
        layers += 1
        total += w.numel()
        differing += int((diff > 0.5).sum())
        splits += 0 if m.channels_to_split is None else len(m.channels_to_split)
        if scale_rel > 1e-5 or ours.splits != (0 if m.channels_to_split is None else len(m.channels_to_split)):
            differing += 10 ** 6  # a grid or split count that differs is reported loudly
    return {"layers": layers, "weights": total, "weights_differing": differing, "channels_split": splits}


# --- parent: seeds, records, parity.csv -----------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="a clone of cornell-zhang/dnn-quant-ocs")
    p.add_argument("--deps", default="/tmp/parity-deps-ocs",
                   help="extra packages for the official code (pip install --target DIR pydot tabulate gitpython "
                        "pandas six; --no-deps torchnet), put on PYTHONPATH (with /tmp/parity-deps for scipy)")
    p.add_argument("--bits", type=int, nargs="+", default=[4], help="W=A bit-widths (default: 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of the profiling images' shuffle (default: 0 1 2)")
    common.add_teacher_arguments(p)
    p.add_argument("--batch-size", type=int, default=128, help="-b (ocs_script.py: 128)")
    p.add_argument("--expand-ratio", type=float, default=0.02, help="--weight-expand-ratio (example.sh: 0.02)")
    p.add_argument("--weight-clip", type=float, default=1.0, help="--weight-clip-threshold (1.0 = max)")
    p.add_argument("--act-clip", type=float, default=1.0, help="--act-clip-threshold (1.0 = max)")
    p.add_argument("--profile-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dfqbench", action="store_true", help="also run dfqbench on the same cells, write parity.csv")
    p.add_argument("--quant", nargs="+", default=["official_ocs"], help="dfqbench presets for --dfqbench")
    common.add_output_arguments(p, OUT)
    p.add_argument("--reuse-dfqbench", action="store_true",
                   help="take the dfqbench side from the records already in the cell folder (same dfqbench source)")
    p.add_argument("--no-paired", dest="paired", action="store_false",
                   help="skip the paired check (dfqbench on the official run's own profiling images)")
    common.add_child_arguments(p, bits=4, scratch=True)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return
    repo, commit = common.clone_identity(Path(a.official), DEFAULT_REPO, "distiller/quantization/ocs.py")
    out = Path(a.out) / a.tag if a.tag else Path(a.out)
    env = common.deps_env(a.deps)
    for bits in a.bits:
        cell = out / f"w{bits}a{bits}"

        def run_seed(seed: int, bits=bits, cell=cell) -> dict:
            scratch = Path("/tmp") / f"parity-ocs-{os.getpid()}-w{bits}-s{seed}"
            args = common.child_args(a, seed, bits, bits) + [
                "--batch-size", str(a.batch_size), "--expand-ratio", str(a.expand_ratio),
                "--weight-clip", str(a.weight_clip), "--act-clip", str(a.act_clip),
                "--profile-batches", str(a.profile_batches), "--scratch", str(scratch)]
            args += [] if a.paired else ["--no-paired"]
            r = common.run_child(Path(__file__), args, cell / f"official-s{seed}.log.txt", env=env)
            if r.get("official_log"):
                (cell / f"official-s{seed}.distiller.log.txt").write_text(Path(r["official_log"]).read_text())
                r["official_log"] = common.rel(cell / f"official-s{seed}.distiller.log.txt")
            print(f"official OCS W{bits}A{bits} seed {seed}: top-1 {r['top1']:.2f}, quantize {r['quantize_s']} s, "
                  f"wall {r['wall_s']:.0f} s, weights differing {r['check']['weights_differing']}/"
                  f"{r['check']['weights']}" + (f"; dfqbench on the same images {r['paired']['dfqbench_top1']:.2f}"
                                                if 'paired' in r else ""), flush=True)
            return r

        runs, reused = common.official_runs(cell, a, "OCS", commit, bits, bits, run_seed)
        same = [r["paired"]["dfqbench_top1"] for r in runs if "paired" in r]
        same_ms = common.mean_std(same)
        official = common.official_summary(cell, a, "ocs", "OCS", repo, commit, bits, bits, runs, reused,
                                           paired_dfqbench_top1=same)
        if same:
            print(f"dfqbench quant=official_ocs on each official run's own profiling images: top-1 "
                  f"{same_ms[0]:.2f} +- {same_ms[1]:.2f} (paired with the official {official[0][0]:.2f} +- "
                  f"{official[0][1]:.2f})", flush=True)
        if not a.dfqbench:
            continue
        for quant in a.quant:
            def overrides(seed: int, quant=quant, bits=bits) -> list[str]:
                over = ["method=ocs", f"quant={quant}", f"wbit={bits}", f"abit={bits}", f"seed={seed}",
                        f"threads={a.threads}", *common.teacher_overrides(a)]
                if quant.startswith("official"):  # the code tests at -b 128; its output ranges are per batch
                    over.append(f"eval.batch_size={a.batch_size}")
                return over
            ours, _ = common.post_training_side(cell, quant, a.seeds, a.reuse_dfqbench, overrides,
                                                f"method=ocs quant={quant} W{bits}A{bits}",
                                                common.same_overrides(overrides))
            common.write_row(
                a.csv, method="ocs", quant=quant, wbit=bits, abit=bits, n_seeds=len(a.seeds), official=official,
                dfqbench=ours, repo=repo, commit=commit, run=runs[0],
                note=f"{QUANT_NOTES.get(quant, 'dfqbench quant=' + quant)}; seeds {' '.join(map(str, a.seeds))} "
                     f"pick the profiling images from the TRAIN split (never the test split)"
                     + (f"; on each official run's own profiling images dfqbench gives {same_ms[0]:.2f} +- "
                        f"{same_ms[1]:.2f}" if same and quant == "official_ocs" else "") + "; seconds = "
                     f"quantization only; {runs[0]['n_test']} test images; records {common.rel(cell)}")


if __name__ == "__main__":
    main()
