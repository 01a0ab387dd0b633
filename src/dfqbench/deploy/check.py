"""Can a backend express what a method produces under a deployable convention (`deployable: true` presets)?

Checked before any work; each refusal is one line naming the bad value and what the backend takes.
"""

from __future__ import annotations

from ..quant.convention import Convention
from ..results.names import split_run_method

EXPORTS = ("none", "onnx")

# methods whose quantized weights are not one uniform integer grid per tensor/channel: no QDQ form, no integer kernel
NON_UNIFORM_METHODS = {
    "powerquant": "PowerQuant's weights sit on a non-uniform grid (sign(w)|w|^a quantized, then the power 1/a)",
    "rex": "REx's weights are a sum of several quantized residual terms, not one integer grid",
    "pnmq": "PNMQ's weights sit on a parametric non-uniform grid (levels s sign(k) (|k|/K)^p)",
}


def check_export(export) -> None:
    if export not in EXPORTS:
        raise ValueError(f"export={export!r} is not valid; choose one of: {', '.join(EXPORTS)}")
    if export == "onnx":
        missing = [m for m in ("onnx", "onnxruntime") if not _importable(m)]
        if missing:
            raise ValueError(f"export=onnx needs {' and '.join(missing)}: pip install -e '.[deploy]'")


def check_deployable(conv: Convention, method_name: str, wbit: int, abit: int) -> None:
    """Raise ValueError (one line) when `conv` is a deployable backend preset and the run's output is not
    expressible by that backend."""
    if not conv.deployable:
        return
    where = f"quant={conv.name} (deployable)"
    base = split_run_method(method_name)[0]  # pnmq-cr8 is pnmq
    if base in NON_UNIFORM_METHODS:
        raise ValueError(f"{where} cannot express method={method_name}: {NON_UNIFORM_METHODS[base]}; "
                         f"its integer kernels take uniform grids only")
    if conv.act.granularity != "per_tensor":
        raise ValueError(f"{where} cannot express method={method_name}'s quant.act.granularity="
                         f"{conv.act.granularity}: the backend's activations are per_tensor")
    if conv.deploy_bits:
        bits = {"wbit": wbit, "abit": abit,
                **{f"quant.layers.{k}": v for k, v in conv.layers.bit_widths().items()}}
        for key, value in bits.items():
            if value not in conv.deploy_bits and value != 32:
                raise ValueError(f"{where} cannot express {key}={value}: the backend's integer bit-widths are "
                                 f"{', '.join(map(str, conv.deploy_bits))}")


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None
