"""ONNX Runtime (CPU) scoring of an exported model on a dfqbench EvalSet, and the kernels it ran.

The session is built with ONNX Runtime's full graph optimizations, which fuse QDQ groups into integer kernels
(DequantizeLinear -> Conv -> [Relu] -> QuantizeLinear becomes QLinearConv); the optimized graph is saved and its
op types counted, so a record says which kernels did the work (a Conv left among DequantizeLinear nodes ran in float).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

# ops that compute on integers (the QDQ fusions of ONNX Runtime's CPU provider, and the integer ONNX ops)
INTEGER_OPS = ("QLinearConv", "NhwcQLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm",
               "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
               "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm", "FusedMatMul")


def runtime_label() -> str:
    import onnxruntime as ort
    return f"onnxruntime {ort.__version__} CPUExecutionProvider"


def session(model, threads: int | None = None, optimized_path: str | Path | None = None, optimize: bool = True):
    """An ONNX Runtime CPU session of `model` (a ModelProto, bytes or a path)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the NCHWc serialization notice is not one
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=["CPUExecutionProvider"])


def optimized_ops(model, threads: int | None = None) -> dict[str, int]:
    """Op type -> count in ONNX Runtime's optimized graph of `model` (what it runs)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(model, threads, optimized_path=path)
        graph = onnx.load(str(path)).graph
    return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def integer_summary(ops: dict[str, int]) -> dict[str, int]:
    """How many compute ops of the optimized graph are integer kernels, and how many are float."""
    return {"integer": sum(c for op, c in ops.items() if op in INTEGER_OPS),
            "float": sum(c for op, c in ops.items() if op in FLOAT_COMPUTE_OPS)}


def score(sess, data, batch_size: int) -> dict:
    """Top-1/top-5 and images/s of a session on the EvalSet's normalized batches (the same ones dfqbench scores),
    timed as `dfqbench.evaluate` times the fake-quant model."""
    name = sess.get_inputs()[0].name
    correct1 = correct5 = seen = 0
    t0 = time.perf_counter()  # the whole loop, batch preparation included, as dfqbench.evaluate times it
    for x, y in data.batches(batch_size, "cpu"):
        logits = sess.run(None, {name: np.ascontiguousarray(x.contiguous().numpy(), dtype=np.float32)})[0]
        top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
        labels = y.numpy()[:, None]
        hits = top5 == labels
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(axis=1).sum())
        seen += len(labels)
    seconds = time.perf_counter() - t0
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "n": seen, "seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else float("nan")}
