"""The runner's hook (`export=onnx`): export the quantized model, score it (and the FP32 teacher) with ONNX Runtime,
and return the record's `deployed_*` fields. An export or a runtime that refuses the model does not fail the run:
the fields say what was refused (`deployed_error`), and no deployed accuracy is reported."""

from __future__ import annotations

import copy
import io
import logging
import warnings
from pathlib import Path

import torch

from . import ort_eval
from .onnx_export import OPSET, export_qdq

log = logging.getLogger(__name__)
ONNX_NAME = "model.onnx"


def export_float(model: torch.nn.Module, input_shape) -> bytes:
    """The FP32 model as ONNX (same exporter and opset), for the float ONNX Runtime speed beside the integer one."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format),
                          (torch.zeros(2, *input_shape),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buf.getvalue()


def deploy_and_score(qmodel, fp32_model, data, input_shape, batch_size: int, threads: int | None,
                     run_dir: Path) -> dict:
    fields: dict = {"deployed_runtime": ort_eval.runtime_label(), "deployed_opset": OPSET}
    try:
        model = export_qdq(qmodel, tuple(input_shape), Path(run_dir) / ONNX_NAME)
        fields["deployed_onnx"] = ONNX_NAME
    except Exception as exc:  # noqa: BLE001 - recorded: the export refused this model
        fields["deployed_error"] = f"export: {_one_line(exc)}"
        log.warning("deployed: %s", fields["deployed_error"])
        return fields
    try:
        ops = ort_eval.optimized_ops(model, threads)
        result = ort_eval.score(ort_eval.session(model, threads), data, batch_size)
    except Exception as exc:  # noqa: BLE001 - recorded: ONNX Runtime refused the model (the op is in the message)
        fields["deployed_error"] = f"onnxruntime: {_one_line(exc)}"
        log.warning("deployed: %s", fields["deployed_error"])
        return fields
    kinds = ort_eval.integer_summary(ops)
    fields.update(deployed_top1=round(result["top1"], 4), deployed_top5=round(result["top5"], 4),
                  deployed_images_per_s=round(result["images_per_s"], 1), deployed_ops=ops,
                  deployed_integer_ops=kinds["integer"], deployed_float_ops=kinds["float"])
    try:
        fp32 = ort_eval.score(ort_eval.session(export_float(fp32_model, input_shape), threads), data, batch_size)
        fields.update(deployed_fp32_top1=round(fp32["top1"], 4),
                      deployed_fp32_images_per_s=round(fp32["images_per_s"], 1))
    except Exception as exc:  # noqa: BLE001 - the float reference is optional
        fields["deployed_fp32_error"] = _one_line(exc)
    log.info("deployed (%s): top-1 %.2f, %.1f images/s (FP32 %s images/s); %d integer and %d float compute ops",
             fields["deployed_runtime"], fields["deployed_top1"], fields["deployed_images_per_s"],
             fields.get("deployed_fp32_images_per_s", "n/a"), kinds["integer"], kinds["float"])
    return fields


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"
