"""ONNX QDQ export and ONNX Runtime scoring (dfqbench.deploy), the deployable presets' refusals, the deployed table."""

import json

import numpy as np
import pytest
import torch

from conftest import compose_cfg, run_cli
from test_wrap import tiny_model
from dfqbench.deploy import check_deployable, check_export
from dfqbench.errors import ConfigError
from dfqbench.quant import Convention, act_quantizers, quantize_model
from dfqbench.quant.calibration.calibrate import calibrate_on_batches
from dfqbench.quant.quantizers.layers import is_quant_layer
from dfqbench.results.deployed import deployed_rows, deployed_table

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dfqbench.deploy import ort_eval  # noqa: E402  (after the skips: it needs onnxruntime)
from dfqbench.deploy.onnx_export import DeployError, export_qdq, read_qdq  # noqa: E402

T = onnx.TensorProto
# the onnxruntime preset's fields (conf/quant/onnxruntime.yaml), on the tiny ResNet
ORT_PRESET = {"name": "onnxruntime", "fold_bn": True, "deployable": True, "deploy_bits": [4, 8],
              "weight": {"granularity": "per_channel", "symmetric": True},
              "act": {"sites": "layer_inputs", "granularity": "per_tensor", "symmetric": False, "add_inputs": True},
              "layers": {"input_abit": 8}}
SHAPE = (3, 8, 8)


def _quantized(bits: int, convention: dict = ORT_PRESET, seed: int = 0):
    """The tiny ResNet quantized at W`bits`A`bits`, activation ranges observed on a random batch."""
    q = quantize_model(tiny_model(seed), Convention.from_dict(convention), bits, bits)
    x = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(seed))
    calibrate_on_batches(q, [x])
    return q, x


def _run(model, x, optimize):
    return ort_eval.session(model, threads=1, optimize=optimize).run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("bits,u8_weights,act_type,weight_type,shift", [
    (8, False, T.UINT8, T.INT8, 0), (8, True, T.UINT8, T.UINT8, 128), (4, True, T.UINT4, T.INT4, 0)])
def test_export_round_trips_scales_zero_points_and_integer_weights_exactly(one_thread, bits, u8_weights, act_type,
                                                                           weight_type, shift):
    """Read back from the ONNX graph: every scale and zero point as the quantizer has it (8-bit signed weights in
    uint8: integers and zero point + 128), and integer weights that dequantize to the fake-quantized weight."""
    q, _ = _quantized(bits)
    model = export_qdq(q, SHAPE, u8_weights=u8_weights)
    assert model.opset_import[0].version == 21
    stored = read_qdq(model)
    names = dict(q.named_modules())
    acts = [n for n, m in names.items() if m in act_quantizers(q)]
    layers = [n for n, m in names.items() if is_quant_layer(m)]
    assert sorted(stored) == sorted(acts + layers)
    for name in acts:
        a = names[name]
        assert stored[name]["axis"] is None
        # the image's quantizer is 8-bit (input_abit), every other one at `bits`
        assert stored[name]["type"] == (T.UINT8 if a.bits == 8 else act_type)
        np.testing.assert_array_equal(stored[name]["scale"], a.grid.scale.numpy().reshape(()))
        np.testing.assert_array_equal(stored[name]["zero_point"], a.grid.zero_point.numpy().reshape(()))
    for name in layers:
        layer, grid = names[name], names[name].weight_quantizer.grid
        assert stored[name]["axis"] == 0 and stored[name]["type"] == weight_type
        np.testing.assert_array_equal(stored[name]["scale"], grid.scale.numpy())
        np.testing.assert_array_equal(stored[name]["zero_point"], grid.zero_point.numpy() + shift)
        ints = stored[name]["int_weight"]
        assert ints.min() >= grid.qmin + shift and ints.max() <= grid.qmax + shift
        view = (-1,) + (1,) * (ints.ndim - 1)
        dequantized = (ints - stored[name]["zero_point"].reshape(view)) * stored[name]["scale"].reshape(view)
        np.testing.assert_allclose(dequantized, layer.quantized_weight().detach().numpy(), rtol=0, atol=1e-7)
    assert not any(n.domain == "dfqbench" for n in model.graph.node)  # every marker was rewritten


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("bits", [8, 4, 6])
def test_onnxruntime_output_equals_fake_quant_output(one_thread, bits, add_inputs):
    """Without graph optimizations ONNX Runtime computes each Q/DQ as dfqbench's fake-quant does: the logits agree
    to float rounding, with the residual sum's operands quantized or not. (6 bits: a grid narrower than its uint8
    type, clipped before the QuantizeLinear.) One image of 32 may sit on a rounding tie that the runtime's x / scale
    and ATen's x * (1 / scale) break apart (measured: 1 image, once in 18 cases, at W6 with add_inputs)."""
    q, x = _quantized(bits, {**ORT_PRESET, "act": {**ORT_PRESET["act"], "add_inputs": add_inputs}})
    with torch.no_grad():
        ref = q(x).numpy()
    err = np.abs(_run(export_qdq(q, SHAPE), x, optimize=False) - ref).max(axis=1)
    print(f"W{bits}A{bits} add_inputs {add_inputs}: max abs error {err.max():.3g} (logits up to "
          f"{np.abs(ref).max():.3g}), images off by > 1e-6: {int((err > 1e-6).sum())}")
    assert (err > 1e-6).sum() <= 1 and np.median(err) < 1e-6


@pytest.mark.parametrize("bits", [4, 6])
def test_int32_bias_makes_the_optimized_runtime_equal_fake_quant(one_thread, bits):
    """ONNX Runtime's optimizer rounds the bias of each conv in a QDQ group (DQ input, Q output through a ReLU) to
    int32 on input scale x weight scale. quant.bias=int32 (the onnxruntime preset's) does the same in the fake-quant
    model: below 8 bits, where the runtime computes in float on dequantized values, the optimized runtime's logits
    then equal the fake-quant ones to float rounding; with float biases they do not. Counted per image: onnxruntime
    1.32 sums some convs in another order than 1.30 did, so a value on a 4-bit rounding boundary can land one step
    away in a few images (measured, 32 images x 4 inputs: int32 0-3 images off at W4, 0 at W6; float 23-27 at W4,
    10-14 at W6)."""
    off = {}
    for bias in ("float", "int32"):
        q, x = _quantized(bits, {**ORT_PRESET, "bias": bias})
        with torch.no_grad():
            ref = q(x).numpy()
        err = np.abs(_run(export_qdq(q, SHAPE), x, optimize=True) - ref).max(axis=1)
        off[bias] = int((err > 1e-6).sum())
        print(f"W{bits}A{bits} bias {bias}: images whose logits differ by > 1e-6: {off[bias]} of {len(x)} "
              f"(max abs error {err.max():.3g})")
    assert off["int32"] <= len(x) // 10 and off["float"] >= len(x) // 4
    # the rounded layers: the stem, conv1 (Q after ReLU) and conv2 (Q on the residual sum's operand), not fc
    # (behind Flatten); without the operand quantizers conv2 feeds a float sum and keeps its float bias too
    linked = [n for n, m in q.named_modules() if is_quant_layer(m) and m.bias_input is not None]
    assert linked == ["stem.0", "conv1", "conv2"]
    q_float_sum, _ = _quantized(bits, {**ORT_PRESET, "bias": "int32",
                                       "act": {**ORT_PRESET["act"], "add_inputs": False}})
    assert [n for n, m in q_float_sum.named_modules() if is_quant_layer(m) and m.bias_input is not None] == [
        "stem.0", "conv1"]
    with pytest.raises(ValueError, match="quant.bias='int64' is not valid; choose one of: float, int32"):
        Convention.from_dict({**ORT_PRESET, "bias": "int64"})
    stem = dict(q.named_modules())["stem.0"]
    step = stem.bias_input.grid.scale * stem.weight_quantizer.grid.scale.reshape(-1)  # by hand
    expected = torch.round(stem.bias / step) * step
    assert torch.equal(stem.quantized_bias(), expected) and not torch.equal(expected, stem.bias)


@pytest.mark.parametrize("add_inputs", [True, False])
def test_w8a8_runs_integer_convolutions_and_stays_within_a_grid_step(one_thread, add_inputs):
    """With ONNX Runtime's optimizations the QDQ groups become QLinearConv (integer), whose requantization rounds
    once per output instead of after a float conv: the logits move by at most a few steps of the last grid. With
    the residual sum's operands quantized (the preset's add_inputs) every conv and the sum are integer kernels
    (QLinearAdd) and only the classifier is float; without, conv2 feeds a float sum and runs in float."""
    q, x = _quantized(8, {**ORT_PRESET, "act": {**ORT_PRESET["act"], "add_inputs": add_inputs}})
    model = export_qdq(q, SHAPE)
    ops = ort_eval.optimized_ops(model, threads=1)
    summary = ort_eval.integer_summary(ops)
    if add_inputs:
        assert ops.get("QLinearConv", 0) == 3 and ops.get("QLinearAdd", 0) == 1  # stem, conv1, conv2; the sum
        assert summary == {"integer": 4, "float": 1}  # the classifier's Gemm
    else:
        assert ops.get("QLinearConv", 0) == 2 and "QLinearAdd" not in ops  # conv2 feeds the float residual sum
        assert summary == {"integer": 2, "float": 2}
    with torch.no_grad():
        ref = q(x).numpy()
    err = float(np.abs(_run(model, x, optimize=True) - ref).max())
    print(f"W8A8 integer kernels (add_inputs {add_inputs}): {ops}; max abs error {err:.3g}")
    assert 0 < err < 0.1 * np.abs(ref).max()
    assert (_run(model, x, optimize=True).argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_non_uniform_weights_are_refused_by_the_export(one_thread):
    from dfqbench.quant.quantizers.power import PowerWeightQuantizer
    q, _ = _quantized(4)
    layer = next(m for m in q.modules() if is_quant_layer(m))
    layer.weight_quantizer = PowerWeightQuantizer.like(layer.weight_quantizer, exponent=0.5)
    with pytest.raises(DeployError, match="not on a uniform integer grid"):
        export_qdq(q, SHAPE)


def _convention(*overrides):
    """The run's convention after the runner's checks (before any work)."""
    from dfqbench.runner import build_convention, build_method, check_deployable as runner_check
    cfg = compose_cfg(*overrides)
    method = build_method(cfg)
    conv = build_convention(cfg, method)
    runner_check(cfg, method, conv)
    return conv


@pytest.mark.parametrize("overrides,needles", [
    (["quant=onnxruntime", "method=powerquant"], ["quant=onnxruntime", "method=powerquant", "non-uniform"]),
    (["quant=onnxruntime", "method=rex"], ["method=rex", "sum of several quantized"]),
    (["quant=onnxruntime", "method=rtn", "quant.act.granularity=per_channel"],
     ["quant.act.granularity=per_channel", "per_tensor"]),
    (["quant=tensorrt", "method=rtn", "wbit=4", "abit=4"], ["quant=tensorrt", "wbit=4", "bit-widths are 8"]),
    (["quant=tensorrt", "method=rtn", "quant.layers.last_abit=4"], ["quant.layers.last_abit=4", "8"]),
])
def test_deployable_presets_refuse_what_the_backend_cannot_express(overrides, needles):
    with pytest.raises(ConfigError) as err:
        _convention(*[b for b in ("wbit=8", "abit=8") if not any(o.startswith(b[:4]) for o in overrides)],
                    *overrides)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_deployable_presets_accept_uniform_methods():
    for quant, bits in (("onnxruntime", 8), ("onnxruntime", 4), ("tensorrt", 8)):
        conv = _convention(f"quant={quant}", "method=rtn", f"wbit={bits}", f"abit={bits}")
        assert conv.deployable and conv.fold_bn and conv.weight.symmetric
    check_deployable(Convention.from_dict({"name": "gdfq"}), "powerquant", 4, 4)  # not deployable: no check


def test_export_key_names_its_choices():
    with pytest.raises(ValueError, match=r"export='tflite' is not valid; choose one of: none, onnx"):
        check_export("tflite")
    check_export("onnx")
    check_export("none")


def test_cli_refusal_is_one_line_and_writes_no_record(tmp_path):
    proc = run_cli("method=powerquant", "quant=onnxruntime", "wbit=8", "abit=8", "export=onnx",
                   f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "method=powerquant" in lines[0], proc.stderr
    assert not (tmp_path / "record.json").exists()


def _record(tmp_path, method, top1, deployed, wbit=8, quant="onnxruntime", **extra):
    folder = tmp_path / "sweeps" / quant / method / f"w{wbit}a{wbit}"
    folder.mkdir(parents=True)
    record = {"status": "done", "method": method, "model": "resnet20_cifar10", "dataset": "cifar10", "quant": quant,
              "wbit": wbit, "abit": wbit, "seed": 0, "top1": top1, "n_test": 10000, "eval_images_per_s": 100.0,
              "deployed_runtime": "onnxruntime 1.32.0 CPUExecutionProvider", **extra}
    if deployed is not None:
        record.update(deployed_top1=deployed, deployed_images_per_s=200.0, deployed_fp32_images_per_s=300.0,
                      deployed_integer_ops=10, deployed_float_ops=12, deployed_ops={"QLinearConv": 10})
    (folder / "record.json").write_text(json.dumps(record))


def test_deployed_table_lists_records_with_a_deployed_score(tmp_path):
    _record(tmp_path, "rtn", 91.25, 91.2)
    _record(tmp_path, "zeroq", 90.0, 89.5, wbit=4)
    _record(tmp_path, "squant", 91.0, None, deployed_error="onnxruntime: NOT_IMPLEMENTED QLinearConv")
    _record(tmp_path, "dfq", 91.0, None, deployed_runtime=None)  # no export at all: left out
    rows = deployed_rows(tmp_path)
    assert [(r["method"], r["wbit"]) for r in rows] == [("rtn", 8), ("squant", 8), ("zeroq", 4)]
    text = deployed_table(rows)
    rtn = next(line for line in text.splitlines() if "| rtn " in line)
    assert "91.25" in rtn and "91.20" in rtn and "-0.05" in rtn and "200" in rtn
    squant = next(line for line in text.splitlines() if "| squant " in line)
    assert "NOT_IMPLEMENTED QLinearConv" in squant
    assert "-0.50" in next(line for line in text.splitlines() if "| zeroq " in line)
    # a training method's rows say their schedule (cpu and quick runs of one cell are two rows)
    _record(tmp_path, "gdfq", 85.0, 85.0, info={"schedule": "cpu"})
    gdfq = next(line for line in deployed_table(deployed_rows(tmp_path)).splitlines() if "| gdfq " in line)
    assert [c.strip() for c in gdfq.split("|")][3:6] == ["gdfq", "cpu", "W8A8"]
    assert [c.strip() for c in rtn.split("|")][4] == "post-training"


def test_run_with_export_onnx_records_the_deployed_score(tmp_path, cache_dir, cifar10_root, teacher, one_thread):
    """The runner's hook on the real teacher and the first 500 test images: the record gains the deployed fields,
    the integer kernels did the convolutions that end in a quantized tensor, and the deployed top-1 is the
    fake-quant top-1 within 3 images."""
    from dfqbench.runner import run
    cfg = compose_cfg("method=rtn", "quant=onnxruntime", "wbit=8", "abit=8", "export=onnx", "threads=1",
                      f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}", "dataset.max_samples=500",
                      f"paths.cache_dir={cache_dir}")
    record = run(cfg, tmp_path)
    assert record["status"] == "done" and "deployed_error" not in record
    assert (tmp_path / "model.onnx").exists() and record["deployed_onnx"] == "model.onnx"
    assert record["deployed_runtime"].startswith("onnxruntime ")
    # every conv (21: the stem, 9 blocks x 2, 2 shortcut convs) and every residual sum (9) is an integer kernel,
    # the classifier's Gemm alone is float
    ops = record["deployed_ops"]
    assert (ops["QLinearConv"], ops["QLinearAdd"], record["deployed_integer_ops"]) == (21, 9, 30)
    assert record["deployed_float_ops"] == 1 and ops["Gemm"] == 1
    assert abs(record["deployed_top1"] - record["top1"]) <= 0.6  # 3 of 500 images
    assert abs(record["deployed_fp32_top1"] - record["fp32_top1"]) <= 0.2
    assert record["deployed_images_per_s"] > 0 and record["deployed_fp32_images_per_s"] > 0
    on_disk = json.loads((tmp_path / "record.json").read_text())
    assert on_disk["deployed_top1"] == record["deployed_top1"]
    # input_range=pixels: the image quantizer holds what a normalized [0, 1] image can take
    norm = cfg.model.normalize or cfg.dataset
    lo, hi = record["convention"]["pixel_range"]
    assert lo == pytest.approx([-m / s for m, s in zip(norm.mean, norm.std)])
    assert hi == pytest.approx([(1 - m) / s for m, s in zip(norm.mean, norm.std)])
