"""Benchmark: fake-quant kernels against the memory-bandwidth floor, and quantized vs FP32 ResNet-20 throughput.

    python scripts/bench_fakequant.py [--max-elements N] [--repeats R] [--device auto|cpu|cuda] [--out FILE]

For fp32 tensors from a ResNet-20 activation (128x16x32x32, 2.1M elements) up to 256M elements it times, in the
same run: ATen's fake-quant (`torch.fake_quantize_*`, what `quant.backend=torch` calls), the Triton kernels
(CUDA only) and a plain device-to-device copy `y.copy_(x)`, the floor for an op that reads x once and writes y
once. GB/s counts that read and write (8 bytes per element) for every row, so "vs copy" is the fraction of the
copy's bandwidth reached. The fused rows compare per-channel min/max ranging + quantization in one Triton kernel
with the built-in route (`torch.aminmax`, `ranges.grid_from_range`, `torch.fake_quantize_per_channel_affine`).
Timing: CUDA events (CPU: perf_counter) around a batch of calls (2^25 elements in all on CUDA, 2^24 on CPU),
median of --repeats batches. Sizes that fit in L2 (on an
H100, 50 MB) can beat the HBM figure; the copy row has the same advantage.

On CPU the rows compare, in the same run: ATen's kernels, dfqbench's `torch` backend (its one-pass C kernel,
kernels/cpu_ext.py, equal to ATen's values), the four-pass torch formula it falls back to without a C compiler,
and, as the measured alternative that was not kept, the formula compiled by torch.compile's C++ codegen (its first
call, the compile, is reported apart). Goal (issue 16): the backend
>= 0.3x copy bandwidth per tensor and per channel.

The last rows run a random-weight pytorchcv ResNet-20 (W4A4, convention gdfq, activation ranges [0, 4]) on
batches of 500 CIFAR-sized images in channels_last under torch.inference_mode with the weights quantized once
(`frozen_weights`, as `evaluate` does), FP32 and fake-quantized, on CPU (goal: >= 0.9x FP32 images/s), with ATen's
kernels for comparison, and once more in a child process with glibc's default allocator settings
(DFQ_KEEP_FREED_MEMORY=0, cpu_allocator.py); on CUDA with both backends when there is a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench_report import emit
from dfqbench.cpu_allocator import keep_freed_memory
from dfqbench.quant import Convention, act_quantizers, quantize_model, use_backend
from dfqbench.quant.kernels import cpu_ext
from dfqbench.quant.kernels.aten import TorchBuiltinBackend, torch_formula
from dfqbench.quant.kernels.backend import add_backend, get_backend, resolve_backend_name
from dfqbench.quant.quantizers.core import frozen_weights
from dfqbench.quant.quantizers.ranges import grid_from_range

SIZES = [2**21, 2**23, 2**25, 2**27, 2**28]  # 128x16x32x32 ... 256M elements
BITS = 4
CHANNEL_ROW = 4096  # per-channel rows use a weight-like [n / 4096, 4096] view, channels along axis 0
CPU_GOAL = 0.3  # the torch backend's fraction of copy bandwidth (issue 16)
CPU_PATH = "C kernel" if cpu_ext.library() is not None else f"formula; C kernel unavailable: {cpu_ext.why_unavailable()}"
E2E_GOAL = 0.9  # W4A4 / FP32 images/s on CPU


class AtenKernels(TorchBuiltinBackend):
    """ATen's fake-quant kernels on every device (what the torch backend called on CPU before the formula)."""

    name = "aten"

    def per_tensor(self, x, scale, zero_point, qmin, qmax):
        return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero_point.to(torch.int32), qmin, qmax)

    def per_channel(self, x, scale, zero_point, axis, qmin, qmax):
        return torch.fake_quantize_per_channel_affine(x, scale.float(), zero_point.to(torch.int32), axis, qmin, qmax)


add_backend("aten", AtenKernels())


def _formula(x, inv, scale, lo, hi):
    return torch.clamp(torch.round(x * inv), lo, hi) * scale


def compiled_formula():
    """The formula through torch.compile (inductor's C++ codegen: one fused loop), or None without a compiler."""
    try:
        fn = torch.compile(_formula, dynamic=True)
        fn(torch.ones(8), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(15.0))
        return fn
    except Exception as exc:  # no C++ compiler, no inductor on this platform
        print(f"torch.compile unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _timer(device: torch.device, repeats: int):
    """time(fn) -> median seconds per call; calls are batched so that each sample is long enough to measure."""

    def time_fn(fn, numel: int) -> float:
        # each sample a batch of calls long enough to time: on CPU a lone 0.1 ms call is at the mercy of a noisy
        # neighbour (medians of single calls at 2M elements moved 0.27-0.32x of copy between two quiet runs)
        inner = max(1, 2**25 // numel) if device.type == "cuda" else max(1, 2**24 // numel)
        for _ in range(2):
            fn()
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples.append((time.perf_counter() - t0) / inner)
        return statistics.median(samples)

    return time_fn


def _builtin_minmax_fq(x2d: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = torch.aminmax(x2d, dim=1)
    grid = grid_from_range(lo, hi, bits, symmetric=False)
    return torch.fake_quantize_per_channel_affine(x2d, grid.scale, grid.zero_point, 0, grid.qmin, grid.qmax)


def kernel_rows(device: torch.device, sizes: list[int], repeats: int, triton_backend, compiled=None) -> list[tuple]:
    """(elements, op, ms, GB/s, fraction of copy, goal or None) per op and size."""
    time_fn = _timer(device, repeats)
    qmax = 2**BITS - 1
    scale = torch.tensor([0.05], device=device)
    zp = torch.tensor([3], device=device, dtype=torch.int32)
    cpu = device.type == "cpu"
    ours = TorchBuiltinBackend()
    rows = []
    for n in sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n // 16384, 16, 32, 32, device=device, generator=gen)
        y = torch.empty_like(x)
        x2d = x.view(n // CHANNEL_ROW, CHANNEL_ROW)
        cscale = torch.rand(x2d.shape[0], device=device, generator=gen) * 0.1 + 0.01
        czp = torch.randint(0, qmax + 1, (x2d.shape[0],), device=device, dtype=torch.int32, generator=gen)
        terms = (1 / scale, scale, -zp.float(), qmax - zp.float())
        cterms = tuple(t[:, None] for t in (1 / cscale, cscale, -czp.float(), qmax - czp.float()))
        ops = [("copy `y.copy_(x)`", lambda: y.copy_(x), None),
               ("per-tensor, ATen", lambda: torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, qmax), None)]
        if cpu:
            ops.append((f"per-tensor, dfqbench torch backend ({CPU_PATH})",
                        lambda: ours.per_tensor(x, scale, zp, 0, qmax), CPU_GOAL))
            ops.append(("per-tensor, four-pass torch formula (the fallback)",
                        lambda: torch_formula(x, *(float(t) for t in terms)), None))
            if compiled is not None:
                ops.append(("per-tensor, torch.compile formula (not kept)", lambda: compiled(x, *terms), None))
        if triton_backend is not None:
            ops.append(("per-tensor, Triton", lambda: triton_backend.per_tensor(x, scale, zp, 0, qmax), None))
        ops.append(("per-channel (axis 0), ATen",
                    lambda: torch.fake_quantize_per_channel_affine(x2d, cscale, czp, 0, 0, qmax), None))
        if cpu:
            ops.append((f"per-channel (axis 0), dfqbench torch backend ({CPU_PATH})",
                        lambda: ours.per_channel(x2d, cscale, czp, 0, 0, qmax), CPU_GOAL))
            ops.append(("per-channel (axis 0), four-pass torch formula (the fallback)",
                        lambda: torch_formula(x2d, *cterms), None))
            if compiled is not None:
                ops.append(("per-channel (axis 0), torch.compile formula (not kept)",
                            lambda: compiled(x2d, *cterms), None))
        if triton_backend is not None:
            ops.append(("per-channel (axis 0), Triton",
                        lambda: triton_backend.per_channel(x2d, cscale, czp, 0, 0, qmax), None))
        ops.append(("min/max range + per-channel, ATen (aminmax, grid, fake-quant)",
                    lambda: _builtin_minmax_fq(x2d, BITS), None))
        if triton_backend is not None:
            from dfqbench.quant.kernels.triton_kernels import fused_minmax_fake_quant_per_channel

            ops.append(("min/max range + per-channel, Triton fused",
                        lambda: fused_minmax_fake_quant_per_channel(x2d, BITS, 0), None))
        with torch.inference_mode():
            copy_s = None
            for name, fn, goal in ops:
                seconds = time_fn(fn, n)
                copy_s = copy_s or seconds
                rows.append((n, name, seconds * 1e3, 8 * n / seconds / 1e9, copy_s / seconds, goal))
        del x, y, x2d
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def end_to_end(device: torch.device, backend: str, batches: int, batch_size: int = 500) -> tuple[float, float]:
    """(FP32 images/s, W4A4 fake-quant images/s) of a random-weight ResNet-20: FP32 and quantized batches
    alternate (a noisy neighbour slows both alike), median seconds per batch of each."""
    from pytorchcv.model_provider import get_model

    torch.manual_seed(0)
    model = get_model("resnet20_cifar10", pretrained=False).eval().to(device, memory_format=torch.channels_last)
    qmodel = quantize_model(copy.deepcopy(model), Convention.from_dict({"name": "gdfq"}), 4, 4).to(device)
    for q in act_quantizers(qmodel):
        q.set_range(0.0, 4.0)
    inputs = [torch.randn(batch_size, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
              for _ in range(2)]
    times: dict[int, list[float]] = {0: [], 1: []}
    with use_backend(backend), frozen_weights(qmodel), torch.inference_mode():
        for net in (model, qmodel):
            net(inputs[0])  # warm-up (and the quantized weights, computed once)
        for i in range(batches):
            for k, net in enumerate((model, qmodel)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                net(inputs[i % 2])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
    return batch_size / statistics.median(times[0]), batch_size / statistics.median(times[1])


def end_to_end_glibc_defaults(batches: int, threads: int) -> tuple[float, float]:
    """end_to_end on CPU in a child process that leaves glibc's allocator settings as they are."""
    code = ("import json, torch, sys; sys.path.insert(0, 'scripts'); import bench_fakequant as b; "
            f"torch.set_num_threads({threads}); print(json.dumps(b.end_to_end(torch.device('cpu'), 'torch', "
            f"{batches})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DFQ_KEEP_FREED_MEMORY": "0"},
                         cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def _mark(ratio: float, goal: float | None) -> str:
    return "" if goal is None else f" (goal >= {goal}x: {'met' if ratio >= goal else 'NOT met'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--max-elements", type=int, default=None,
                        help="largest tensor (default: 16M elements on CPU, 256M on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per row (default 7 CPU, 20 CUDA)")
    parser.add_argument("--e2e-batches", type=int, default=8, help="batches of 500 images per end-to-end figure")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    args = parser.parse_args()
    allocator = keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    max_elements = args.max_elements or (2**28 if cuda else 2**24)
    sizes = [n for n in SIZES if n <= max_elements]
    repeats = args.repeats or (20 if cuda else 7)
    triton_backend = None
    if cuda and resolve_backend_name("triton") == "triton":
        with use_backend("triton"):
            triton_backend = get_backend()
    compiled, compile_s = None, None
    if not cuda and not args.no_compile:
        t0 = time.perf_counter()
        compiled = compiled_formula()
        compile_s = time.perf_counter() - t0

    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"measured {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}; load average at start "
             f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; glibc keeps freed memory: {allocator}", "",
             f"# Fake-quant kernels: {name}", "",
             f"torch {torch.__version__}" + (f", triton {__import__('triton').__version__}" if triton_backend else
                                               ", Triton rows need CUDA") +
             f"; fp32, {BITS}-bit grid; median of {repeats} batches of calls; "
             "GB/s = 8 bytes/element (read x + write y) / time" +
             (f"; torch.compile's first call (the compile) {compile_s:.1f} s" if compiled is not None else ""), "",
             "| elements | op | ms | GB/s | vs copy |", "|---:|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for n, op, ms, gbs, ratio, goal in kernel_rows(device, sizes, repeats, triton_backend, compiled):
        lines.append(f"| {n:,} | {op} | {ms:.3f} | {gbs:.1f} | {ratio:.2f}x{_mark(ratio, goal)} |")
        print(lines[-1], flush=True)

    e2e = [(torch.device("cpu"), "torch", E2E_GOAL), (torch.device("cpu"), "aten", None)]
    if cuda:
        e2e += [(device, "torch", None)] + ([(device, "triton", None)] if triton_backend else [])
    lines += ["", "| ResNet-20, batch 500, channels_last | FP32 images/s | W4A4 fake-quant images/s | quant / FP32 |",
              "|---|---:|---:|---:|"]
    print("\n".join(lines[-3:]), flush=True)
    for dev, backend, goal in e2e:
        fp32, quant = end_to_end(dev, backend, args.e2e_batches)
        label = "dfqbench torch backend" if backend == "torch" and dev.type == "cpu" else f"backend {backend}"
        lines.append(f"| {dev.type}, {label} | {fp32:.0f} | {quant:.0f} | {quant / fp32:.2f}x"
                     f"{_mark(quant / fp32, goal)} |")
        print(lines[-1], flush=True)
    if allocator:
        fp32_d, quant_d = end_to_end_glibc_defaults(args.e2e_batches, torch.get_num_threads())
        lines.append(f"| cpu, dfqbench torch backend, glibc's default allocator (DFQ_KEEP_FREED_MEMORY=0) | "
                     f"{fp32_d:.0f} | {quant_d:.0f} | {quant_d / fp32_d:.2f}x |")
        print(lines[-1], flush=True)
    emit(lines, args.out, echo=False)  # printed row by row above


if __name__ == "__main__":
    main()
