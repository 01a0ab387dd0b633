"""A quantization convention: where quantizers sit and how they are configured, as plain data.

Every field comes from a `conf/quant/*.yaml` preset (the command line can override any of them); code reads the
fields, it never branches on the preset's name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .kernels.grid import SYMMETRIC_GRIDS
from .quantizers.ranges import ESTIMATORS
from ..settings import check_number, refuse_unknown

# after_relu: every ReLU/ReLU6 output. layer_inputs: the tensor each conv/linear reads (before any pool/flatten),
# one quantizer shared with every reader of it (a residual identity too). each_layer_input: a quantizer of its own
# right at each conv/linear input (after any pool/flatten); other readers (residual identities) read the float
# tensor (the ZeroQ/SQuant code's quant_input placement). layer_outputs: every conv/linear output (after its folded
# BatchNorm), the logits too, one quantizer shared by every reader (the ACIQ code's Conv2dWithId/LinearWithId);
# the first layer's output takes layers.second_abit (it is what the 2nd layer reads). op_outputs: the output of every
# operation whose kind is in act.ops (transforms.ops.OP_KINDS: layer, activation, matmul, add, norm, concat,
# param, softmax), a layer fused with the activation that alone reads it (PSAQ-ViT's transformer placement).
ACT_SITES = ("after_relu", "layer_inputs", "each_layer_input", "layer_outputs", "op_outputs")
OP_KINDS = ("layer", "activation", "matmul", "add", "norm", "concat", "param", "softmax", "pool")
GRANULARITIES = ("per_channel", "per_tensor")
# the activation quantizers' backward: "clipped" zeroes the gradient outside the range (torch.fake_quantize's
# straight-through estimator), "identity" passes it everywhere (the GDFQ lineage's AsymmetricQuantFunction)
ACT_STES = ("clipped", "identity")
# a layer bias in the fake-quant model: float, or rounded to the int32 grid input scale x weight scale, as an
# integer backend stores it (ONNX Runtime's WeightBiasQuantization); the deployed model then computes the same
BIAS_GRIDS = ("float", "int32")


@dataclass
class WeightSpec:
    granularity: str = "per_channel"
    symmetric: bool = False
    estimator: str = "minmax"
    lp: float = 2.0
    # with symmetric: auto (unsigned grid for a non-negative range) | signed | qasr (kernels.grid)
    symmetric_grid: str = "auto"


@dataclass
class ActSpec:
    sites: str = "after_relu"
    granularity: str = "per_tensor"  # per_channel: one range per channel (dim 1), static (ACIQ, SPIQ)
    symmetric: bool = False
    estimator: str = "minmax"
    lp: float = 2.0
    percentile: float = 99.99
    ste: str = "clipped"  # ACT_STES
    symmetric_grid: str = "auto"  # as WeightSpec.symmetric_grid
    ops: list[str] | None = None  # with sites=op_outputs: the operation kinds whose outputs are quantized
    # also quantize each operand of every sum of two activations (residual additions) that the sites left float,
    # on its edge into the sum (other readers keep the float tensor): an integer backend's QLinearAdd reads
    # quantized operands (ONNX Runtime's quantizer puts Q/DQ around every Add); the DFQ code's QuantMeasure operands
    add_inputs: bool = False


INPUT_RANGES = ("calibrated", "pixels")
# which conv -> BatchNorm pairs fold_bn folds (transforms.bn_fold): graph, every BatchNorm reading a conv/linear
# output that nothing else reads; module, only a BatchNorm registered right after that conv in the same parent module
FOLD_SCOPES = ("graph", "module")


@dataclass
class LayerBits:
    """Bit-width exceptions (null means the run's wbit/abit), and how the input image's quantizer gets its range."""

    first_wbit: int | None = None
    last_wbit: int | None = None
    second_abit: int | None = None  # the quantizer(s) feeding the 2nd layer (BRECQ: 8)
    last_abit: int | None = None  # the quantizer(s) feeding the last layer
    # the last layer's own output (the logits), where the sites put a quantizer there (layer_outputs, op_outputs);
    # the ACIQ code keeps a 1000-way classifier's logits at 8 bit
    logits_abit: int | None = None
    input_abit: int | None = None  # the input image; null = not quantized
    # with act.sites=layer_outputs: the output of each BatchNorm left unfolded, quantized at this bit-width (null:
    # float); the ACIQ code's BatchNorm2dWithId quantizes it with its default int8 quantizer
    norm_abit: int | None = None
    # calibrated: the image quantizer is set as any other, by the method (from its data, or from noise);
    # pixels: fixed to what a normalized image can hold, [(0 - mean) / std, (1 - mean) / std] (the deployed
    # input is a real image, whatever data the method saw), and left alone by every method's calibration
    input_range: str = "calibrated"

    def bit_widths(self) -> dict[str, int]:
        """The bit-width exceptions that are set, by field name."""
        return {k: v for k, v in asdict(self).items() if k.endswith("bit") and v is not None}


@dataclass
class Convention:
    name: str
    weight: WeightSpec = field(default_factory=WeightSpec)
    act: ActSpec = field(default_factory=ActSpec)
    layers: LayerBits = field(default_factory=LayerBits)
    fold_bn: bool = False
    fold_scope: str = "graph"  # FOLD_SCOPES
    backend: str = "torch"
    description: str = ""
    # settings a method takes under this convention, by method name ({aciq: {stats: calib, ...}}): an official
    # preset (quant=official_<method>) carries the official code's method settings; each method reads its own entry
    method_settings: dict = field(default_factory=dict)
    # a backend preset (quant=onnxruntime, tensorrt): runs refuse, before any work, what the backend cannot express
    # (dfqbench.deploy.check: non-uniform grids, per-channel activations, bit-widths outside deploy_bits)
    deployable: bool = False
    deploy_bits: list[int] | None = None  # the backend's integer bit-widths (null: any)
    bias: str = "float"  # BIAS_GRIDS: int32 rounds each quantized-input layer's bias as the backend does
    # set by the runner from the model's normalization, not in presets: per-channel (lo, hi) of a normalized image
    pixel_range: tuple[list[float], list[float]] | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "Convention":
        data = dict(data)
        refuse_unknown(data, [f.name for f in fields(cls)], "quant")
        conv = cls(
            name=data.pop("name"),
            weight=WeightSpec(**data.pop("weight", {})),
            act=ActSpec(**data.pop("act", {})),
            layers=LayerBits(**data.pop("layers", {})),
            **data,
        )
        conv.validate()
        return conv

    def with_overrides(self, overrides: dict) -> "Convention":
        """A copy with some fields replaced (a method that needs, e.g., folded BatchNorm)."""
        merged = self.to_dict()
        for key, value in overrides.items():
            if isinstance(value, dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return Convention.from_dict(merged)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        _choice("quant.act.sites", self.act.sites, ACT_SITES)
        _choice("quant.layers.input_range", self.layers.input_range, INPUT_RANGES)
        _choice("quant.weight.granularity", self.weight.granularity, GRANULARITIES)
        _choice("quant.act.granularity", self.act.granularity, GRANULARITIES)
        _choice("quant.weight.estimator", self.weight.estimator, ESTIMATORS)
        _choice("quant.act.estimator", self.act.estimator, ESTIMATORS)
        _choice("quant.act.ste", self.act.ste, ACT_STES)
        _choice("quant.weight.symmetric_grid", self.weight.symmetric_grid, SYMMETRIC_GRIDS)
        _choice("quant.act.symmetric_grid", self.act.symmetric_grid, SYMMETRIC_GRIDS)
        _choice("quant.bias", self.bias, BIAS_GRIDS)
        _choice("quant.fold_scope", self.fold_scope, FOLD_SCOPES)
        if self.layers.norm_abit is not None and self.act.sites != "layer_outputs":
            raise ValueError(f"quant.layers.norm_abit={self.layers.norm_abit!r} is only read with "
                             f"quant.act.sites=layer_outputs, not {self.act.sites!r}; set quant.layers.norm_abit=null")
        if self.act.sites == "op_outputs":
            if not self.act.ops or not isinstance(self.act.ops, (list, tuple)):
                raise ValueError(f"quant.act.sites=op_outputs needs quant.act.ops, a list of: {', '.join(OP_KINDS)}")
            for kind in self.act.ops:
                _choice("quant.act.ops", kind, OP_KINDS)
        elif self.act.ops:
            raise ValueError(f"quant.act.ops={list(self.act.ops)} is only read with quant.act.sites=op_outputs, not "
                             f"{self.act.sites!r}; set quant.act.ops=null")
        for key, spec in (("weight", self.weight), ("act", self.act)):
            if spec.symmetric_grid != "auto" and not spec.symmetric:
                raise ValueError(f"quant.{key}.symmetric_grid={spec.symmetric_grid!r} needs quant.{key}.symmetric="
                                 f"true; with symmetric=false use symmetric_grid=auto")
        for key, spec in (("weight", self.weight), ("act", self.act)):
            if spec.estimator == "mse":  # the range minimizing the L_p error: p <= 0 is no norm
                check_number(f"quant.{key}.lp", spec.lp, strict=True)
        if self.act.estimator == "percentile" and (isinstance(self.act.percentile, bool) or not isinstance(
                self.act.percentile, (int, float)) or not 50.0 < self.act.percentile <= 100.0):
            raise ValueError(f"quant.act.percentile={self.act.percentile!r} is not valid; use a number in (50, 100], "
                             f"e.g. 99.996")
        for key, value in self.layers.bit_widths().items():
            check_bits(f"quant.layers.{key}", value)
        if not isinstance(self.act.add_inputs, bool):
            raise ValueError(f"quant.act.add_inputs={self.act.add_inputs!r} is not valid; choose one of: true, false")
        if not isinstance(self.deployable, bool):
            raise ValueError(f"quant.deployable={self.deployable!r} is not valid; choose one of: true, false")
        for value in self.deploy_bits or []:
            check_bits("quant.deploy_bits", value)
        if not isinstance(self.method_settings, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in self.method_settings.items()):
            raise ValueError(f"quant.method_settings={self.method_settings!r} must map method names to settings, "
                             f"e.g. {{aciq: {{stats: calib}}}}")


def _choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def check_bits(key: str, value) -> int:
    """Bit-widths are integers in [2, 32]; 32 means floating point."""
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 32:
        raise ValueError(f"{key}={value!r} is not a valid bit-width; use an integer from 2 to 32 (32 = float)")
    return value
