"""Parity driver for SQuant: the official code (clevercool/SQuant) on a dfqbench teacher and test set, beside
`python -m dfqbench method=squant quant=official_squant` on the same cell.

    python scripts/parity/squant.py --official /path/to/SQuant-clone [--bits 4 6 8] [--seeds 0 1 2] [--dfqbench]

The official side runs the clone's own main.py (`--mode squant -wb W -ab A -s S`, S from its run.sh: 12 / 14 / 25
at 4 / 6 / 8 bit; batch 256 for the noise and the test loader) in a child process per (bit-width, seed), with
these run-time patches and nothing else:
  - pytorchcv's get_model returns the dfqbench teacher (model=..., its checkpoint), then seeds torch with the noise
    seed: main.py draws its uniform-noise batch (torch.rand) right after get_model;
  - that batch is drawn at the data set's image size (main.py hard-codes 3x224x224 for every non-Inception
    model, which a CIFAR network cannot read), values U(0, 1) unnormalized as in main.py;
  - dataloader.getTestData returns the dfqbench test set (same images, normalization and order as a dfqbench
    run; dataset.max_samples slices it the same way);
  - without a GPU, .cuda() moves to the CPU, and the flips run in the clone's PyTorch fallback
    (squant_function.py, what quant_modules.py imports when the CUDA kernel is not built).
It reads the top-1 from main.py's own "Final accuracy" log line and the quantization seconds from its "SQuant
Start!" / "SQuant has Done!" lines. With --compare (default on) the child also quantizes the same teacher with
dfqbench (method=squant, quant=official_squant, same noise seed) and records how many weights differ, in grid
steps, and the largest relative difference of the activation ranges: a layer-by-layer check beside the top-1.

Writes results/parity/squant/w<W>a<A>/official.json (per seed: top-1, seconds, checks, patches) with one log per
seed, and with --dfqbench the dfqbench runs (dfqbench-<quant>-s<seed>/record.json) and the results/parity.csv rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_REPO = "clevercool/SQuant"
SIGMAS = {4: 12.0, 6: 14.0, 8: 25.0}  # run.sh: -s per bit-width (the same for every model)
OUT = common.REPO / "results" / "parity" / "squant"
QUANT_NOTES = {  # what the dfqbench side of a row is, per preset
    "official_squant": "dfqbench with the official placement (each conv/linear input, identities float, pooled FC "
                       "input A8)",
    "squant": "dfqbench's C3 placement (one layer-input quantizer shared with the residual identity, the FC's A8 "
              "quantizer before the pool)",
}


# --- child: one official run ----------------------------------------------------------------------------------

def child(a) -> None:
    official = Path(a.official).resolve()
    sys.path.insert(0, str(official))
    import torch

    from dfqbench.runner import data_shape
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    input_shape = tuple(data_shape(data, cfg))
    teacher = loaded.model.eval()
    arch = str(cfg.model.arch)
    patches = []

    import pytorchcv.model_provider as provider

    def get_model(name, pretrained=True, **kwargs):
        if name != arch:
            raise SystemExit(f"official main.py asked for {name!r}, the dfqbench teacher is {arch!r}")
        torch.manual_seed(a.seed)  # main.py's next call is torch.rand: the noise batch of this seed
        return copy.deepcopy(teacher)

    provider.get_model = get_model
    patches.append(f"pytorchcv get_model({arch}) -> the dfqbench teacher ({loaded.checkpoint or loaded.weights}, "
                   f"sha256 {loaded.sha256[:16]}), then torch.manual_seed({a.seed})")

    import dataloader
    dataloader.getTestData = lambda dataset="", batch_size=256, path="", for_inception=False: common.EvalLoader(
        data, batch_size, device)
    patches.append(f"dataloader.getTestData -> the dfqbench {cfg.dataset.name} test set ({data.num_samples} images)")

    rand = torch.rand

    def noise_rand(*size, **kwargs):
        shape = list(size[0]) if len(size) == 1 and isinstance(size[0], (list, tuple)) else list(size)
        if len(shape) == 4 and tuple(shape[1:]) == (3, 224, 224) and tuple(shape[1:]) != input_shape:
            shape = [shape[0], *input_shape]
        return rand(shape, **kwargs)

    torch.rand = noise_rand
    patches.append(f"torch.rand([B, 3, 224, 224]) -> torch.rand([B, {', '.join(map(str, input_shape))}])")
    if device.type == "cpu":
        common.cpu_only_cuda_calls(device)
        patches.append(".cuda() -> cpu")

    events: list[tuple[float, str]] = []

    class Capture(logging.Handler):
        def emit(self, record):
            events.append((time.perf_counter(), record.getMessage()))

    capture = Capture()
    basic = logging.basicConfig

    def basic_config(**kwargs):
        basic(**kwargs)
        root = logging.getLogger()
        if capture not in root.handlers:
            root.addHandler(capture)

    logging.basicConfig = basic_config
    sigma = a.sigma if a.sigma is not None else SIGMAS.get(a.abit)
    if sigma is None:
        raise SystemExit(f"no -s for A{a.abit} in run.sh ({SIGMAS}); pass --sigma")
    sys.argv = ["main.py", "--model", arch, "--dataset", str(cfg.dataset.name), "--mode", "squant",
                "-wb", str(a.wbit), "-ab", str(a.abit), "-s", str(sigma), "--batch_size", str(a.batch_size)]
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(scratch)  # main.py writes squant_log/ into its working directory
    t0 = time.perf_counter()
    g = runpy.run_path(str(official / "main.py"), run_name="__main__")
    wall = time.perf_counter() - t0
    msgs = dict((m, t) for t, m in events)
    start, done = msgs.get("SQuant Start!"), msgs.get("SQuant has Done!")
    final = [m for _, m in events if m.startswith("Final accuracy:")]
    if not final:
        raise SystemExit("no 'Final accuracy' line in the official log")
    logs = sorted(scratch.glob("squant_log/**/squant.log"))
    result = {"top1": float(final[-1].split(":")[1]), "quantize_s": round(done - start, 4) if start and done else None,
              "wall_s": round(wall, 3), "argv": sys.argv[1:], "patches": patches, "device": device.type,
              "threads": torch.get_num_threads(), "official_log": str(logs[-1]) if logs else None,
              "n_test": data.num_samples, "model": cfg.model.name, "dataset": str(cfg.dataset.name)}
    if a.compare:
        result["check"] = compare(g["quantized_model"], teacher, cfg, a, input_shape, device)
    print(json.dumps(result))


def compare(official_model, teacher, cfg, a, input_shape, device) -> dict:
    """The official quantized weights and activation ranges beside dfqbench's (method=squant
    quant=official_squant) on the same teacher and noise seed."""
    import torch
    from omegaconf import OmegaConf

    from dfqbench.methods.base import QuantContext
    from dfqbench.methods.squant import SQuant
    from dfqbench.quant import ActQuantizer, Convention, act_quantizers, quant_layers
    from quant_modules import Conv2dQuantizer, LinearQuantizer

    conv_cfg = common.compose([*common.teacher_overrides(a), "quant=official_squant"]).quant
    convention = Convention.from_dict(OmegaConf.to_container(conv_cfg, resolve=True))
    method_cfg = OmegaConf.to_container(common.compose(["method=squant"]).method, resolve=True)
    method_cfg.pop("_target_")
    method = SQuant(**{**method_cfg, "noise_seed": a.seed, "batch_size": a.batch_size})
    ctx = QuantContext(convention, a.wbit, a.abit, 0, device, input_shape, int(cfg.dataset.num_classes),
                       progress=False)
    ours = method.quantize(copy.deepcopy(teacher).to(device), ctx)
    theirs = [m for m in official_model.modules() if isinstance(m, (Conv2dQuantizer, LinearQuantizer))]
    # pair the layers by their float weight (module orders differ: main.py's follows __init__, ours the forward)
    feeds = {}  # our layer module -> the activation quantizer right in front of it
    for node in ours.graph.nodes:
        src = node.args[0] if node.op == "call_module" and node.args else None
        if isinstance(src, torch.fx.Node) and src.op == "call_module":
            mod, q = ours.get_submodule(node.target), ours.get_submodule(src.target)
            if isinstance(q, ActQuantizer):
                feeds[mod] = q
    layers = quant_layers(ours)
    mismatched = total = 0
    rel = []
    for m in theirs:
        w = m.weight.detach()
        layer = next(lay for lay in layers if lay.weight.shape == w.shape and torch.equal(lay.weight, w))
        flat = w.reshape(w.shape[0], -1)
        step = ((flat.max(1).values - flat.min(1).values) / (2 ** a.wbit - 1)).reshape(-1, *[1] * (w.dim() - 1))
        diff = (m.quant_weight.quant_weight_tensor - layer.quantized_weight()).abs() / step
        mismatched += int((diff > 0.5).sum())
        total += w.numel()
        on = m.quant_input.is_enable and m.quant_input.is_enable_input
        q = feeds.get(layer)
        if on != (q is not None and q.enabled):
            raise SystemExit(f"{m.quant_input.name}: input quantized {on} officially, not so in dfqbench")
        if on:
            x, y = float(m.quant_input.x_max), float(q.hi)
            rel.append(abs(x - y) / max(abs(x), 1e-12))
            if m.quant_input.bit.item() != q.bits or float(m.quant_input.x_min) != float(q.lo):
                raise SystemExit(f"{m.quant_input.name}: bits/lo {m.quant_input.bit.item()}/"
                                 f"{float(m.quant_input.x_min)} officially, {q.bits}/{float(q.lo)} in dfqbench")
    ranges_theirs, ranges_ours = rel, [q for q in act_quantizers(ours) if q.enabled]
    return {"layers": len(theirs), "dfqbench_layers": len(layers), "weights": total,
            "weights_differing": mismatched, "act_quantizers": len(ranges_theirs),
            "dfqbench_act_quantizers": len(ranges_ours), "act_range_max_rel_diff": max(rel, default=0.0),
            "act_range_rel_diff": [round(r, 6) for r in rel]}


# --- parent: seeds x bit-widths, records, parity.csv ----------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="a clone of clevercool/SQuant")
    p.add_argument("--bits", type=int, nargs="+", default=[4], help="W=A bit-widths (default: 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="noise seeds (default: 0 1 2)")
    common.add_teacher_arguments(p, teacher_help="model.arch=..., model.checkpoint=...")
    p.add_argument("--batch-size", type=int, default=256, help="main.py --batch_size (noise batch, test loader)")
    p.add_argument("--sigma", type=float, default=None, help="main.py -s (default: run.sh's for the bit-width)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dfqbench", action="store_true", help="also run dfqbench on the same cells, write parity.csv")
    p.add_argument("--quant", nargs="+", default=["official_squant"], help="dfqbench presets for --dfqbench")
    common.add_output_arguments(p, OUT)
    p.add_argument("--no-compare", dest="compare", action="store_false")
    # child mode (one official run; internal)
    common.add_child_arguments(p, bits=4, scratch=True)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return
    repo, commit = common.clone_identity(Path(a.official), DEFAULT_REPO, "quant_modules.py")
    out = Path(a.out) / a.tag if a.tag else Path(a.out)
    for bits in a.bits:
        cell = out / f"w{bits}a{bits}"

        def run_seed(seed: int, bits=bits, cell=cell) -> dict:
            scratch = Path("/tmp") / f"parity-squant-{os.getpid()}-w{bits}-s{seed}"
            args = common.child_args(a, seed, bits, bits) + ["--batch-size", str(a.batch_size),
                                                             "--scratch", str(scratch)]
            args += ["--sigma", str(a.sigma)] if a.sigma is not None else []
            args += [] if a.compare else ["--no-compare"]
            r = common.run_child(Path(__file__), args, cell / f"official-s{seed}.log.txt")
            if r.get("official_log"):  # main.py's own log beside the driver's
                (cell / f"official-s{seed}.squant.log.txt").write_text(Path(r["official_log"]).read_text())
                r["official_log"] = common.rel(cell / f"official-s{seed}.squant.log.txt")
            print(f"official SQuant W{bits}A{bits} seed {seed}: top-1 {r['top1']:.2f}, quantize {r['quantize_s']} s, "
                  f"wall {r['wall_s']:.0f} s" + (f", weights differing {r['check']['weights_differing']}"
                                                 f"/{r['check']['weights']}" if 'check' in r else ""), flush=True)
            return r

        runs, reused = common.official_runs(cell, a, "SQuant", commit, bits, bits, run_seed)
        official = common.official_summary(cell, a, "squant", "SQuant", repo, commit, bits, bits, runs, reused)
        if not a.dfqbench:
            continue
        for quant in a.quant:
            def overrides(seed: int, quant=quant, bits=bits) -> list[str]:
                return ["method=squant", f"quant={quant}", f"wbit={bits}", f"abit={bits}", f"method.noise_seed={seed}",
                        f"method.batch_size={a.batch_size}", f"threads={a.threads}", *common.teacher_overrides(a)]
            ours, _ = common.post_training_side(cell, quant, a.seeds, False, overrides,
                                                f"method=squant quant={quant} W{bits}A{bits}")
            common.write_row(
                a.csv, method="squant", quant=quant, wbit=bits, abit=bits, n_seeds=len(a.seeds), official=official,
                dfqbench=ours, repo=repo, commit=commit, run=runs[0],
                note=f"{QUANT_NOTES.get(quant, 'dfqbench quant=' + quant)}; noise seeds "
                     f"{' '.join(map(str, a.seeds))}; seconds = quantization only (weights + noise pass); "
                     f"{runs[0]['n_test']} test images; records {common.rel(cell)}")


if __name__ == "__main__":
    main()
