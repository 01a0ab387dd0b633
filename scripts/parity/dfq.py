"""Parity driver for DFQ against the UNOFFICIAL jakc4103/DFQ code (Nagel et al. published no code; this PyTorch
re-implementation is the one the community uses), on a dfqbench teacher and test set, beside
`python -m dfqbench method=dfq quant=official_dfq` on the same cell.

    python scripts/parity/dfq.py --official /path/to/DFQ-clone [--bits 4] [--seeds 0 1 2] [--dfqbench]

The clone needs its PyTransformer submodule (ricky40403/PyTransformer @ 8052a4f: `git submodule update --init`, or
a clone of it at <clone>/PyTransformer) and graphviz, pydot, pyparsing, tensorboardX (main_cls.py imports it through
ZeroQ/distill_data.py -> improve_dfq.py) and scipy (pip install --target DIR --no-deps, on PYTHONPATH).

The official side runs the clone's own main_cls.py with the README's best data-free flow
`--quantize --relu --equalize --absorption --correction` (ReLU + LE + BC; no --distill_range, no images) at
`--bits_weight W --bits_activation A --bits_bias 16` (the README's Int8** rows: 16-bit bias) in a child process
per seed, with these run-time patches and nothing else:
  - mobilenet_v2(...) returns the dfqbench teacher (model=..., its checkpoint) (main_cls.py builds MobileNetV2 or,
    with --resnet, torchvision's ResNet-18);
  - the tracing input torch.ones((4, 3, 224, 224)) is drawn at the data set's image size;
  - inference_all's ImageFolder/DataLoader (a hard-coded ImageNet path, 4 workers) read the dfqbench test set
    (same images, normalization and order as a dfqbench run), batch 256 as in the code;
  - the code is 8-bit oriented in two places the command line does not reach, patched to the run's bit-widths:
    bias_correction measures the weight quantization error at 8 bits (`_quantize_error(weight, 8, ...)`) -> W bits;
    the quantizers of the residual additions' operands are QuantMeasure(num_bits=8) -> A bits; set_layer_bits
    builds QuantMeasure(bits_activation), whose first parameter is update_stat (the layer inputs stayed at 8 bits
    and their ranges widened on the test batches) -> QuantMeasure(num_bits=A);
  - set_quant_minmax gives the image quantizer ImageNet's normalized range [-2.1179, 2.64] (a constant of its
    data preprocessing) -> the dfqbench data set's ((0 - mean) / std, (1 - mean) / std) over channels;
  - environment: collections.Mapping (gone in Python 3.10; PyTransformer), pytorchcv's ConvBlock at its old import
    path (ZeroQ/utils, imported by main_cls.py, unused here); without a GPU, .cuda() stays on the CPU.
Ablations (--add-bits, --clip-inputs-at-zero, --ranges-from-dfqbench, --zero-exact-grids, --weights-from-dfqbench,
--bias-correction-unpropagated, ..., with --tag ablation-...) change the code once more at run time to measure the
causes of a gap; their results go into the parity row's note, and one run over the same seeds that agrees with a
dfqbench preset gets its own row (method dfq-<tag>), which results/parity.md names as the measured cause of that
preset's gap. Every run compares the code's weights and biases with dfqbench's (method=dfq quant=official_dfq) by
layer name before its bias correction and before it quantizes them (`weights_vs_dfqbench` in official.json).
The flow is data-free and deterministic: the seed changes nothing on either side (both run 3 seeds to say so; no
image of any split is read before the test).

Writes results/parity/dfq/w<W>a<A>/official.json with one log per seed, and with --dfqbench the dfqbench runs
(dfqbench-<quant>-s<seed>.record.json) and the results/parity.csv rows.
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
from dfqbench.results.parity import agrees  # noqa: E402

DEFAULT_REPO = "jakc4103/DFQ"
OUT = common.REPO / "results" / "parity" / "dfq"
FLAGS = ["--quantize", "--relu", "--equalize", "--absorption", "--correction"]
QUANT_NOTES = {
    "official_dfq": "dfqbench with the unofficial code's placement (every conv/linear input quantized on its own, "
                    "the image too, both operands of every residual addition (act.add_inputs), per-tensor "
                    "asymmetric weights, BN folded; not modelled: the code's residual-stream ranges, its grids "
                    "anchored at the minimum and its bias correction's expected inputs on the residual stream, "
                    "measured by the ablations)",
    "dfq": "dfqbench's DFQ preset (one layer-input quantizer shared with the identity, image float)",
}
# The on/off ablations of the code: official.json field (= the flag, dashes for underscores) -> (--help, what the
# parity note says it changed)
ABLATIONS = {
    "clip_inputs_at_zero": (
        "ablation: clip every conv/linear input range (not the image's) at 0 (the code leaves negative minima after "
        "add + ReLU); for networks whose layer inputs are ReLU outputs only", "layer-input ranges clipped at 0"),
    "clip_add_operands_at_zero": (
        "ablation: clip at 0 each residual addition's operand range that reads a ReLU output (the code leaves it at "
        "mean -/+ 6 std of the sum before the ReLU)", "operands reading a ReLU clipped at 0"),
    "ranges_from_dfqbench": (
        "ablation: set every activation range of the code to dfqbench's (method=dfq quant=official_dfq on the same "
        "teacher and bits)", "every activation range dfqbench's"),
    "zero_exact_grids": (
        "ablation: asymmetric grids hold 0 exactly (zero point rounded, as dfqbench's) where the code anchors them "
        "at the range's minimum", "grids holding 0 exactly"),
    "bias_correction_unpropagated": (
        "ablation: the code's bias correction without adding each correction to the next BatchNorm's statistics "
        "(which later layers' expected inputs read)", "bias corrections not added to the next BatchNorm's statistics"),
    "weights_from_dfqbench": (
        "ablation: set every conv/linear weight and bias of the code, before it quantizes them, to dfqbench's (after "
        "its equalization, absorption and bias correction)",
        "dfqbench's weights and biases (the code's weights equal them; its bias corrections differ)"),
}


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


# --- child: one official run ----------------------------------------------------------------------------------

def child(a) -> None:
    official = Path(a.official).resolve()
    if not (official / "PyTransformer" / "transformers" / "torchTransformer.py").is_file():
        raise SystemExit(f"{official}/PyTransformer is empty: `git submodule update --init` (ricky40403/PyTransformer)")
    sys.path.insert(0, str(official))
    import numpy as np
    import torch
    import torch.utils.data

    from dfqbench.runner import data_shape
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    device = torch.device("cpu")
    cfg, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    input_shape = tuple(data_shape(data, cfg))
    teacher = loaded.model.eval()
    patches = []
    os.chdir(official)

    import collections
    import collections.abc
    if not hasattr(collections, "Mapping"):  # PyTransformer's dict_merge (Python < 3.10)
        collections.Mapping = collections.abc.Mapping
        patches.append("collections.Mapping -> collections.abc.Mapping (removed in Python 3.10)")
    import pytorchcv.models.common as pcv_common  # ZeroQ/ (imported, unused without --distill_range) reads
    from pytorchcv.models.common.conv import ConvBlock  # pytorchcv < 0.0.68's flat module layout
    if not hasattr(pcv_common, "ConvBlock"):
        pcv_common.ConvBlock = ConvBlock
        patches.append("pytorchcv.models.common.ConvBlock -> pytorchcv.models.common.conv.ConvBlock (ZeroQ/utils "
                       "imports it from the old layout; ZeroQ is not used without --distill_range)")

    import modeling.classification.MobileNetV2 as mnv2
    mnv2.mobilenet_v2 = lambda *args, **kwargs: copy.deepcopy(teacher)
    patches.append(f"mobilenet_v2(...) -> the dfqbench teacher {cfg.model.name} ({loaded.checkpoint or loaded.weights}"
                   f", sha256 {loaded.sha256[:16]})")

    ones = torch.ones

    def ones_at_size(*size, **kwargs):
        shape = list(size[0]) if len(size) == 1 and isinstance(size[0], (list, tuple)) else list(size)
        if len(shape) == 4 and tuple(shape[1:]) == (3, 224, 224) and tuple(shape[1:]) != input_shape:
            shape = [shape[0], *input_shape]
        return ones(shape, **kwargs)

    torch.ones = ones_at_size
    patches.append(f"torch.ones((4, 3, 224, 224)) -> torch.ones((4, {', '.join(map(str, input_shape))}))")

    import torchvision.datasets

    class TestSet:
        pass

    torchvision.datasets.ImageFolder = lambda *args, **kwargs: TestSet()
    real_loader = torch.utils.data.DataLoader

    def loader(ds, *args, batch_size=1, **kwargs):
        if isinstance(ds, TestSet):
            return common.EvalLoader(data, batch_size, device)
        return real_loader(ds, *args, batch_size=batch_size, **kwargs)

    torch.utils.data.DataLoader = loader
    patches.append(f"inference_all: ImageFolder + DataLoader -> the dfqbench {cfg.dataset.name} test set "
                   f"({data.num_samples} images, the code's batch 256)")

    import dfq
    quantize_error = dfq._quantize_error

    def quantize_error_at_w(param, num_bits=8, reduction="sum", signed=False):
        return quantize_error(param, a.wbit, reduction, signed)

    dfq._quantize_error = quantize_error_at_w
    patches.append(f"dfq.bias_correction: _quantize_error(weight, 8, ...) -> {a.wbit} bits (the run's weight bits)")

    import utils.layer_transform as lt
    import utils.quantize as uq
    measure = uq.QuantMeasure

    add_bits = a.add_bits or a.abit

    class QuantMeasureAtA(measure):
        def __init__(self, update_stat=False, num_bits=8, momentum=0.1):
            super().__init__(update_stat, add_bits if num_bits == 8 else num_bits, momentum)

    set_layer_bits = uq.set_layer_bits

    def set_layer_bits_at_a(graph, bits_weight=8, bits_activation=8, bits_bias=16, targ_type=None):
        set_layer_bits(graph, bits_weight, bits_activation, bits_bias, targ_type)
        for idx in graph:  # QuantMeasure(bits_activation) passed the bits as update_stat: num_bits stayed 8
            if type(graph[idx]) in targ_type and hasattr(graph[idx], "quant"):
                graph[idx].quant = measure(num_bits=bits_activation)

    uq.set_layer_bits = set_layer_bits_at_a
    patches.append(f"set_layer_bits: QuantMeasure(bits_activation) -> QuantMeasure(num_bits=bits_activation) (the "
                   f"positional argument is update_stat: the layer inputs stayed at 8 bits and their ranges kept "
                   f"growing on the test batches)")
    lt.QuantMeasure = QuantMeasureAtA  # switch_layers' QuantMeasure(num_bits=8) for the tensor ops (additions)
    patches.append(f"switch_layers: QuantMeasure(num_bits=8) of the tensor ops (residual additions) -> {add_bits} bits"
                   + ("" if add_bits == a.abit else " (an ablation: not the run's abit)"))

    norm = cfg.model.normalize or cfg.dataset
    lo = min((0.0 - m) / s for m, s in zip(norm.mean, norm.std))
    hi = max((1.0 - m) / s for m, s in zip(norm.mean, norm.std))
    set_quant_minmax = lt.set_quant_minmax
    image_quantizers = []
    traced = {}

    def set_quant_minmax_for_data(graph, bottoms, *args, **kwargs):
        traced.update(graph=graph, bottoms=bottoms)
        out = set_quant_minmax(graph, bottoms, *args, **kwargs)
        for idx, layer in graph.items():
            if bottoms.get(idx) == ["Data"] and hasattr(layer, "quant"):
                layer.quant.running_min.fill_(lo)
                layer.quant.running_max.fill_(hi)
                image_quantizers.append(str(idx))
            elif a.clip_inputs_at_zero and hasattr(layer, "quant") and float(layer.quant.running_min) < 0:
                layer.quant.running_min.fill_(0.0)  # ablation: every non-image layer input reads a ReLU output
        return out

    lt.set_quant_minmax = set_quant_minmax_for_data
    patches.append(f"set_quant_minmax: the image quantizer's ImageNet range [-2.11790393, 2.64] -> the "
                   f"{cfg.dataset.name} normalization's [{lo:.6f}, {hi:.6f}]")
    if a.clip_inputs_at_zero:
        patches.append("ablation: every other layer-input range clipped at 0 (they all read ReLU outputs)")
    ours = dfqbench_quantized(teacher, a, input_shape)  # the reference of the weight comparison and ablations
    ours_uncorrected = dfqbench_quantized(teacher, a, input_shape, correct_bias=False)
    dfqbench_ranges = ranges_by_code_name(ours) if a.ranges_from_dfqbench else {}
    if dfqbench_ranges:
        patches.append(f"ablation: all {len(dfqbench_ranges)} activation ranges replaced by dfqbench's (method=dfq "
                       f"quant=official_dfq on the same teacher), matched by layer name and addition operand")
    if a.zero_exact_grids:
        zero_exact_grids(uq)
        patches.append("ablation: UniformQuantize's asymmetric grids hold 0 exactly (zero point rounded, the grid "
                       "shifted by under half a step, as dfqbench's; the code anchors the grid at the minimum)")
    merge_batchnorm = lt.merge_batchnorm

    def merge_batchnorm_seen(model, *args, **kwargs):
        traced["model"] = model
        return merge_batchnorm(model, *args, **kwargs)

    lt.merge_batchnorm = merge_batchnorm_seen
    quantize_targ_layer = lt.quantize_targ_layer
    weight_check = {}

    def bias_correction_compared(*args, **kwargs):
        weight_check["before_bias_correction"] = compare_weights(traced["model"], ours_uncorrected)
        return bias_correction(*args, **kwargs)

    def quantize_targ_layer_compared(graph, *args, **kwargs):
        weight_check["before_quantization"] = compare_weights(traced["model"], ours)
        if a.weights_from_dfqbench:
            set_weights(traced["model"], ours)
        return quantize_targ_layer(graph, *args, **kwargs)

    lt.quantize_targ_layer = quantize_targ_layer_compared
    bias_correction = without_correction_propagation(dfq) if a.bias_correction_unpropagated else dfq.bias_correction
    dfq.bias_correction = bias_correction_compared
    if a.bias_correction_unpropagated:
        patches.append("ablation: bias_correction no longer adds each layer's correction to the next BatchNorm's "
                       "statistics (`fake_bias.add_(bias_prev)`), which the expected inputs of later layers read")
    if a.weights_from_dfqbench:
        patches.append("ablation: every conv/linear weight and bias, before the code quantizes them, replaced by "
                       "dfqbench's (method=dfq quant=official_dfq: after its equalization, absorption and bias "
                       "correction, before weight quantization), matched by layer name")
    clipped_operands = []
    if a.clip_add_operands_at_zero:
        patches.append("ablation: each residual addition's operand quantizer that reads a ReLU output clipped at 0")
    common.cpu_only_cuda_calls(device)
    torch.cuda.empty_cache = lambda: None
    patches.append(".cuda() -> cpu")

    import builtins
    printed = []
    real_print = builtins.print

    def capture(*args, **kwargs):
        printed.append((time.perf_counter(), " ".join(str(x) for x in args)))
        real_print(*args, **kwargs)

    builtins.print = capture
    sys.argv = ["main_cls.py", *FLAGS, "--bits_weight", str(a.wbit), "--bits_activation", str(a.abit),
                "--bits_bias", str(a.bits_bias)]
    t0 = time.perf_counter()
    g = runpy.run_path(str(official / "main_cls.py"), run_name="__not_main__")
    model_box = {}
    inference_all = g["inference_all"]

    def timed_inference(model):
        if a.clip_add_operands_at_zero:
            clipped_operands.extend(clip_add_operands(model, traced["graph"], traced["bottoms"], uq))
        if dfqbench_ranges:
            set_ranges(model, dfqbench_ranges, traced["graph"], traced["bottoms"], uq)
        model_box["t_quantized"] = time.perf_counter()
        model_box["model"] = model
        return inference_all(model)

    g["main"].__globals__["inference_all"] = timed_inference
    g["main"]()
    wall = time.perf_counter() - t0
    builtins.print = real_print
    acc = [m for _, m in printed if m.startswith("Acc: ")]
    if not acc:
        raise SystemExit("no 'Acc:' line from main_cls.py")
    quantize_s = model_box["t_quantized"] - t0
    result = {"top1": round(100.0 * float(acc[-1].split()[1]), 4), "quantize_s": round(quantize_s, 4),
              "wall_s": round(wall, 3), "argv": sys.argv[1:], "patches": patches, "device": device.type,
              "threads": torch.get_num_threads(), "n_test": data.num_samples, "model": str(cfg.model.name),
              "dataset": str(cfg.dataset.name), "image_quantizers": image_quantizers,
              **({"clipped_add_operands": clipped_operands} if a.clip_add_operands_at_zero else {}),
              "check": describe(model_box["model"], uq), "weights_vs_dfqbench": weight_check}
    print(json.dumps(result))


def operand_quantizers(graph, bottoms) -> list[tuple[int, int, str, str]]:
    """(k, j, bottom, name) for operand j of the k-th tensor op in graph order: the code's switch_layers made one
    QuantMeasure per operand, custom_tensor_op.<n> in this order (as set_quant_minmax hands them out)."""
    ops = [idx for idx, layer in graph.items() if isinstance(layer, str) and bottoms.get(idx)]
    out = []
    for k, idx in enumerate(ops):
        for j, bottom in enumerate(bottoms[idx]):
            out.append((k, j, bottom, f"custom_tensor_op.{len(out)}"))
    return out


def clip_add_operands(model, graph, bottoms, uq) -> list[str]:
    """Ablation: clip at 0 the range of each residual addition's operand quantizer that reads a ReLU output (the
    code leaves them as mean -/+ 6 std of the pre-ReLU sum)."""
    import torch.nn as nn
    measures = {n: m for n, m in model.named_modules()
                if n.startswith("custom_tensor_op.") and isinstance(m, uq.QuantMeasure)}
    operands = operand_quantizers(graph, bottoms)
    if sorted(name for *_, name in operands) != sorted(measures):
        raise SystemExit(f"{len(measures)} operand quantizers for {len(operands)} operands: the mapping does not "
                         f"hold")
    clipped = []
    for _, _, bottom, name in operands:
        q = measures[name]
        if type(graph.get(bottom)) in (nn.ReLU, nn.ReLU6) and float(q.running_min) < 0:
            q.running_min.fill_(0.0)
            clipped.append(name)
    return clipped


def dfqbench_quantized(teacher, a, input_shape, correct_bias: bool = True):
    """dfqbench's DFQ on the same teacher and bits (method=dfq quant=official_dfq; `correct_bias=False`: without
    its bias correction): the quantized GraphModule, its layers and quantizers named as the code names its modules
    (both keep the teacher's module paths)."""
    import torch
    from dfqbench.methods.dfq import DFQ
    from dfqbench.methods.base import QuantContext
    from dfqbench.runner import build_convention
    qcfg = common.compose(["method=dfq", "quant=official_dfq", f"wbit={a.wbit}", f"abit={a.abit}",
                           *common.teacher_overrides(a)])
    method = DFQ(correct_bias=correct_bias)
    conv = build_convention(qcfg, method)
    norm = qcfg.model.normalize or qcfg.dataset
    ctx = QuantContext(conv, a.wbit, a.abit, a.seed, torch.device("cpu"), input_shape, qcfg.dataset.num_classes,
                       progress=False, mean=torch.tensor(list(norm.mean)), std=torch.tensor(list(norm.std)))
    return method.quantize(copy.deepcopy(teacher), ctx)


def ranges_by_code_name(q) -> dict:
    """dfqbench's activation ranges in `q` (dfqbench_quantized) named as the code names its QuantMeasures:
    '<conv/linear>.quant' for a layer input, ('add', k, j) for operand j of the k-th addition."""
    from dfqbench.quant.quantizers import ActQuantizer

    def range_of(node):
        m = q.get_submodule(node.target)
        return float(m.lo), float(m.hi)

    ranges = {}
    for node in q.graph.nodes:
        if node.op != "call_module" or not isinstance(q.get_submodule(node.target), ActQuantizer):
            continue
        (user,) = node.users
        if user.op == "call_module":  # a layer's own input quantizer
            ranges[user.target + ".quant"] = range_of(node)
    adds = [n for n in q.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    for k, add in enumerate(adds):
        for j, operand in enumerate(add.args[:2]):
            ranges[("add", k, j)] = range_of(operand)
    return ranges


def dfqbench_layers(q) -> dict:
    """name -> dfqbench's quantized conv/linear layer in `q` (float weight and bias, before weight quantization)."""
    from dfqbench.quant.quantizers.layers import is_quant_layer
    return {n: m for n, m in q.named_modules() if is_quant_layer(m)}


def code_layers(model, ours) -> dict:
    """name -> the code's conv/linear module of the same name as each of dfqbench's layers; all must exist."""
    import torch.nn as nn
    theirs = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    missing = sorted(set(ours) - set(theirs))
    if missing or len(theirs) != len(ours):
        raise SystemExit(f"dfqbench's {len(ours)} layers do not match the code's {len(theirs)} (missing: {missing})")
    return theirs


def compare_weights(model, q) -> dict:
    """The code's weights and biases (before it quantizes them) against dfqbench's: per layer the largest
    difference over the largest magnitude of dfqbench's tensor; the largest of each over the layers."""
    import torch
    ours = dfqbench_layers(q)
    theirs = code_layers(model, ours)
    per_layer = {}
    with torch.no_grad():
        for name, mine in ours.items():
            other = theirs[name]
            rel = {"weight": float((other.weight - mine.weight).abs().max() / mine.weight.abs().max())}
            if mine.bias is not None and other.bias is not None:
                rel["bias"] = float((other.bias - mine.bias).abs().max() / mine.bias.abs().max().clamp_min(1e-12))
            per_layer[name] = {k: float(f"{v:.3g}") for k, v in rel.items()}
    worst = {k: max(((v[k], n) for n, v in per_layer.items() if k in v), default=(0.0, None))
             for k in ("weight", "bias")}
    return {"max_rel_diff": {k: {"value": v, "layer": n} for k, (v, n) in worst.items()}, "layers": per_layer}


def set_weights(model, q) -> None:
    """Ablation: the code's conv/linear weights and biases set to dfqbench's (same layer names)."""
    import torch
    ours = dfqbench_layers(q)
    theirs = code_layers(model, ours)
    with torch.no_grad():
        for name, mine in ours.items():
            other = theirs[name]
            other.weight.copy_(mine.weight)
            if mine.bias is None:
                if other.bias is not None:
                    other.bias.zero_()
            elif other.bias is None:
                raise SystemExit(f"{name}: dfqbench's layer has a bias, the code's has none")
            else:
                other.bias.copy_(mine.bias)


def set_ranges(model, ranges, graph, bottoms, uq) -> None:
    """Ablation: every QuantMeasure's range from `ranges` (dfqbench_ranges_by_code_name); all must be matched."""
    measures = {n: m for n, m in model.named_modules() if isinstance(m, uq.QuantMeasure)}
    names = {("add", k, j): name for k, j, _, name in operand_quantizers(graph, bottoms)}
    names.update({key: key for key in ranges if isinstance(key, str)})
    if sorted(names[key] for key in ranges) != sorted(measures):
        raise SystemExit(f"dfqbench's {len(ranges)} ranges do not match the code's {len(measures)} quantizers")
    for key, (lo, hi) in ranges.items():
        measures[names[key]].running_min.fill_(lo)
        measures[names[key]].running_max.fill_(hi)


def zero_exact_grids(uq) -> None:
    """Ablation: the code's asymmetric grid min + k scale (0 between two points) moved to hold 0: min rounded to a
    multiple of the scale, as a rounded integer zero point does (dfqbench's grids)."""
    forward = uq.UniformQuantize.forward

    def rounded(ctx, input, num_bits=8, min_value=None, max_value=None, inplace=False, symmetric=False,
                num_chunks=None):
        if not symmetric and isinstance(min_value, float) and isinstance(max_value, float):
            levels = 2.0 ** num_bits - 1
            lo, hi = min(min_value, 0.0), max(max_value, 0.0)
            scale = max((hi - lo) / levels, 1e-8)
            min_value = -round(-lo / scale) * scale
            max_value = min_value + levels * scale
        return forward(ctx, input, num_bits, min_value, max_value, inplace, symmetric, num_chunks)

    uq.UniformQuantize.forward = staticmethod(rounded)


def without_correction_propagation(dfq_module):
    """Ablation: the code's bias_correction, recompiled from its source without the line that adds each layer's
    correction to the next BatchNorm's statistics (fake_bias), from which later layers take their expected input
    (dfqbench's expected inputs come from the BatchNorm statistics as folded)."""
    import inspect
    import textwrap
    line = "graph[idx_layer].fake_bias.add_(bias_prev)"
    source = textwrap.dedent(inspect.getsource(dfq_module.bias_correction))
    if source.count(line) != 1:
        raise SystemExit(f"dfq.bias_correction: expected one `{line}`; the code changed")
    scope = dict(vars(dfq_module))
    exec(compile(source.replace(line, "pass"), inspect.getsourcefile(dfq_module.bias_correction), "exec"), scope)
    return scope["bias_correction"]


def ablation_change(ab: dict) -> str:
    """What an ablation's official.json changed in the code, in words (its flags as the driver records them)."""
    what = "additions' operands at " + (f"{ab.get('add_bits')} bits" if ab.get("add_bits") != 32
                                        else "32 bits (float)")
    what += "".join(f", {words}" for field, (_, words) in ABLATIONS.items() if ab.get(field))
    what += f", bias at {ab['bits_bias']} bits" if ab.get("bits_bias") else ""
    return what


def describe(model, uq) -> dict:
    """What the official model quantizes: its QuantMeasure modules, their bits and ranges."""
    measures = [(n, m) for n, m in model.named_modules() if isinstance(m, uq.QuantMeasure)]
    return {"quant_measures": len(measures),
            "bits": sorted({int(m.num_bits) for _, m in measures}),
            "ranges": {n: [round(float(m.running_min), 5), round(float(m.running_max), 5)] for n, m in measures}}


# --- parent: seeds, records, parity.csv -----------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="a clone of jakc4103/DFQ with its PyTransformer submodule")
    p.add_argument("--deps", default="/tmp/parity-deps-dfq",
                   help="extra packages for the code (pip install --target DIR --no-deps graphviz pydot pyparsing "
                        "tensorboardX scipy), put on PYTHONPATH with /tmp/parity-deps")
    p.add_argument("--bits", type=int, nargs="+", default=[4], help="W=A bit-widths (default: 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (the flow is data-free)")
    p.add_argument("--bits-bias", type=int, default=16, help="--bits_bias (README Int8**: 16)")
    common.add_teacher_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dfqbench", action="store_true", help="also run dfqbench on the same cells, write parity.csv")
    p.add_argument("--quant", nargs="+", default=["official_dfq"], help="dfqbench presets for --dfqbench")
    common.add_output_arguments(p, OUT)
    p.add_argument("--reuse-dfqbench", action="store_true",
                   help="take the dfqbench side from the records already in the cell folder (same dfqbench source)")
    p.add_argument("--add-bits", type=int, default=None,
                   help="bits of the residual additions' operand quantizers (default: the run's A; the code's "
                        "hard-coded 8, or 32 = nearly float, are ablations; use with --tag)")
    for field, (text, _) in ABLATIONS.items():
        p.add_argument(flag(field), action="store_true", help=text)
    common.add_child_arguments(p, bits=4)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return
    repo, commit = common.clone_identity(Path(a.official), DEFAULT_REPO, "dfq.py")
    out = Path(a.out) / a.tag if a.tag else Path(a.out)
    env = common.deps_env(a.deps)
    for bits in a.bits:
        cell = out / f"w{bits}a{bits}"

        def run_seed(seed: int, bits=bits, cell=cell) -> dict:
            args = common.child_args(a, seed, bits, bits) + ["--bits-bias", str(a.bits_bias)]
            args += ["--add-bits", str(a.add_bits)] if a.add_bits else []
            args += [flag(field) for field in ABLATIONS if getattr(a, field)]
            r = common.run_child(Path(__file__), args, cell / f"official-s{seed}.log.txt", env=env)
            print(f"unofficial DFQ W{bits}A{bits} seed {seed}: top-1 {r['top1']:.2f}, quantize {r['quantize_s']} s, "
                  f"wall {r['wall_s']:.0f} s", flush=True)
            return r

        variant = {"add_bits": a.add_bits or bits, "clip_inputs_at_zero": a.clip_inputs_at_zero,  # always
                   **{field: True for field in ABLATIONS if getattr(a, field)},
                   **({"bits_bias": a.bits_bias} if a.bits_bias != 16 else {})}
        runs, reused = common.official_runs(cell, a, "DFQ (unofficial code)", commit, bits, bits, run_seed,
                                            same=variant)
        official = common.official_summary(cell, a, "dfq", "DFQ (unofficial code)", repo, commit, bits, bits, runs,
                                           reused, unofficial=True, **variant)
        if not a.dfqbench:
            continue
        for quant in a.quant:
            def overrides(seed: int, quant=quant, bits=bits) -> list[str]:
                return ["method=dfq", f"quant={quant}", f"wbit={bits}", f"abit={bits}", f"seed={seed}",
                        f"threads={a.threads}", *common.teacher_overrides(a)]
            ours, _ = common.post_training_side(cell, quant, a.seeds, a.reuse_dfqbench, overrides,
                                                f"method=dfq quant={quant} W{bits}A{bits}",
                                                common.same_overrides(overrides))
            ablations = []  # the code's own ablation runs (--tag ablation-*), if any: the measured causes of a gap
            for f in sorted(Path(a.out).glob(f"ablation-*/{cell.name}/official.json")):
                ab = json.loads(f.read_text())
                what = ablation_change(ab)
                ablations.append(f"{what}: {ab['top1_mean']:.2f} ({common.rel(f.parent)})")
                if ab.get("seeds") == list(a.seeds) and agrees(ours[0][0], ab["top1_mean"], ours[0][1],
                                                               ab["top1_std"]):
                    # the code, changed, meets this preset: its own row, which parity.md names as the gap's cause
                    common.write_row(
                        a.csv, method="dfq-" + f.parent.parent.name.removeprefix("ablation-"), quant=quant,
                        wbit=bits, abit=bits, n_seeds=len(a.seeds),
                        official=((ab["top1_mean"], ab["top1_std"]), (ab["quantize_s_mean"], 0.0)), dfqbench=ours,
                        repo=repo, commit=commit, run=ab["runs"][0],
                        note=f"UNOFFICIAL code (jakc4103/DFQ), flow {' '.join(FLAGS)}, changed at run time: "
                             f"{what}; {QUANT_NOTES.get(quant, 'dfqbench quant=' + quant)}; seeds "
                             f"{' '.join(map(str, a.seeds))} on both sides (deterministic); records "
                             f"{common.rel(f.parent)} and {common.rel(cell)}")
            common.write_row(
                a.csv, method="dfq", quant=quant, wbit=bits, abit=bits, n_seeds=len(a.seeds), official=official,
                dfqbench=ours, repo=repo, commit=commit, run=runs[0],
                note=f"UNOFFICIAL code (jakc4103/DFQ; the paper has none), flow {' '.join(FLAGS)}; "
                        f"{QUANT_NOTES.get(quant, 'dfqbench quant=' + quant)}; data-free and deterministic: seeds "
                        f"{' '.join(map(str, a.seeds))} change nothing; seconds = up to the test pass; "
                        f"{runs[0]['n_test']} test images; records {common.rel(cell)}"
                        + (f"; the gap measured on the code itself, changed at run time: {'; '.join(ablations)}"
                           if ablations else ""))


if __name__ == "__main__":
    main()
