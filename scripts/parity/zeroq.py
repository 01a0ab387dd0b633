"""Parity driver for ZeroQ: the official code (amirgholami/ZeroQ, classification/) on a dfqbench teacher and test
set, beside `python -m dfqbench method=zeroq quant=gdfq` on the same cell.

    python scripts/parity/zeroq.py --official /path/to/ZeroQ-clone [--wbit 4 --abit 4] [--seeds 0 1 2] [--dfqbench]

The official side runs the clone's own classification/uniform_test.py (`--dataset cifar10 --model <arch>
--batch_size 32 --test_batch_size 128`, its defaults) in a child process per seed: getDistilData (one batch of 32
images, 500 Adam steps), quantize_model, update (one pass over the distilled batch: running min/max of every
QuantAct, quantizing as it goes), freeze_model, test. Run-time patches, and nothing else:
  - pytorchcv's get_model returns the dfqbench teacher (model=..., its checkpoint); uniform_test.py's --model
    choices do not hold preresnet20_cifar10: for another teacher the argument stays resnet20_cifar10 and get_model
    returns that teacher all the same (recorded);
  - utils.getTestData returns the dfqbench test set (same images, normalization and order as a dfqbench run);
  - the distilled batch's DataLoader runs with num_workers=0 instead of 32, after torch.manual_seed(seed): the
    official code seeds nothing, and in 32 worker processes the noise would come from their own seeds; with 0
    workers the noise of seed s is reproducible;
  - the bit-widths: the repository is W8A8 only (quantize_model builds Quant_Conv2d(weight_bit=8),
    Quant_Linear(weight_bit=8), QuantAct(activation_bit=8)); these three classes are replaced in
    utils.quantize_model by subclasses that pass --wbit / --abit instead of 8 (subclasses: freeze_model's
    `type(m) == QuantAct` still finds them);
  - without a GPU, .cuda() stays on the CPU (nn.DataParallel then calls the model directly);
  - pytorchcv >= 0.0.70 moved ConvBlock (imported, unused, by utils/quantize_model.py) to
    pytorchcv.models.common.conv: it is put back under pytorchcv.models.common.
The official code needs `progress` (its requirements.txt): pip install --target DIR progress and put DIR on
PYTHONPATH (the driver adds /tmp/parity-deps when it exists).
It reads the top-1 from test()'s return value (its "Final acc" line is in the log) and times getDistilData and
update. With --compare (default on) the child also (a) quantizes the teacher's weights with dfqbench
(quant=gdfq) and counts the weights that differ from the official Quant_Conv2d/Quant_Linear ones by more than
half a step, and (b) calibrates dfqbench's quantized model (method=zeroq quant=gdfq: calibrate_on_batches) on the
*official* distilled batch, and compares its activation ranges with the official QuantActs' (in forward order)
and its top-1 on the same test set: the quantizer side checked apart from the synthesis.

Writes results/parity/zeroq/[<tag>/]w<W>a<A>/official.json with one log per seed; with --dfqbench the dfqbench
runs (dfqbench-<quant>-s<seed>.record.json) and the results/parity.csv row.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_REPO = "amirgholami/ZeroQ"
OUT = common.REPO / "results" / "parity" / "zeroq"
ARCHS = ("resnet18", "resnet50", "inceptionv3", "mobilenetv2_w1", "shufflenet_g1_w1", "resnet20_cifar10",
         "sqnxt23_w2")  # uniform_test.py's --model choices
QUANT_NOTES = {
    "gdfq": "dfqbench quant=gdfq (C1): ZeroQ's own placement (weights per channel asymmetric min/max, first and "
            "last layer at W; activations per tensor after every ReLU, residual sums after their ReLU; image "
            "float; BN kept)",
}


# --- child: one official run ----------------------------------------------------------------------------------
# The stages below are shared with scripts/parity/dsg.py: DSG's code is a fork of ZeroQ's uniform_test.py.

class Child:
    """One official uniform_test.py run: the clone's folder on sys.path, the dfqbench teacher behind pytorchcv's
    get_model (and ConvBlock where pytorchcv moved it), the test set, and the patches made so far."""

    def __init__(self, a, folder: str, archs: tuple[str, ...]):
        self.official = Path(a.official).resolve() / folder
        sys.path.insert(0, str(self.official))
        import torch
        torch.set_num_threads(a.threads)
        self.a, self.device = a, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg, loaded, self.data = common.teacher_and_data(common.teacher_overrides(a))
        self.teacher = teacher = loaded.model.eval()
        self.arch = str(self.cfg.model.arch)
        self.model_arg = model_arg = self.arch if self.arch in archs else "resnet20_cifar10"
        self.patches = []

        import pytorchcv.model_provider as provider

        def get_model(name, pretrained=True, **kwargs):
            if name != model_arg:
                raise SystemExit(f"official uniform_test.py asked for {name!r}, expected {model_arg!r}")
            return copy.deepcopy(teacher)

        provider.get_model = get_model
        self.patches.append(f"pytorchcv get_model({model_arg}) -> the dfqbench teacher {self.arch} "
                            f"({loaded.checkpoint or loaded.weights}, sha256 {loaded.sha256[:16]})")
        import pytorchcv.models.common as ptcv_common
        if not hasattr(ptcv_common, "ConvBlock"):  # pytorchcv >= 0.0.70 moved it to .common.conv
            from pytorchcv.models.common.conv import ConvBlock
            ptcv_common.ConvBlock = ConvBlock
            self.patches.append("pytorchcv.models.common.ConvBlock -> pytorchcv.models.common.conv.ConvBlock "
                                "(imported by utils/quantize_model.py, unused on ResNets; moved in pytorchcv "
                                "0.0.70+)")
        self.timings, self.captured, self.lr_log = {}, {}, []

    def patch(self, utils) -> None:
        """The patches both clones need: the dfqbench test set behind utils.getTestData, .cuda() on a CPU machine,
        ReduceLROnPlateau without `verbose` (gone in torch >= 2.7), each scheduler kept to count its lr cuts."""
        import torch
        data, device, lr_log = self.data, self.device, self.lr_log
        utils.getTestData = lambda dataset="imagenet", batch_size=1024, **_: common.EvalLoader(data, batch_size, device)
        self.patches.append(f"utils.getTestData -> the dfqbench {self.cfg.dataset.name} test set "
                            f"({data.num_samples} images)")
        if device.type == "cpu":
            common.cpu_only_cuda_calls(device)
            self.patches.append(".cuda() -> cpu")

        class Plateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
            def __init__(self, optimizer, *args, verbose=False, **kwargs):
                super().__init__(optimizer, *args, **kwargs)
                self.cuts = 0
                lr_log.append(self)

            def step(self, metrics, *args, **kwargs):
                before = [g["lr"] for g in self.optimizer.param_groups]
                super().step(metrics, *args, **kwargs)
                self.cuts += int([g["lr"] for g in self.optimizer.param_groups] != before)

        torch.optim.lr_scheduler.ReduceLROnPlateau = Plateau
        self.patches.append("ReduceLROnPlateau(..., verbose=False): the argument dropped (removed in torch 2.7; it "
                            "only printed)")

    def instrument(self, distill_data, utils) -> None:
        """Time getDistilData and update, keep the distilled batches, the calibrated model and test()'s top-1."""
        timings, captured = self.timings, self.captured
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

    def run(self, argv: list[str], compare, **extra) -> None:
        """Run uniform_test.py with `argv` from the clone's folder and print the result (JSON): top-1, times, lr
        cuts, patches, `extra`, and with --compare `compare(official_model, batches, teacher, cfg, data, a,
        device)`."""
        import torch
        sys.argv = ["uniform_test.py", *argv]
        os.chdir(self.official)
        t0 = time.perf_counter()
        runpy.run_path(str(self.official / "uniform_test.py"), run_name="__main__")
        wall = time.perf_counter() - t0
        timings, captured, a = self.timings, self.captured, self.a
        result = {"top1": round(100.0 * captured["acc"], 4), "distill_s": round(timings["distill_s"], 3),
                  "update_s": round(timings["update_s"], 3),
                  "quantize_s": round(timings["distill_s"] + timings["update_s"], 3), "wall_s": round(wall, 3),
                  "lr_cuts": [p.cuts for p in self.lr_log],
                  "final_lr": [p.optimizer.param_groups[0]["lr"] for p in self.lr_log], "argv": sys.argv[1:],
                  "patches": self.patches, "device": self.device.type, "threads": torch.get_num_threads(),
                  "n_test": self.data.num_samples,
                  "model": self.cfg.model.name, "arch": self.arch, "dataset": str(self.cfg.dataset.name), **extra}
        if a.compare:
            try:
                result["check"] = compare(captured["qmodel"], captured["batches"], self.teacher, self.cfg, self.data,
                                          a, self.device)
            except Exception as exc:  # the check must not cost the official number
                result["check_error"] = repr(exc)
        print(json.dumps(result))


def child(a) -> None:
    c = Child(a, "classification", ARCHS)
    import torch
    patches = c.patches
    import utils  # the clone's classification/utils (its __init__ star-imports the submodules)
    data_utils = sys.modules["utils.data_utils"]
    qmodel = sys.modules["utils.quantize_model"]  # (utils.quantize_model is the function of the same name)
    c.patch(utils)

    loader_cls = data_utils.DataLoader

    def data_loader(dataset, **kwargs):
        kwargs["num_workers"] = 0
        return loader_cls(dataset, **kwargs)

    data_utils.DataLoader = data_loader
    patches.append(f"getRandomData's DataLoader num_workers 32 -> 0, after torch.manual_seed({a.seed})")

    wbit, abit = a.wbit, a.abit
    conv_cls, linear_cls, act_cls = qmodel.Quant_Conv2d, qmodel.Quant_Linear, qmodel.QuantAct

    class Conv(conv_cls):
        def __init__(self, weight_bit, full_precision_flag=False):
            super().__init__(wbit, full_precision_flag)

    class Linear(linear_cls):
        def __init__(self, weight_bit, full_precision_flag=False):
            super().__init__(wbit, full_precision_flag)

    class Act(act_cls):
        def __init__(self, activation_bit, full_precision_flag=False, running_stat=True):
            super().__init__(abit, full_precision_flag, running_stat)

    qmodel.Quant_Conv2d, qmodel.Quant_Linear, qmodel.QuantAct = Conv, Linear, Act
    patches.append(f"quantize_model: Quant_Conv2d/Quant_Linear weight_bit 8 -> {wbit}, QuantAct activation_bit "
                   f"8 -> {abit}")
    import distill_data
    c.instrument(distill_data, utils)
    torch.manual_seed(a.seed)
    c.run(["--dataset", str(c.cfg.dataset.name), "--model", c.model_arg, "--batch_size", str(a.batch_size),
           "--test_batch_size", str(a.test_batch_size)], compare)


def compare(official_model, batches, teacher, cfg, data, a, device, calibrate=None) -> dict:
    """dfqbench's weights (quant=gdfq) beside the official ones, and dfqbench's calibration (`calibrate(model,
    batches)`, default ZeroQ's calibrate_on_batches) on the official batch beside the official ranges and top-1.
    DSG's code is a fork of ZeroQ's (the same quant_modules): scripts/parity/dsg.py calls this too."""
    import torch
    from omegaconf import OmegaConf

    from dfqbench.evaluate import evaluate
    from dfqbench.quant import Convention, act_quantizers, quant_layers, quantize_model
    from dfqbench.quant.calibration.calibrate import calibrate_on_batches
    from utils.quantization_utils.quant_modules import Quant_Conv2d, Quant_Linear, QuantAct

    calibrate = calibrate or calibrate_on_batches

    conv_cfg = common.compose([*common.teacher_overrides(a), f"quant={a.check_quant}"]).quant
    convention = Convention.from_dict(OmegaConf.to_container(conv_cfg, resolve=True))
    ours = quantize_model(copy.deepcopy(teacher).to(device), convention, a.wbit, a.abit)
    calibrate(ours, [b.to(device) for b in batches])
    layers = quant_layers(ours)
    theirs = [m for m in official_model.modules() if isinstance(m, (Quant_Conv2d, Quant_Linear))]
    mismatched = total = 0
    for m in theirs:
        w = m.weight.detach()
        layer = next(lay for lay in layers if lay.weight.shape == w.shape and torch.equal(lay.weight, w))
        flat = w.reshape(w.shape[0], -1)
        lo, hi = flat.min(1).values.clamp(max=0), flat.max(1).values.clamp(min=0)
        step = ((hi - lo) / (2 ** a.wbit - 1)).reshape(-1, *[1] * (w.dim() - 1))
        with torch.no_grad():
            official_w = m.weight_function(m.weight, m.weight_bit, flat.min(1).values, flat.max(1).values)
        mismatched += int(((official_w - layer.quantized_weight()).abs() / step > 0.5).sum())
        total += w.numel()
    acts_theirs = [m for m in official_model.modules() if isinstance(m, QuantAct)]
    acts_ours = [q for q in act_quantizers(ours) if q.enabled]
    rel = [abs(float(t.x_max) - float(o.hi)) / max(abs(float(t.x_max)), 1e-12)
           for t, o in zip(acts_theirs, acts_ours)]
    lo_diff = max((abs(float(t.x_min) - float(o.lo)) for t, o in zip(acts_theirs, acts_ours)), default=0.0)
    top1 = evaluate(ours, data, batch_size=a.test_batch_size, device=device)["top1"]
    return {"layers": len(theirs), "dfqbench_layers": len(layers), "weights": total, "weights_differing": mismatched,
            "act_quantizers": len(acts_theirs), "dfqbench_act_quantizers": len(acts_ours),
            "act_range_max_rel_diff": max(rel, default=0.0), "act_lo_max_abs_diff": lo_diff,
            "act_range_rel_diff": [round(r, 6) for r in rel], "quant": a.check_quant,
            "dfqbench_on_official_batch_top1": top1}


# --- parent: seeds, records, parity.csv -----------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser, repo: str, seeds_help: str, batch_size: int, batch_help: str,
                  test_batch_size: int) -> None:
    """The command line of ZeroQ's driver, shared by DSG's (its code is a fork of ZeroQ's uniform_test.py)."""
    p.add_argument("--official", required=True, help=f"a clone of {repo}")
    p.add_argument("--wbit", type=int, default=4)
    p.add_argument("--abit", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help=seeds_help)
    common.add_teacher_arguments(p)
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"uniform_test.py --batch_size ({batch_help})")
    p.add_argument("--test-batch-size", type=int, default=test_batch_size, help="uniform_test.py --test_batch_size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dfqbench", action="store_true", help="also run dfqbench on the same cell, write parity.csv")
    p.add_argument("--quant", nargs="+", default=["gdfq"], help="dfqbench presets for --dfqbench")
    p.add_argument("--check-quant", default="gdfq", help="the preset of the --compare check")
    p.add_argument("--no-compare", dest="compare", action="store_false")
    p.add_argument("--reuse-dfqbench", action="store_true",
                   help="take a dfqbench seed from its kept record (same overrides and dfqbench "
                        "source) instead of running it again")
    common.add_child_arguments(p)


def official_side(a, script: Path, name: str, default_repo: str, marker: str, detail=lambda run: "") -> tuple:
    """The official seeds of a ZeroQ-style cell, each run in a child process of `script` (or reused):
    (repo, commit, cell folder, runs, reused). `detail(run)` adds to each seed's printed line."""
    repo, commit = common.clone_identity(Path(a.official), default_repo, marker)
    out = Path(a.out) / a.tag if a.tag else Path(a.out)
    cell = out / f"w{a.wbit}a{a.abit}"
    env = common.deps_env()

    def run_seed(seed: int) -> dict:
        args = common.child_args(a, seed, a.wbit, a.abit) + [
            "--batch-size", str(a.batch_size), "--test-batch-size", str(a.test_batch_size),
            "--check-quant", a.check_quant]
        args += [] if a.compare else ["--no-compare"]
        r = common.run_child(script, args, cell / f"official-s{seed}.log.txt", env)
        chk = r.get("check", {})
        print(f"official {name} W{a.wbit}A{a.abit} seed {seed}: top-1 {r['top1']:.2f}, quantize "
              f"{r['quantize_s']:.0f} s{detail(r)}"
              + (f"; dfqbench on the official batch {chk['dfqbench_on_official_batch_top1']:.2f}, weights differing "
                 f"{chk['weights_differing']}/{chk['weights']}, act range max rel diff "
                 f"{chk['act_range_max_rel_diff']:.2e}" if chk else ""), flush=True)
        return r

    runs, reused = common.official_runs(cell, a, name, commit, a.wbit, a.abit, run_seed)
    return repo, commit, cell, runs, reused


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p, DEFAULT_REPO, "noise seeds (default 0 1 2)", 32, "distilled batch", 128)
    common.add_output_arguments(p, OUT)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return
    repo, commit, cell, runs, reused = official_side(a, Path(__file__), "ZeroQ", DEFAULT_REPO,
                                                     "classification/uniform_test.py")
    official = common.official_summary(cell, a, "zeroq", "ZeroQ", repo, commit, a.wbit, a.abit, runs, reused,
                                       **common.batch_check_summary(runs))
    if not a.dfqbench:
        return
    for quant in a.quant:
        def overrides(seed: int, quant=quant) -> list[str]:
            return ["method=zeroq", f"quant={quant}", f"wbit={a.wbit}", f"abit={a.abit}", f"seed={seed}",
                    f"method.batch_size={a.batch_size}", f"threads={a.threads}", *common.teacher_overrides(a)]
        ours, n_fresh = common.post_training_side(cell, quant, a.seeds, a.reuse_dfqbench, overrides,
                                                  f"method=zeroq quant={quant} W{a.wbit}A{a.abit}",
                                                  common.same_overrides(overrides))
        common.write_row(
            a.csv, method="zeroq", quant=quant, wbit=a.wbit, abit=a.abit, n_seeds=len(a.seeds), official=official,
            dfqbench=ours, repo=repo, commit=commit, run=runs[0],
            note=f"{QUANT_NOTES.get(quant, 'dfqbench quant=' + quant)}; official bit-widths patched from W8A8; "
                 f"seeds {' '.join(map(str, a.seeds))} (noise); seconds = distillation + calibration (dfqbench: the "
                 f"{n_fresh} seed(s) not read from its calibration cache); {runs[0]['n_test']} test images; records "
                 f"{common.rel(cell)}")


if __name__ == "__main__":
    main()
