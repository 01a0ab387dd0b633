"""ONNX QDQ export of a dfqbench-quantized fx GraphModule.

Every fake-quantizer becomes QuantizeLinear/DequantizeLinear with the exact scale and zero point dfqbench used:

- an activation quantizer: QuantizeLinear -> DequantizeLinear on the tensor it quantizes (per tensor, or per
  channel along axis 1), preceded by a Clip to the grid's float range when the grid is narrower than its
  ONNX type (e.g. 6 bits held in uint8);
- a weight quantizer: the integer weights as an initializer of the grid's type, then DequantizeLinear (axis 0 for
  per-channel grids) feeding the Conv/Gemm. The integers are read back from the fake-quantized weight (so learned or
  flipped roundings, SQuant's, AdaRound's, are exported as they are), and a weight that is not on a uniform
  integer grid (PowerQuant's power domain, REx's sum of terms) is refused.

Grid types: [0, 255] uint8, [-128, 127] int8, [0, 15] UINT4 and [-8, 7] INT4 (ONNX opset 21), other widths in the
smallest of those (or 16-bit) that holds them. 8-bit signed weights are stored as uint8 with the zero point moved by
+128 (`u8_weights`, the default): the same dequantized values, but ONNX Runtime then runs its u8u8 integer kernels,
where with int8 weights its x86 AVX2 u8s8 kernels (vpmaddubsw) saturate 16-bit pair sums of full-range weights
(a visible top-1 loss on the ResNet-20 teacher at W8A8 on an AVX2 machine without VNNI).

How: torch's TorchScript exporter traces a copy of the model in which each quantizer is an identity marker (a custom
op `dfqbench::QDQ` carrying the quantizer's index); the markers are then rewritten into the QDQ nodes above, the
opset is raised to 21, and onnx's checker runs on the result.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from ..quant.quantizers import ActQuantizer, QuantLayer, WeightQuantizer
from ..quant.quantizers.clipped import ClippedActQuantizer, ClippedWeightQuantizer
from ..quant.kernels.grid import grid_from_range

OPSET = 21
DOMAIN = "dfqbench"
ON_GRID_TOL = 1e-3  # |w / scale + zp - round(.)| above this (in grid steps): the weight is not on the grid


class DeployError(ValueError):
    """A model (or a part of it) that the export or the runtime cannot express: one line, naming the part."""


@dataclass
class QSpec:
    """One quantizer as QDQ: the integers' grid and, for a weight, the integer weight itself."""

    name: str
    kind: str  # "act" | "weight"
    bits: int
    scale: np.ndarray  # float32, shape [] or [C]
    zero_point: np.ndarray  # int64, same shape
    qmin: int
    qmax: int
    axis: int | None = None  # the channel axis of a per-channel grid
    int_weight: np.ndarray | None = None  # int64, the weight's shape (kind == "weight")

    @property
    def onnx_type(self) -> int:
        return onnx_type_for(self.qmin, self.qmax)

    def as_unsigned_8bit(self) -> "QSpec":
        """The same grid in a uint8 container: integers and zero point + 128 (a signed 8-bit grid only)."""
        shift = 128
        return QSpec(self.name, self.kind, self.bits, self.scale, self.zero_point + shift, self.qmin + shift,
                     self.qmax + shift, self.axis, None if self.int_weight is None else self.int_weight + shift)


def onnx_type_for(qmin: int, qmax: int) -> int:
    """The smallest ONNX integer type that holds [qmin, qmax] (4-bit types need opset 21)."""
    from onnx import TensorProto as T
    for dtype, lo, hi in ((T.UINT4, 0, 15), (T.INT4, -8, 7), (T.UINT8, 0, 255), (T.INT8, -128, 127),
                          (T.UINT16, 0, 65535), (T.INT16, -32768, 32767)):
        if lo <= qmin and qmax <= hi:
            return dtype
    raise DeployError(f"integer range [{qmin}, {qmax}] fits no ONNX QDQ type (4, 8 or 16 bits)")


class _Marker(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key):  # noqa: ARG004 - an identity: the values come from the QDQ rewrite
        return x.clone()

    @staticmethod
    def symbolic(g, x, key):
        out = g.op(f"{DOMAIN}::QDQ", x, key_i=key)
        out.setType(x.type())  # same shape and type as its input: the exporter's shape inference needs it
        return out


class _ActMarker(nn.Module):
    def __init__(self, key: int):
        super().__init__()
        self.key = key

    def forward(self, x):
        return _Marker.apply(x, self.key)


class _MarkedConv2d(nn.Conv2d):
    key: int | None = None

    def forward(self, x):
        w = self.weight if self.key is None else _Marker.apply(self.weight, self.key)
        return self._conv_forward(x, w, self.bias)


class _MarkedLinear(nn.Linear):
    key: int | None = None

    def forward(self, x):
        w = self.weight if self.key is None else _Marker.apply(self.weight, self.key)
        return nn.functional.linear(x, w, self.bias)


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype)


def act_spec(name: str, q: nn.Module) -> QSpec | None:
    """The QDQ of an activation quantizer; None when it leaves the tensor float (32 bits, or never calibrated)."""
    if isinstance(q, ClippedActQuantizer):
        qmax = 2 ** q.bits - 1
        scale = (q.clip.detach().float() / qmax).clamp_min(1e-8).reshape(())
        return QSpec(name, "act", q.bits, _np(scale, np.float32), np.zeros((), np.int64), 0, qmax)
    if not isinstance(q, ActQuantizer):
        raise DeployError(f"{name}: activation quantizer {type(q).__name__} has no QDQ form; "
                          f"exportable: ActQuantizer, ClippedActQuantizer")
    if not q.enabled or not q.calibrated:
        return None
    grid = q.grid or grid_from_range(q.lo, q.hi, q.bits, q.symmetric)
    axis = 1 if grid.scale.numel() > 1 else None
    scale = grid.scale.reshape(-1) if axis is not None else grid.scale.reshape(())
    zp = grid.zero_point.reshape(scale.shape)
    return QSpec(name, "act", q.bits, _np(scale, np.float32), _np(zp, np.int64), grid.qmin, grid.qmax, axis)


@torch.no_grad()
def weight_spec(name: str, layer: nn.Module) -> QSpec | None:
    """The integer weight and its grid, read back from the layer's fake-quantized weight; None when float."""
    wq = layer.weight_quantizer
    if isinstance(wq, ClippedWeightQuantizer):
        qmin, qmax = -(2 ** (wq.bits - 1)), 2 ** (wq.bits - 1) - 1
        scale = (wq.clip.detach().float() / qmax).clamp_min(1e-8)
        zp = torch.zeros_like(scale, dtype=torch.int32)
        bits, per_channel = wq.bits, wq.clip.numel() > 1
    elif isinstance(wq, WeightQuantizer):
        if not wq.enabled:
            return None
        layer.quantized_weight()  # builds the grid (and a precomputed weight) if not done yet
        if wq.grid is None:
            raise DeployError(f"{name}: weight quantizer {type(wq).__name__} exposes no integer grid")
        grid = wq.grid
        qmin, qmax, scale, zp, bits = grid.qmin, grid.qmax, grid.scale.float(), grid.zero_point, wq.bits
        per_channel = scale.numel() > 1
    else:
        raise DeployError(f"{name}: weight quantizer {type(wq).__name__} has no QDQ form; "
                          f"exportable: WeightQuantizer and its uniform-grid subclasses, ClippedWeightQuantizer")
    w = layer.quantized_weight().detach().float()
    view = [-1] + [1] * (w.dim() - 1)
    s = scale.reshape(view) if per_channel else scale.reshape(())
    z = zp.reshape(view).float() if per_channel else zp.reshape(()).float()
    q = w / s + z
    ints = q.round()
    off = float((q - ints).abs().max()) if q.numel() else 0.0
    if off > ON_GRID_TOL or float(ints.min()) < qmin or float(ints.max()) > qmax:
        raise DeployError(f"{name}: {type(wq).__name__}'s weights are not on a uniform integer grid "
                          f"(off by up to {off:.3g} steps): a non-uniform quantizer has no QDQ form")
    scale_np = _np(scale.reshape(-1) if per_channel else scale.reshape(()), np.float32)
    zp_np = _np(zp.reshape(scale_np.shape), np.int64)
    return QSpec(name, "weight", bits, scale_np, zp_np, qmin, qmax, 0 if per_channel else None,
                 _np(ints, np.int64))


def exportable_copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[QSpec]]:
    """A copy of `gm` whose quantizers are identity markers, and each marker's QDQ spec (by marker key).

    Each quantized layer becomes a float layer holding the fake-quantized weight (what the DequantizeLinear will
    give back), so that the copy computes in float what the model computes with quantized weights."""
    gm = copy.deepcopy(gm).cpu().eval()
    specs: list[QSpec] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, QuantLayer):
            _replace(gm, node.target, _marked_layer(node.target, mod, specs))
        elif isinstance(mod, (ActQuantizer, ClippedActQuantizer)) or type(mod).__name__.endswith("ActQuantizer"):
            spec = act_spec(node.target, mod)
            if spec is None:
                _replace(gm, node.target, nn.Identity())
            else:
                specs.append(spec)
                _replace(gm, node.target, _ActMarker(len(specs) - 1))
    leftover = [n for n, m in gm.named_modules() if isinstance(m, (WeightQuantizer, QuantLayer))]
    if leftover:
        raise DeployError(f"{leftover[0]}: a quantizer outside the traced graph's modules has no QDQ form")
    gm.recompile()
    return gm, specs


def _marked_layer(name: str, layer: nn.Module, specs: list[QSpec]) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        new = _MarkedConv2d.__new__(_MarkedConv2d)
    elif isinstance(layer, nn.Linear):
        new = _MarkedLinear.__new__(_MarkedLinear)
    else:
        raise DeployError(f"{name}: quantized {type(layer).__name__} has no export; exportable: Conv2d, Linear")
    spec = weight_spec(name, layer)
    with torch.no_grad():
        weight = layer.quantized_weight().detach().clone() if spec is not None else layer.weight.detach().clone()
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in layer.__dict__.items()})
    new._modules = {}
    new._parameters = dict(layer._parameters)
    new._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    if spec is not None:
        specs.append(spec)
        new.key = len(specs) - 1
    return new


def _replace(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, child = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, module)


def export_qdq(gm: fx.GraphModule, input_shape: tuple[int, ...], path=None, u8_weights: bool = True):
    """The QDQ ONNX model (onnx.ModelProto) of a quantized GraphModule, checked; written to `path` if given.
    `input_shape` is one input's shape without the batch (C, H, W); the batch dimension is dynamic.
    `u8_weights`: signed 8-bit weight grids in uint8 (zero point + 128; see the module's docstring)."""
    import onnx
    from onnx import TensorProto

    marked, specs = exportable_copy(gm)
    if u8_weights:
        specs = [s.as_unsigned_8bit() if s.kind == "weight" and s.onnx_type == TensorProto.INT8 else s for s in specs]
    example = torch.zeros(2, *input_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(marked, (example,), buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          custom_opsets={DOMAIN: 1}, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    rewrite_markers(model, specs)
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, str(path))
    return model


def rewrite_markers(model, specs: list[QSpec]) -> None:
    """Replace each `dfqbench::QDQ` marker node by its QuantizeLinear/DequantizeLinear (in place); opset 21."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    nodes = []
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        key = next(a.i for a in node.attribute if a.name == "key")
        spec = specs[key]
        base = f"{spec.name}.qdq"
        scale, zp = f"{base}.scale", f"{base}.zero_point"
        graph.initializer.append(numpy_helper.from_array(spec.scale, scale))
        graph.initializer.append(_int_tensor(zp, spec.onnx_type, spec.zero_point))
        axis = {} if spec.axis is None else {"axis": spec.axis}
        src, dst = node.input[0], node.output[0]
        if spec.kind == "weight":
            qw = f"{base}.int_weight"
            graph.initializer.append(_int_tensor(qw, spec.onnx_type, spec.int_weight))
            nodes.append(helper.make_node("DequantizeLinear", [qw, scale, zp], [dst], name=f"{base}.dq", **axis))
            if users.get(src) == 1 and src in inits:  # the float weight is no longer needed
                graph.initializer.remove(inits[src])
            continue
        q_in = src
        t_lo, t_hi = _type_range(spec.onnx_type)
        if (spec.qmin, spec.qmax) != (t_lo, t_hi):  # a grid narrower than its type: clip to its float range first
            if spec.axis is not None:
                raise DeployError(f"{spec.name}: a per-channel {spec.bits}-bit activation grid has no QDQ form "
                                  f"(its range [{spec.qmin}, {spec.qmax}] is narrower than its ONNX type)")
            lo = np.float32((spec.qmin - spec.zero_point) * spec.scale)
            hi = np.float32((spec.qmax - spec.zero_point) * spec.scale)
            graph.initializer.append(numpy_helper.from_array(np.array(lo, np.float32), f"{base}.clip_lo"))
            graph.initializer.append(numpy_helper.from_array(np.array(hi, np.float32), f"{base}.clip_hi"))
            q_in = f"{base}.clipped"
            nodes.append(helper.make_node("Clip", [src, f"{base}.clip_lo", f"{base}.clip_hi"], [q_in],
                                          name=f"{base}.clip"))
        nodes.append(helper.make_node("QuantizeLinear", [q_in, scale, zp], [f"{base}.q"], name=f"{base}.q", **axis))
        nodes.append(helper.make_node("DequantizeLinear", [f"{base}.q", scale, zp], [dst], name=f"{base}.dq",
                                      **axis))
    del graph.node[:]
    graph.node.extend(nodes)
    for entry in list(model.opset_import):
        if entry.domain == DOMAIN:
            model.opset_import.remove(entry)
        elif entry.domain in ("", "ai.onnx"):
            entry.version = OPSET
    del graph.value_info[:]  # the exporter's shape annotations of the markers' outputs: re-inferred by onnx


def _int_tensor(name: str, onnx_type: int, values: np.ndarray):
    """An initializer of an integer ONNX type, packed (4-bit: two values a byte)."""
    from onnx import helper, numpy_helper
    return numpy_helper.from_array(values.astype(helper.tensor_dtype_to_np_dtype(onnx_type)), name)


def _type_range(onnx_type: int) -> tuple[int, int]:
    from onnx import TensorProto as T
    return {T.UINT4: (0, 15), T.INT4: (-8, 7), T.UINT8: (0, 255), T.INT8: (-128, 127),
            T.UINT16: (0, 65535), T.INT16: (-32768, 32767)}[onnx_type]


def read_qdq(model) -> dict[str, dict]:
    """Each QDQ's scale, zero point (and integer weight) as stored in the graph, by quantizer name."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not node.name.endswith(".qdq.dq"):
            continue
        name = node.name[: -len(".qdq.dq")]
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        entry = {"scale": numpy_helper.to_array(inits[node.input[1]]),
                 "zero_point": numpy_helper.to_array(inits[node.input[2]]).astype(np.int64), "axis": axis,
                 "type": inits[node.input[2]].data_type}
        if node.input[0] in inits:
            entry["int_weight"] = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
        out[name] = entry
    return out
