"""Deployment: ONNX QDQ export of a quantized model (onnx_export), its ONNX Runtime score (ort_eval), and the
checks of the deployable backend presets (check). onnx and onnxruntime are imported only when used
(`pip install -e '.[deploy]'`)."""

from .check import EXPORTS, check_deployable, check_export
from .run import deploy_and_score

__all__ = ["EXPORTS", "check_deployable", "check_export", "deploy_and_score"]
