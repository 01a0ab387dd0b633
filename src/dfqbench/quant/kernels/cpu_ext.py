"""dfqbench's C fake-quant kernel for CPUs (csrc/fakequant_cpu.c): one OpenMP pass instead of the torch formula's
four, built with the system C compiler on first use and loaded through ctypes (no torch headers: about a second).

The shared library is cached per source, compiler flags and CPU (`-march=native`) under
$DFQ_CACHE_DIR/ext (default ~/.cache/dfqbench/ext), written atomically. Without a compiler, or with
DFQ_CPU_KERNEL=0, `library()` is None and kernels/aten.py keeps the torch formula (the same values).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "fakequant_cpu.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared"]
_state: dict = {}


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    except OSError:
        keep = []
    return "|".join([platform.machine(), *keep])


def _cache_dir() -> Path:
    root = os.environ.get("DFQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dfqbench")
    return Path(root) / "ext"


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise OSError("no C compiler (gcc/cc) on PATH")
    code = SOURCE.read_bytes()
    key = hashlib.sha256(code + " ".join([compiler, *FLAGS]).encode() + _cpu_id().encode()).hexdigest()[:16]
    path = _cache_dir() / f"fakequant_cpu-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def library():
    """The loaded kernel library, or None (and `why_unavailable()` says why)."""
    if "lib" in _state:
        return _state["lib"]
    lib = None
    if os.environ.get("DFQ_CPU_KERNEL", "1") == "0":
        _state["why"] = "disabled by DFQ_CPU_KERNEL=0"
    else:
        try:
            lib = ctypes.CDLL(str(_build()))
            p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
            lib.fq_per_tensor.argtypes = [p, p, p, i64, f32, f32, f32, f32, i32]
            lib.fq_per_channel.argtypes = [p, p, p, i64, i64, i64, p, p, p, p, i32]
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            _state["why"] = f"{type(exc).__name__}: {exc} {detail.decode(errors='replace')[:200]}".strip()
            lib = None
    _state["lib"] = lib
    return lib


def why_unavailable() -> str | None:
    library()
    return _state.get("why")


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


@torch.compiler.disable  # a ctypes call: torch.compile runs it as it is (config `compile` is for GPUs)
def per_tensor(x: torch.Tensor, inv: float, scale: float, lo: float, hi: float, with_mask: bool):
    """x: float32, contiguous in some memory format (channels_last too: the pass is elementwise)."""
    y = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.uint8) if with_mask else None
    library().fq_per_tensor(_ptr(x), _ptr(y), _ptr(mask), x.numel(), inv, scale, lo, hi, torch.get_num_threads())
    return y, mask


def channel_layout(x: torch.Tensor, axis: int) -> tuple[int, int, int] | None:
    """(outer, channels, inner) of x's memory for a per-channel pass along `axis`, or None (another layout)."""
    if x.is_contiguous():
        outer = 1
        for d in x.shape[:axis]:
            outer *= d
        return outer, x.shape[axis], x.numel() // max(1, outer * x.shape[axis])
    if x.dim() == 4 and axis == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return x.numel() // x.shape[1], x.shape[1], 1
    return None


@torch.compiler.disable
def per_channel(x: torch.Tensor, layout, inv: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                hi: torch.Tensor, with_mask: bool):
    outer, channels, inner = layout
    y = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.uint8) if with_mask else None
    terms = [t.reshape(-1).float().contiguous() for t in (inv, scale, lo, hi)]
    library().fq_per_channel(_ptr(x), _ptr(y), _ptr(mask), outer, channels, inner, *(_ptr(t) for t in terms),
                             torch.get_num_threads())
    return y, mask
