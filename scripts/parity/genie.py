"""Parity driver for Genie: the official code (SamsungLabs/Genie) on a dfqbench teacher and test set, beside
`python -m dfqbench method=genie quant=brecq` on the same cell, at the same budget.

    python scripts/parity/genie.py --official /path/to/Genie-clone [--wbit 4 --abit 4] [--seeds 0 1 2] [--dfqbench]
        [--reuse-official] [--reuse-dfqbench] [--method-overrides method.K=V ...] [--max-samples N] [--out DIR]

The official side calls the clone's own main.main() (main.py: distill.distill_data, reconstruct.quantize_model
with quant_ops (Conv2d, Linear, Identity), reconstruct.reconstruct with its reconstruct units, then
utils.evaluate_classifier) in a child process per seed. The budget is dfqbench's: the driver composes dfqbench's
config of `method=genie` (conf/method/genie.yaml, with --method-overrides given to both sides) and maps it onto
main()'s own arguments (`official_arguments`; no code is patched for it):
    samples = method.num_images, distill_batch = method.calib_batch_size, distill_iter = method.distill.iterations,
    lr_g = method.distill.lr_z and lr_z = method.distill.lr_g (main()'s names are swapped: distill_data gives its
    `lr_g` to the latents' Adam and its `lr_z` to the generator's), recon_iter = method.reconstruct.iterations,
    round_weight = method.reconstruct.reg_weight, and recon_batch = num_images / reconstruct.batch_size:
    reconstruct_block draws `torch.randperm(len(x)).view(batch_size, -1)` and iterates over the rows, so its
    `batch_size` is the number of batches per pass and a batch holds len(x) / batch_size images (32 at the paper's
    1024 images and recon_batch 32; at dfqbench's 256 images and batch 32: recon_batch 8).
Every other dfqbench setting must be the value the code hard-codes (latent 256, G decay 0.95, patience 100, min lr
1e-4, swing, rounding lr 1e-3, step lrs 1e-4 / 4e-5, both steps learned, QDrop p 0.5, warm-up 0.2, beta 20 -> 2,
ranges initialized per block), or the driver stops. dfqbench's CPU budget (conf/method/genie.yaml): 256 images in
2 batches of 128, 100 distillation steps per batch, 1,000 reconstruction iterations per block at batch 32
(main(samples=256, distill_batch=128, distill_iter=100, recon_iter=1000, recon_batch=8)).

Run-time patches, and nothing else (each run's list is kept in official.json "patches"):
  - the model: main.get_model returns the dfqbench teacher (model=..., its checkpoint) rebuilt in the layout of
    the code's models/resnet.py ResNet (what its quantize_model / reconstruct expect): conv1, bn1, relu, layer1..3
    of the code's own BasicBlock (conv1, bn1, relu1, conv2, bn2, downsample = Sequential(conv1x1, BN) or the
    `identity` nn.Identity through which the residual input is quantized, relu2), avgpool, fc, with the teacher's
    weights copied (pytorchcv CIFARResNet: init_block -> conv1/bn1, stage<s>.unit<u> -> layer<s>[u-1], body.conv1
    / body.conv2 -> conv1,bn1 / conv2,bn2, identity_conv -> downsample, output -> fc); the CIFAR stem has no max
    pool and three stages. The rebuilt net's logits are checked against the teacher's (max abs difference in the
    record). main()'s model_name is `resnet18` (its assert admits only ImageNet names; the name only selects the
    registry entry, here the rebuilt teacher);
  - the image size: distill_data builds Generator(latent_dim=256) with the class's image_size default 224: that
    default -> the teacher's input size (32: init_size 8, 32x32 images); nothing else of the generator changes;
  - the data: main.get_dataset(val_path) -> the dfqbench test set (its images, the teacher's normalization; with
    --max-samples the same subset as dfqbench's dataset.max_samples); evaluate_classifier's DataLoader runs with
    num_workers=0 and pin_memory off instead of 4 workers (same images; the code shuffles them, as it does);
  - without a GPU, .cuda() stays on the CPU;
  - seeds: the code seeds nothing; the child seeds torch, numpy and random with the run's seed before main();
  - environment: torch >= 2.7 has no ReduceLROnPlateau(verbose=...) (it only printed): dropped when needed;
    `fire` (imported by main.py, used only under __main__) comes from --deps (pip install --target DIR fire;
    default /tmp/genie-deps when it exists), or a stand-in module when it is missing.
Instrumentation only (no effect on the numbers): distill_data, reconstruct.reconstruct_block and
evaluate_classifier are timed and their results kept. Before main() the child evaluates the rebuilt FP32 teacher
through the code's own utils.evaluate_classifier on the same test set (`fp32_check`: it must give the dfqbench
teacher's top-1).

Remaining differences between the two sides (not patched away):
  Placement (dfqbench quant=brecq, convention C2, against the code's quantize_model on the rebuilt ResNet): the
  same first conv W8 with a float image, the same A8 input of the 2nd layer (= the first residual block's input,
  shared by its identity), the same W4A4 elsewhere with one quantizer per tensor shared by the residual identity
  and the 1x1 downsample conv, BN not folded on either side, per-channel asymmetric weights and per-tensor
  symmetric (unsigned after ReLU) activations, both initialized by the same Lp (p = 2.4) search over clip ratios
  1.00, 0.99, ..., 0.01 (dfqbench's asymmetric weight grid always holds zero, the code's whenever a channel has
  weights of both signs: every channel of resnet20_cifar10). What differs:
   1. the last layer's A8 quantizer: the code quantizes the FC input (the pooled 64-vector); dfqbench quantizes
      the 8x8x64 map before the average pool (act_quant_18), i.e. it pools quantized values;
   2. reconstruction blocks at the ends: the code reconstructs the first conv alone (target: the conv output
      before BN; BN and ReLU belong to no block) and the FC alone; dfqbench's blocks are the first conv + BN +
      ReLU (target after the ReLU) and quantizer + pool + FC. The nine residual blocks are the same units;
   3. activation-range initialization: the code initializes each quantizer at its first forward, in the block's
      collection pass, on the first 32 calibration images with every element; dfqbench on the first 128 images
      (all of them when fewer) with at most 2^18 randomly sampled elements per quantizer. Inside a block the code's
      second quantizer (conv2's input) is initialized on conv1's output computed with the block in train mode:
      conv1's input QDrop-mixed (half the elements float) and its weights at the initial soft rounding (= the
      float weights clipped to the grid); dfqbench's on conv1's output from its quantized input with
      round-to-nearest weights;
   4. random streams: latents, generator init, swing shifts (np.random in the code, one torch.Generator in
      dfqbench), batch order and QDrop masks (torch.rand_like < 0.5 vs random bits) are drawn differently; the
      distributions are the same;
  Not algorithmic: the code computes gradients for the teacher's and the student's own parameters (never
  stepped; dfqbench freezes them: time only); dfqbench runs channels_last and computes x * (1 / s) where the code
  computes x / s (float rounding); the code collects block inputs in slices of 32, dfqbench of 128; the
  evaluation batch (64 shuffled vs 500) does not change a prediction. The losses (BN mean/std squared L2 / C,
  the input prior / N, the output error summed over channels, AdaRound regularizer from 20 % of the iterations
  with beta 20 -> 2), the optimizers, learning rates and schedules (Adam; ReduceLROnPlateau on z, x0.95 per 100
  steps on G; cosine on both steps, constant on the rounding) are the same on both sides.

Cost (1 thread, two busy cores shared): a distillation step of batch 128 takes ~1.0 s (the teacher's and the
generator's backward), a reconstruction iteration of batch 32 ~50 / 30 / 20 ms in the stage-1 / 2 / 3 blocks: at
dfqbench's CPU budget ~3.5 min of distillation + ~5.5 min of reconstruction + ~0.5 min of evaluation (FP32 check
included), i.e. ~10 min per official seed. Smoke check (no record under results/):
    python scripts/parity/genie.py --official /tmp/off-genie --seeds 0 --max-samples 2000 --method-overrides
        method.num_images=32 method.calib_batch_size=32 method.distill.iterations=20
        method.reconstruct.iterations=20 --out /tmp/genie-parity-smoke --csv /tmp/genie-parity-smoke/parity.csv

Writes results/parity/genie/[<tag>/]w<W>a<A>/official.json with one log per seed (official-s<seed>.log.txt); with
--dfqbench the dfqbench runs (dfqbench-brecq-s<seed>.record.json, dfqbench.log.txt) and the results/parity.csv row.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_REPO = "SamsungLabs/Genie"
DEFAULT_DEPS = Path("/tmp/genie-deps")
OUT = common.REPO / "results" / "parity" / "genie"
MODEL_NAME = "resnet18"  # main()'s model_name: a name its assert admits; get_model returns the rebuilt teacher
RECON_SLICE = 32  # reconstruct() slices the calibration set by a hard-coded 32 (cali_data.view(-1, 32, ...))
OFFICIAL_MODULES = ("main", "models", "distill", "reconstruct", "quantizer", "utils")
QUANT_NOTES = {
    "brecq": "dfqbench quant=brecq (C2: first conv W8 float input, 2nd layer input A8, FC W8A8, quantizers at every "
             "layer input shared with the residual identity; dfqbench's FC-input A8 quantizer sits before the "
             "average pool, the code's after it)",
}

# dfqbench method settings with no main() argument: the value the official code hard-codes
FIXED = {
    "calib_data": "genie",
    "distill.latent_dim": 256,
    "distill.g_decay": 0.95,
    "distill.patience": 100,
    "distill.min_lr": 1e-4,
    "distill.swing": True,
    "reconstruct.lr_round": 1e-3,
    "reconstruct.lr_act_scale": 4e-5,
    "reconstruct.lr_weight_scale": 1e-4,
    "reconstruct.learn_weight_scale": True,
    "reconstruct.learn_act_scale": True,
    "reconstruct.qdrop_p": 0.5,
    "reconstruct.warmup": 0.2,
    "reconstruct.beta_start": 20.0,
    "reconstruct.beta_end": 2.0,
    "reconstruct.init_act_ranges": True,
}


# --- the budget: dfqbench's method config -> main()'s arguments ---------------------------------------------------

def method_config(overrides: list[str]) -> dict:
    """dfqbench's resolved `method=genie` config with these (teacher and method.*) overrides."""
    from omegaconf import OmegaConf
    cfg = common.compose(["method=genie", *overrides])
    return OmegaConf.to_container(cfg.method, resolve=True)


def _get(method: dict, dotted: str):
    value = method
    for part in dotted.split("."):
        value = value[part]
    return value


def official_arguments(method: dict) -> dict:
    """main()'s budget arguments for a dfqbench `method=genie` config (the resolved `method` mapping). Raises
    ValueError where the config asks for something main() cannot take: a setting the code hard-codes set to
    another value, or numbers of images the code's reshapes cannot split."""
    for key, value in FIXED.items():
        ours = _get(method, key)
        same = ours == value if isinstance(value, (bool, str)) else (
            not isinstance(ours, bool) and isinstance(ours, (int, float)) and math.isclose(ours, value, rel_tol=1e-9))
        if not same:
            raise ValueError(f"method.{key}={ours!r}: the official code hard-codes {value!r} (no main() argument)")
    samples, distill_batch = int(method["num_images"]), int(method["calib_batch_size"])
    batch = int(method["reconstruct"]["batch_size"])
    if samples % distill_batch:
        raise ValueError(f"method.num_images={samples} is not a multiple of method.calib_batch_size={distill_batch}: "
                         f"distill_data makes num_images // batch ({samples // distill_batch} full batches)")
    if samples % RECON_SLICE:
        raise ValueError(f"method.num_images={samples} is not a multiple of {RECON_SLICE}: reconstruct() slices the "
                         f"calibration set by a hard-coded {RECON_SLICE}")
    if batch > samples or samples % batch:
        raise ValueError(f"method.num_images={samples} is not a multiple of method.reconstruct.batch_size={batch}: "
                         "reconstruct_block's batches hold len(x) / recon_batch images")
    return {
        "samples": samples,
        "distill_batch": distill_batch,
        "distill_iter": int(method["distill"]["iterations"]),
        "lr_g": float(method["distill"]["lr_z"]),  # main()'s lr_g is the latents' lr (distill_data's opt_z)
        "lr_z": float(method["distill"]["lr_g"]),  # main()'s lr_z is the generator's lr (distill_data's opt_g)
        "recon_iter": int(method["reconstruct"]["iterations"]),
        "recon_batch": samples // batch,  # batches per pass: each holds samples / recon_batch = batch images
        "round_weight": float(method["reconstruct"]["reg_weight"]),
    }


def budget_summary(kwargs: dict) -> str:
    return (f"{kwargs['samples']} images ({kwargs['samples'] // kwargs['distill_batch']} x {kwargs['distill_batch']}, "
            f"{kwargs['distill_iter']} distillation steps each), {kwargs['recon_iter']} reconstruction iterations per "
            f"block at batch {kwargs['samples'] // kwargs['recon_batch']}")


# --- what the child hands the official code -------------------------------------------------------------------------

def size_generator(cls: type, size: int) -> tuple:
    """Make `cls` (distill.Generator, which distill_data builds as Generator(latent_dim=...) with its image_size
    default of 224) build `size`-px images: its __init__'s image_size default 224 -> size. The class itself stays
    (its __init__ calls super(Generator, self): a subclass under the same name would recurse). Returns the old
    defaults."""
    import inspect
    init = cls.__init__
    params = list(inspect.signature(init).parameters.values())
    if len(params) < 2 or params[1].name != "image_size" or params[1].default != 224:
        raise SystemExit(f"{cls.__name__}.__init__ has no image_size=224 first parameter: the clone's Generator "
                         "is not the one this driver patches")
    old = init.__defaults__
    init.__defaults__ = (int(size),) + tuple(old[1:])
    return old


def cifar_resnet_layout(teacher) -> dict:
    """The stem width, the units (in, out, stride) per stage and the classes of a pytorchcv CIFARResNet of basic
    blocks; SystemExit for any other teacher."""
    from torch import nn
    feats = getattr(teacher, "features", None)
    names = [n for n, _ in feats.named_children()] if feats is not None else []
    if not names or names[0] != "init_block" or not isinstance(getattr(teacher, "output", None), nn.Linear):
        raise SystemExit(f"the Genie driver rebuilds pytorchcv CIFAR ResNets (features.init_block, stage<s>, output), "
                         f"not {type(teacher).__name__}")
    stem = getattr(feats.init_block, "conv", None)
    if not isinstance(stem, nn.Conv2d) or stem.kernel_size != (3, 3) or stem.stride != (1, 1) \
            or stem.bias is not None or not getattr(feats.init_block, "normalize", False) \
            or not getattr(feats.init_block, "activate", False):
        raise SystemExit("the Genie driver rebuilds basic-block CIFAR ResNets: a conv-BN-ReLU stem (3x3, stride 1, "
                         f"no bias) is expected, not {feats.init_block}")
    stages = []
    for name in names[1:]:
        stage = getattr(feats, name)
        if not name.startswith("stage"):
            if isinstance(stage, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                continue
            raise SystemExit(f"unexpected module features.{name} ({type(stage).__name__})")
        units = []
        for unit in stage.children():
            body = getattr(unit, "body", None)
            basic = (type(body).__name__ == "ResBlock" and isinstance(getattr(unit, "activ", None), nn.ReLU)
                     and getattr(body.conv1, "activate", False) and not getattr(body.conv2, "activate", True)
                     and getattr(body.conv1, "normalize", False) and getattr(body.conv2, "normalize", False))
            if not basic:  # conv-BN-ReLU, conv-BN, add, ReLU: the code's BasicBlock
                raise SystemExit("the Genie driver rebuilds basic-block CIFAR ResNets (ResUnit: a ResBlock body of "
                                 "conv-BN-ReLU and conv-BN, ReLU after the addition)")
            conv1 = body.conv1.conv
            units.append((conv1.in_channels, conv1.out_channels, conv1.stride[0]))
        stages.append(units)
    return {"stem": stem.out_channels, "in_channels": stem.in_channels, "stages": stages,
            "classes": teacher.output.out_features}


def official_resnet(teacher, resnet_module):
    """The teacher rebuilt in the layout of the code's models/resnet.py ResNet, of its own BasicBlock (modules
    registered in the same order, so that quantize_model's first/second/last quant op and reconstruct's units are
    the ones it finds on its ResNets), with the teacher's weights. Returns the float model in eval mode."""
    import torch
    from torch import nn
    layout = cifar_resnet_layout(teacher)
    rm = resnet_module

    class ResNet(nn.Module):  # models/resnet.py ResNet without max pool and layer4 (a CIFAR net has neither)
        def __init__(self):
            super().__init__()
            self.conv1 = rm.conv3x3(layout["in_channels"], layout["stem"])
            self.bn1 = nn.BatchNorm2d(layout["stem"])
            self.relu = nn.ReLU(inplace=True)
            self.num_stages = len(layout["stages"])
            for s, units in enumerate(layout["stages"], 1):
                blocks = []
                for cin, cout, stride in units:
                    down = None
                    if stride != 1 or cin != cout:
                        down = nn.Sequential(rm.conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
                    blocks.append(rm.BasicBlock(cin, cout, stride, down, norm_layer=nn.BatchNorm2d))
                setattr(self, f"layer{s}", nn.Sequential(*blocks))
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(layout["stages"][-1][-1][1], layout["classes"])

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            for s in range(1, self.num_stages + 1):
                x = getattr(self, f"layer{s}")(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    model = ResNet()
    model.load_state_dict(official_state_dict(teacher), strict=True)
    return model.eval()


def official_state_dict(teacher) -> dict:
    """The teacher's (pytorchcv CIFARResNet) state dict under the rebuilt ResNet's names."""
    import re
    out = {}
    for key, value in teacher.state_dict().items():
        new = key
        for pattern, repl in ((r"^features\.init_block\.conv\.", "conv1."), (r"^features\.init_block\.bn\.", "bn1."),
                              (r"^output\.", "fc.")):
            new = re.sub(pattern, repl, new)
        m = re.match(r"^features\.stage(\d+)\.unit(\d+)\.(.*)$", new)
        if m:
            stage, unit, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
            for pattern, repl in ((r"^body\.conv(\d)\.conv\.", r"conv\1."), (r"^body\.conv(\d)\.bn\.", r"bn\1."),
                                  (r"^identity_conv\.conv\.", "downsample.0."),
                                  (r"^identity_conv\.bn\.", "downsample.1.")):
                rest = re.sub(pattern, repl, rest)
            new = f"layer{stage}.{unit}.{rest}"
        if new == key:
            raise SystemExit(f"teacher parameter {key} has no place in the rebuilt ResNet")
        out[new] = value
    return out


# --- child: one official run ----------------------------------------------------------------------------------

def child(a) -> None:
    official = Path(a.official).resolve()
    import third_party
    third_party.purge_modules(OFFICIAL_MODULES)
    sys.path.insert(0, str(official))
    import numpy as np
    import torch
    from torch.utils.data import Dataset

    from dfqbench.evaluate import evaluate
    from dfqbench.runner import data_shape
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    kwargs = json.loads(a.main_kwargs)
    patches: list[str] = []
    try:
        import fire  # noqa: F401
    except ImportError:
        third_party.stub_module("fire", patches, "imported by main.py, used only under __main__; not installed "
                                "(pip install --target DIR fire, --deps DIR)")
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    import inspect
    if "verbose" not in inspect.signature(plateau.__init__).parameters:
        class Plateau(plateau):
            def __init__(self, optimizer, *args, verbose=False, **kw):
                super().__init__(optimizer, *args, **kw)

        torch.optim.lr_scheduler.ReduceLROnPlateau = Plateau
        patches.append("ReduceLROnPlateau(..., verbose=False): the argument dropped (removed in torch 2.7; it only "
                       "printed)")
    if device.type == "cpu":
        common.cpu_only_cuda_calls(device)
        patches.append(".cuda() -> cpu")

    cfg, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    teacher = loaded.model.eval().to(device)
    shape = tuple(data_shape(data, cfg))
    if shape[1] != shape[2]:
        raise SystemExit(f"the code's Generator makes square images; the teacher's input is {shape}")

    import distill
    import main as official_main
    import models
    import models.resnet
    import reconstruct as official_reconstruct
    import utils

    rebuilt = official_resnet(teacher.cpu(), models.resnet).to(device)
    teacher.to(device)
    x0, _ = next(iter(data.batches(min(500, data.num_samples), device)))
    with torch.no_grad():
        logit_diff = float((rebuilt(x0.contiguous()) - teacher(x0)).abs().max())
    if logit_diff > 1e-3:
        raise SystemExit(f"the rebuilt ResNet's logits differ from the teacher's by {logit_diff}")

    def get_model(name, pretrained=False, **kw):
        if name != MODEL_NAME:
            raise SystemExit(f"official main() asked for {name!r}, expected {MODEL_NAME!r}")
        return copy.deepcopy(rebuilt)

    official_main.get_model = models.get_model = get_model
    patches.append(f"main.get_model({MODEL_NAME!r}) -> the dfqbench teacher {cfg.model.name} "
                   f"({loaded.checkpoint or loaded.weights}, sha256 {loaded.sha256[:16]}) rebuilt in "
                   f"models/resnet.py's ResNet layout of the code's BasicBlock (3x3 stem, no max pool, "
                   f"{len(cifar_resnet_layout(teacher)['stages'])} stages; nn.Identity residual quantization), "
                   f"weights copied; logits max abs diff {logit_diff:.2e}")

    size_generator(distill.Generator, shape[1])
    patches.append(f"distill.Generator.__init__ default image_size=224 -> {shape[1]} (init_size {shape[1] // 4}: "
                   f"{shape[1]}x{shape[2]} images)")

    class Tensors(Dataset):
        def __init__(self, images, labels):
            self.images, self.labels = images, labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.images[i], int(self.labels[i])

    xs, ys = zip(*[(x.contiguous().cpu(), y.cpu()) for x, y in data.batches(1000, "cpu")])
    test_set = Tensors(torch.cat(xs), torch.cat(ys))

    def get_dataset(data_path, num_samples=None):
        if num_samples is not None:
            raise SystemExit("main() asked for training images (train_path): the parity run is zero-shot")
        return test_set

    official_main.get_dataset = utils.get_dataset = get_dataset
    patches.append(f"main.get_dataset(val_path) -> the dfqbench {cfg.dataset.name} test set ({data.num_samples} "
                   "images, the teacher's normalization)")
    loader_cls = torch.utils.data.DataLoader

    def data_loader(dataset, *args, **kw):
        kw.update(num_workers=0, pin_memory=False)
        return loader_cls(dataset, *args, **kw)

    torch.utils.data.DataLoader = data_loader
    patches.append("evaluate_classifier's DataLoader: num_workers 4 -> 0, pin_memory off (same images, shuffled as "
                   "the code does)")

    # the FP32 teacher through the code's own evaluation path
    evaluate_classifier = utils.evaluate_classifier
    t0 = time.perf_counter()
    fp32_official = 100.0 * evaluate_classifier(test_set, copy.deepcopy(rebuilt))
    fp32_check = {"official_path_top1": round(fp32_official, 4), "seconds": round(time.perf_counter() - t0, 3),
                  "dfqbench_top1": round(evaluate(teacher, data, 500, device)["top1"], 4),
                  "logits_max_abs_diff": logit_diff}
    print(f"FP32 check: the rebuilt teacher through utils.evaluate_classifier {fp32_official:.2f}, dfqbench "
          f"{fp32_check['dfqbench_top1']:.2f}", file=sys.stderr, flush=True)

    timings: dict = {"blocks": []}
    captured: dict = {}

    def timed(owner, name: str, keep) -> None:
        """owner.name -> the same function, its seconds and result handed to keep(seconds, result)."""
        fn = getattr(owner, name)

        def wrapper(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            keep(time.perf_counter() - t, out, *args)
            return out
        setattr(owner, name, wrapper)

    def keep_distill(secs, out, *args):
        timings["distill_s"], captured["shape"] = secs, list(out.shape)

    def keep_eval(secs, acc, dataset=None, model=None, *args):
        timings["eval_s"], captured["acc"], captured["qmodel"] = secs, acc, model

    timed(official_main, "distill_data", keep_distill)
    timed(official_reconstruct, "reconstruct_block", lambda secs, out, *args: timings["blocks"].append(round(secs, 3)))
    timed(official_main, "reconstruct", lambda secs, out, *args: timings.__setitem__("reconstruct_s", secs))
    official_main.evaluate_classifier = evaluate_classifier
    timed(official_main, "evaluate_classifier", keep_eval)

    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    random.seed(a.seed)
    patches.append(f"torch, numpy and random seeded with {a.seed} before main() (the code seeds nothing)")
    call = dict(val_path=f"<dfqbench {cfg.dataset.name} test set>", model_name=MODEL_NAME, bit_w=a.wbit,
                bit_a=a.abit, **kwargs)
    os.chdir(official)
    t0 = time.perf_counter()
    official_main.main(**call)
    wall = time.perf_counter() - t0
    n_blocks = len(timings["blocks"])
    steps = kwargs["samples"] // kwargs["distill_batch"] * kwargs["distill_iter"]
    result = {
        "top1": round(100.0 * captured["acc"], 4), "distill_s": round(timings["distill_s"], 3),
        "reconstruct_s": round(timings["reconstruct_s"], 3),
        "quantize_s": round(timings["distill_s"] + timings["reconstruct_s"], 3), "eval_s": round(timings["eval_s"], 3),
        "wall_s": round(wall, 3), "block_s": timings["blocks"], "blocks": n_blocks,
        "distill_s_per_step": round(timings["distill_s"] / max(steps, 1), 4),
        "reconstruct_s_per_iteration": round(timings["reconstruct_s"] / max(n_blocks * kwargs["recon_iter"], 1), 5),
        "images_shape": captured["shape"], "main_kwargs": call, "patches": patches, "fp32_check": fp32_check,
        "device": device.type, "threads": torch.get_num_threads(), "n_test": data.num_samples,
        "model": cfg.model.name, "arch": str(cfg.model.arch), "dataset": str(cfg.dataset.name),
        "act_bits": sorted({int(m.n_bits) for m in captured["qmodel"].modules()
                            if type(m).__name__ == "ActivationQuantizer"}),
    }
    print(json.dumps(result))


# --- parent: seeds, records, parity.csv -----------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="a clone of SamsungLabs/Genie")
    p.add_argument("--wbit", type=int, default=4)
    p.add_argument("--abit", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of both sides (default 0 1 2)")
    p.add_argument("--method-overrides", nargs="*", default=[],
                   help="dfqbench method.* overrides for BOTH sides (the budget; e.g. method.num_images=32 "
                        "method.calib_batch_size=32 method.distill.iterations=20 method.reconstruct.iterations=30)")
    common.add_teacher_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--deps", default=str(DEFAULT_DEPS) if DEFAULT_DEPS.is_dir() else "",
                   help="a folder with the official code's extra packages (fire), put on PYTHONPATH "
                        f"(default {DEFAULT_DEPS} when it exists)")
    p.add_argument("--dfqbench", action="store_true", help="also run dfqbench on the same cell, write parity.csv")
    p.add_argument("--quant", default="brecq", help="dfqbench preset for --dfqbench (default brecq: Genie's C2)")
    common.add_output_arguments(p, OUT, reuse_official=False)
    p.add_argument("--reuse-official", action="store_true",
                   help="take the official side from an existing official.json with the same seeds, commit, "
                        "teacher and budget")
    p.add_argument("--reuse-dfqbench", action="store_true",
                   help="take a dfqbench seed from its kept record (same overrides and dfqbench "
                        "source) instead of running it again")
    common.add_child_arguments(p)
    p.add_argument("--main-kwargs", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    bad = [o for o in a.method_overrides if not o.lstrip("+~").startswith("method.")]
    if bad:
        p.error(f"--method-overrides takes method.* overrides only, not {' '.join(bad)}")
    return a


def dfqbench_overrides(a, seed: int) -> list[str]:
    return ["method=genie", f"quant={a.quant}", f"wbit={a.wbit}", f"abit={a.abit}", f"seed={seed}",
            f"threads={a.threads}", *a.method_overrides, *common.teacher_overrides(a),
            *(["device=cpu"] if a.cpu else [])]


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.child:
        child(a)
        return
    repo, commit = common.clone_identity(Path(a.official), DEFAULT_REPO, "reconstruct.py")
    method = method_config([*common.teacher_overrides(a), *a.method_overrides])
    try:
        kwargs = official_arguments(method)
    except ValueError as exc:
        raise SystemExit(f"the dfqbench budget cannot be given to the official main(): {exc}") from None
    out = Path(a.out) / a.tag if a.tag else Path(a.out)
    cell = out / f"w{a.wbit}a{a.abit}"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [a.deps, os.environ.get("PYTHONPATH", "")])),
           "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    print(f"budget (dfqbench method=genie {' '.join(a.method_overrides) or '(conf/method/genie.yaml)'}): "
          f"{budget_summary(kwargs)}; official main({', '.join(f'{k}={v}' for k, v in kwargs.items())})", flush=True)

    def run_seed(seed: int) -> dict:
        args = common.child_args(a, seed, a.wbit, a.abit) + ["--main-kwargs", json.dumps(kwargs)]
        args += ["--cpu"] if a.cpu else []
        r = common.run_child(Path(__file__), args, cell / f"official-s{seed}.log.txt", env)
        fp = r["fp32_check"]
        print(f"official Genie W{a.wbit}A{a.abit} seed {seed}: top-1 {r['top1']:.2f}, distill {r['distill_s']:.0f} s "
              f"({r['distill_s_per_step']:.3f} s/step), reconstruct {r['reconstruct_s']:.0f} s "
              f"({r['reconstruct_s_per_iteration'] * 1000:.1f} ms/iteration, {r['blocks']} blocks); FP32 through the "
              f"code {fp['official_path_top1']:.2f} (dfqbench {fp['dfqbench_top1']:.2f})", flush=True)
        return r

    runs, reused = common.official_runs(cell, a, "Genie", commit, a.wbit, a.abit, run_seed,
                                        same={"main_kwargs": kwargs})
    official = common.official_summary(cell, a, "genie", "Genie", repo, commit, a.wbit, a.abit, runs, reused,
                                       main_kwargs=kwargs, budget=budget_summary(kwargs),
                                       method_overrides=a.method_overrides)
    if not a.dfqbench:
        return
    def overrides(seed: int) -> list[str]:
        return dfqbench_overrides(a, seed)
    ours, n_fresh = common.post_training_side(cell, a.quant, a.seeds, a.reuse_dfqbench, overrides,
                                              f"method=genie quant={a.quant} W{a.wbit}A{a.abit}",
                                              common.same_overrides(overrides))
    common.write_row(
        a.csv, method="genie" + (f"-{a.tag}" if a.tag else ""), quant=a.quant, schedule=" ".join(a.method_overrides),
        wbit=a.wbit, abit=a.abit, n_seeds=len(a.seeds), official=official, dfqbench=ours, repo=repo,
        commit=commit, run=runs[0],
        note=f"{QUANT_NOTES.get(a.quant, 'dfqbench quant=' + a.quant)}; budget {budget_summary(kwargs)} (dfqbench "
             f"method=genie {' '.join(a.method_overrides) or 'defaults'}; official main() arguments); official model = "
             f"the teacher rebuilt of the code's BasicBlock; seeds {' '.join(map(str, a.seeds))}; seconds = "
             f"distillation + reconstruction (dfqbench: the {n_fresh} seed(s) not read from its calibration cache); "
             f"{runs[0]['n_test']} test images; records {common.rel(cell)}")


if __name__ == "__main__":
    main()
