"""Parity driver for ACIQ: the official code (submission2019/cnn-quantization) on a dfqbench teacher and test set,
beside `python -m dfqbench method=aciq quant=official_aciq` on the same cell.

    python scripts/parity/aciq.py --official /path/to/cnn-quantization-clone [--seeds 0 1 2] [--dfqbench]

The official side is the README's offline-statistics flow, each step in a child process running the clone's
inference/inference_sim.py (its argument parser, QuantizationManagerInference, InferenceModel, validate):
  1. collect statistics on --calib-images training images, batch 1, shuffled with --seed s (the README's
     `-b 1 --qtype int8 -sm collect -ac -cs 32`), once per tensor and once per channel (`-pcq_a`): the use step
     loads both;
  2. quantize and evaluate the test set: `-pcq_w -pcq_a --qtype int<A> -qw int<W> -c laplace -baa -baw -bcw
     -sm use` (the README's best W4A4 flow), --flags to change it.
Run-time patches, and nothing else:
  - torchvision.models gets the dfqbench teacher under its arch name (`-a <arch>`), built inside the quantization
    manager's context as main() builds its models (so its Conv2d/BatchNorm2d/Linear/AvgPool2d/ReLU are the
    manager's *WithId classes), with the dfqbench checkpoint loaded;
  - the global average pool is built as a plain AvgPool2d (float, as torchvision ResNets' AdaptiveAvgPool2d, which
    the manager does not wrap): wrapped, its 1x1 output has no per-channel statistics (the collector skips 1x1
    tensors) and the use step stops on KeyError 'avgpool0_out';
  - utils.mark_relu.resnet_mark_before_relu (torchvision's BasicBlock/Bottleneck attribute names) marks, on any
    architecture, the convs and BNs whose output feeds a ReLU directly (what it marks on torchvision ResNets);
  - datasets.ImageFolder returns the dfqbench data: the training split (the teacher's normalization, 32x32, no
    ImageNet resize/crop) for the statistics, the dfqbench test set for the evaluation;
  - on a machine without CUDA: `--device cpu`, .cuda() stays on the CPU, torch.cuda.FloatTensor (the rounding
    noise, all zeros) is a CPU tensor, and the CUDA extension int_quantization.float2gemmlowp (kernels/gemmlowp.cu)
    is replaced by the same arithmetic in PyTorch (scale = range / (2^b - 1), zero point roundf(-offset / scale),
    clamp to [0, 2^b - 1], roundf, dequantize);
  - mlflow/tensorboardX logging (MLlogger) is left out (empty modules when they are not installed); HOME is a
    scratch folder (the statistics go to ~/mxt-sim).
The official code needs scipy and bokeh (its README's dependencies; pip install scipy bokeh, or put a folder
holding them on PYTHONPATH: pip install --target DIR scipy bokeh).
Writes results/parity/aciq/w<W>a<A>/official.json and one log per seed; with --dfqbench the dfqbench runs and the
results/parity.csv row.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_REPO = "submission2019/cnn-quantization"
OUT = common.REPO / "results" / "parity" / "aciq"
QUANT_NOTES = {  # what the dfqbench side of a row is, per preset
    "official_aciq": "dfqbench with the official placement and settings (quant.method_settings.aciq)",
    "aciq": "dfqbench's own ACIQ (data-free BatchNorm statistics, quantizers after each ReLU, classifier W8 with "
            "an A8 input), not the official flow",
}
FLOW = ["-pcq_w", "-pcq_a", "-c", "laplace", "-baa", "-baw", "-bcw"]  # README: W4A4 + ACIQ + bit alloc + bias corr


# --- child: one step of the official flow ---------------------------------------------------------------------

def _stub_modules(patches: list[str]) -> None:
    import torch
    try:
        import int_quantization  # noqa: F401  (the CUDA extension, when built)
    except ImportError:
        mod = types.ModuleType("int_quantization")

        def float2gemmlowp(x, rng, offset, num_bits, int_exp, enforce_true_zero, noise):
            rng, offset = float(rng), float(offset)
            if rng <= 0:
                return x
            qmax = float(2 ** int(num_bits) - 1)
            scale = torch.tensor(rng / qmax, dtype=torch.float32)
            if int_exp:
                scale = 2.0 ** torch.ceil(torch.log2(scale))
            v = -torch.tensor(offset, dtype=torch.float32) / scale
            zero_point = torch.sign(v) * torch.floor(v.abs() + 0.5)  # roundf: half away from zero
            shift = zero_point if enforce_true_zero else torch.tensor(-offset, dtype=torch.float32)
            out = x / scale + shift if enforce_true_zero else (x + shift) / scale
            out = (out + noise).clamp(max=qmax).clamp(min=0.0)
            out = torch.floor(out + 0.5)  # roundf on values >= 0
            return (out - shift) * scale if enforce_true_zero else out * scale - shift

        mod.float2gemmlowp = float2gemmlowp
        sys.modules["int_quantization"] = mod
        patches.append("int_quantization.float2gemmlowp (CUDA kernel) -> the same arithmetic in PyTorch on the CPU")
    for name in ("mlflow", "tensorboardX"):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.SummaryWriter = object
            sys.modules[name] = stub
            patches.append(f"{name} missing: an empty module (only utils/mllog.py imports it; MLlogger unused)")
    try:
        import scipy.optimize  # noqa: F401
        import scipy.stats  # noqa: F401
    except ImportError:
        raise SystemExit("the official code imports scipy (int_quantizer.py, kld_threshold.py) and bokeh "
                         "(utils/log.py): pip install scipy bokeh, or put a folder holding them on PYTHONPATH "
                         "(pip install --target DIR scipy bokeh)") from None


def mark_before_relu_generic(model) -> None:
    """Set `before_relu` on every Conv2d/BatchNorm2d whose output goes into a ReLU directly (found on one float
    forward of a zero image), and on a conv whose BatchNorm, its next sibling, does: the marks
    resnet_mark_before_relu puts on torchvision ResNets (conv1 and bn1 of a BasicBlock, the stem conv)."""
    import torch
    from torch import nn

    from pytorch_quantizer.quantization.inference.inference_quantization_manager import QMI
    calls, into_relu, keep, handles = [], set(), [], []

    def record(mod, inputs, output):
        keep.extend([inputs[0], output])  # alive until the end: no address is reused
        calls.append((mod, inputs[0].data_ptr(), output.data_ptr()))

    def relu_input(mod, inputs):
        keep.append(inputs[0])
        into_relu.add(inputs[0].data_ptr())

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            handles.append(m.register_forward_hook(record))
        elif isinstance(m, nn.ReLU):
            handles.append(m.register_forward_pre_hook(relu_input))
    enabled, QMI().enabled = QMI().enabled, False
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *_INPUT_SHAPE))
    finally:
        QMI().enabled = enabled
        for h in handles:
            h.remove()
    for mod, _, out in calls:
        if out in into_relu:
            mod.before_relu = True
    # a conv whose BatchNorm (its next sibling: the pair search_absorbe_bn folds) feeds a ReLU: after the fold the
    # conv's output is the BN's (torchvision: conv1 with bn1)
    for parent in model.modules():
        children = list(parent.children())
        for conv, bn in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and getattr(bn, "before_relu", False):
                conv.before_relu = True


_INPUT_SHAPE = (3, 32, 32)


def child(a) -> None:
    global _INPUT_SHAPE
    official = Path(a.official).resolve()
    patches: list[str] = []
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(scratch)  # the statistics folder: ~/mxt-sim
    sys.path.insert(0, str(official))
    import torch
    import torchvision.datasets
    import torchvision.models
    from torch.utils.data import Dataset

    from dfqbench.runner import data_shape
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    _stub_modules(patches)
    if not cuda:
        common.cpu_only_cuda_calls(device)
        torch.cuda.FloatTensor = lambda *size: torch.zeros(*size)
        patches.append(".cuda() -> cpu; torch.cuda.FloatTensor (zero rounding noise) -> torch.zeros")
    overrides = common.teacher_overrides(a)
    cfg, loaded, data = common.teacher_and_data(overrides)
    _INPUT_SHAPE = tuple(data_shape(data, cfg))
    arch = str(cfg.model.arch)

    import dataclasses

    from dfqbench.models import load_model, resolve_weights
    weights = resolve_weights(cfg.model, cfg.paths.models_dir)
    if weights.checkpoint is not None:  # the official code runs in the scratch folder
        weights = dataclasses.replace(weights, checkpoint=Path(weights.checkpoint).resolve())

    def build(pretrained=True, **kwargs):  # called by InferenceModel inside `with QM(...)`: *WithId classes
        model = load_model(cfg.model, cfg.paths.models_dir, weights).model
        # the global average pool stays float, as on torchvision's ResNets (AdaptiveAvgPool2d, which the manager
        # does not wrap): AvgPool2dWithId sends its output to the per-channel statistics, which skip 1x1 tensors,
        # and the use step then stops on a KeyError ('avgpool0_out')
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child).__name__ == "AvgPool2dWithId":
                    setattr(parent, name, torch.nn.modules.pooling.AvgPool2d(
                        child.kernel_size, child.stride, child.padding, child.ceil_mode, child.count_include_pad))
        return model.float().to(memory_format=torch.contiguous_format).eval()

    setattr(torchvision.models, arch, build)
    patches.append(f"torchvision.models.{arch} -> the dfqbench teacher ({loaded.checkpoint or loaded.weights}, "
                   f"sha256 {loaded.sha256[:16]}), built inside the quantization manager's context; its "
                   f"AvgPool2d a plain (float) AvgPool2d")

    import utils.mark_relu
    utils.mark_relu.resnet_mark_before_relu = mark_before_relu_generic
    patches.append("utils.mark_relu.resnet_mark_before_relu -> mark every Conv2d/BatchNorm2d feeding a ReLU (a conv "
                   "through the BatchNorm right after it)")

    class Tensors(Dataset):
        def __init__(self, images, labels):
            self.images, self.labels = images, labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.images[i], int(self.labels[i])

    mean, std = data.mean.reshape(-1).tolist(), data.std.reshape(-1).tolist()
    if a.step.startswith("collect"):
        from torchvision import transforms
        train = Path(str(cfg.dataset.root)).expanduser() / (list(cfg.dataset.get("train_dirs") or ["train"])[0])
        dataset = torchvision.datasets.ImageFolder(str(train), transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(mean, std)]))
        what = f"the training split {train} ({len(dataset)} images; {a.calib_images} drawn by the shuffle)"
        drawn: list[str] = []  # the images the shuffle draws, for dfqbench's side (paths.calib_list)
        getitem = type(dataset).__getitem__

        def logged(self, i):
            drawn.append(str(Path(self.samples[i][0]).relative_to(train)))
            return getitem(self, i)
        type(dataset).__getitem__ = logged
    else:
        xs, ys = zip(*[(x.contiguous().cpu(), y.cpu()) for x, y in data.batches(1000, "cpu")])
        dataset = Tensors(torch.cat(xs), torch.cat(ys))
        what = f"the dfqbench {cfg.dataset.name} test set ({data.num_samples} images)"
    torchvision.datasets.ImageFolder = lambda root, transform=None, **kw: dataset
    patches.append(f"datasets.ImageFolder -> {what}")

    if a.step.startswith("collect"):
        argv = ["-b", "1", "--qtype", "int8", "-sm", "collect", "-ac", "-cs", str(a.calib_images)]
        argv += ["-pcq_a"] if a.step == "collect_pc" else []
    else:
        argv = [*a.flags.split(), "--qtype", f"int{a.abit}", "-qw", f"int{a.wbit}", "-sm", "use",
                "-b", str(a.batch_size)]
    argv = ["-a", arch, *argv, "--seed", str(a.seed), "--device", "cuda" if cuda else "cpu", "-j", "0"]
    sys.argv = ["inference_sim.py", *argv]
    os.chdir(scratch)
    t0 = time.perf_counter()
    g = runpy.run_path(str(official / "inference" / "inference_sim.py"), run_name="inference_sim")
    args = g["args"]
    with g["QM"](args, g["get_params"]()):  # inference_sim's __main__, less MLlogger
        im = g["InferenceModel"]()
        out = im.run()
    wall = time.perf_counter() - t0
    result = {"step": a.step, "argv": argv, "patches": patches, "wall_s": round(wall, 3), "device": device.type,
              "threads": torch.get_num_threads(), "model": cfg.model.name, "dataset": str(cfg.dataset.name),
              "n_test": data.num_samples}
    if out is not None:
        result["top1"] = float(out[1])
    if a.step.startswith("collect"):
        result["calib_files"] = drawn[:a.calib_images]  # the loader may read ahead of the -cs stop
    print(__import__("json").dumps(result))


# --- parent -------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="a clone of submission2019/cnn-quantization")
    p.add_argument("--wbit", type=int, default=4)
    p.add_argument("--abit", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="statistics-image seeds (default 0 1 2)")
    p.add_argument("--calib-images", type=int, default=32, help="-cs: statistics images (README: 32)")
    p.add_argument("--flags", default=" ".join(FLOW),
                   help=f"official flags of the use step, one string (default: {' '.join(FLOW)!r})")
    common.add_teacher_arguments(p)
    p.add_argument("--batch-size", type=int, default=500, help="-b of the evaluation (no effect on the result)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dfqbench", action="store_true", help="also run dfqbench on the same cell, write parity.csv")
    p.add_argument("--quant", nargs="+", default=["official_aciq"], help="dfqbench presets for --dfqbench")
    p.add_argument("--method-overrides", nargs="*", default=[],
                   help="more dfqbench overrides for --dfqbench (quant=official_aciq brings the official settings)")
    common.add_output_arguments(p, OUT)
    common.add_child_arguments(p, scratch=True)
    p.add_argument("--step", default="use", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return
    repo, commit = common.clone_identity(Path(a.official), DEFAULT_REPO, "inference/inference_sim.py")
    out = Path(a.out) / a.tag if a.tag else Path(a.out)
    cell = out / f"w{a.wbit}a{a.abit}"

    def run_seed(seed: int) -> dict:
        scratch = Path("/tmp") / f"parity-aciq-{os.getpid()}-s{seed}"
        common_args = common.child_args(a, seed, a.wbit, a.abit) + [
            "--calib-images", str(a.calib_images), "--batch-size", str(a.batch_size), "--scratch", str(scratch),
            f"--flags={a.flags}"]
        steps = {}
        for step in ("collect", "collect_pc", "use"):
            steps[step] = common.run_child(Path(__file__), [*common_args, "--step", step],
                                           cell / f"official-s{seed}.{step}.log.txt")
        r = dict(steps["use"])
        files = steps["collect"].get("calib_files")
        if files and files == steps["collect_pc"].get("calib_files"):  # both collections saw the same images
            (cell / f"official-s{seed}.calib.txt").write_text("\n".join(files) + "\n")
            r["calib_list"] = common.rel(cell / f"official-s{seed}.calib.txt")
        r.update(collect_s=round(steps["collect"]["wall_s"] + steps["collect_pc"]["wall_s"], 3),
                 collect_argv=[steps["collect"]["argv"], steps["collect_pc"]["argv"]])
        print(f"official ACIQ W{a.wbit}A{a.abit} seed {seed}: top-1 {r['top1']:.2f}, "
              f"statistics {r['collect_s']:.0f} s, quantize+eval {r['wall_s']:.0f} s", flush=True)
        return r

    runs, reused = common.official_runs(cell, a, "ACIQ", commit, a.wbit, a.abit, run_seed,
                                        same={"flags": a.flags, "calib_images": a.calib_images})
    official = common.official_summary(cell, a, "aciq", "ACIQ", repo, commit, a.wbit, a.abit, runs, reused,
                                       seconds="collect_s", seconds_field="statistics_s_mean",
                                       calib_images=a.calib_images, flags=a.flags)
    if not a.dfqbench:
        return
    for quant in a.quant:
        def overrides(seed: int, quant=quant) -> list[str]:
            return ["method=aciq", f"quant={quant}", f"wbit={a.wbit}", f"abit={a.abit}", f"seed={seed}",
                    f"method.calib_images={a.calib_images}", f"threads={a.threads}", *a.method_overrides,
                    *common.teacher_overrides(a), *paired_overrides(runs, seed, quant)]
        ours, _ = common.post_training_side(cell, quant, a.seeds, False, overrides,
                                            f"method=aciq quant={quant} W{a.wbit}A{a.abit}")
        paired = all(paired_overrides(runs, seed, quant) for seed in a.seeds)
        common.write_row(
            a.csv, method="aciq", quant=quant, wbit=a.wbit, abit=a.abit, n_seeds=len(a.seeds), official=official,
            dfqbench=ours, repo=repo, commit=commit, run=runs[0],
            note=f"{QUANT_NOTES.get(quant, 'dfqbench quant=' + quant)}; statistics-image seeds "
                 f"{' '.join(map(str, a.seeds))} ({a.calib_images} training images"
                 f"{', the same images on both sides (official-s<seed>.calib.txt)' if paired else ''}); "
                 f"official flags {a.flags}; official_s = statistics collection, dfqbench_s = "
                 f"quantization; {runs[0]['n_test']} test images; records {common.rel(cell)}")

def paired_overrides(runs: list[dict], seed: int, quant: str) -> list[str]:
    """dfqbench's statistics on the images the official run of `seed` drew (its calib.txt), where the preset
    reads training images (quant=official_aciq: calib_data real); [] otherwise (an older official.json)."""
    listing = next((r.get("calib_list") for r in runs if r["seed"] == seed), None)
    if not listing or quant != "official_aciq":
        return []
    return ["quant.method_settings.aciq.calib_data=listed", f"paths.calib_list={common.REPO / listing}"]


if __name__ == "__main__":
    main()
