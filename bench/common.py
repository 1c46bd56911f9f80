"""Shared benchmark helpers: timing with noise figures, memory probes, machine limits, traffic counting.

Nothing here imports the engine; `bench/patcher.py` (and later benches) build on it.

Timing: every figure is a median over repetitions after warm-ups; `Samples` keeps all repetitions so a
table can show min/max and the spread ((max - min) / median), the noise this 2-core shared VM has.
On CUDA every timed region is closed with `torch.cuda.synchronize()`.

Traffic: `OpCounter` is a TorchDispatchMode that sums, per ATen op, the bytes of its tensor inputs
(read) and outputs (written) and the FLOPs of GEMMs/convolutions. Views are free; `copy_`/`fill_`/`out=`
destinations are written, not read. It is a cache-free model of memory traffic (what a GPU streams from
HBM for tensors larger than L2), used to count passes over the weights per approach.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GB = 1e9


# --- timing ------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Samples:
    """Repeated timings of one thing, in seconds."""

    values: list = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def min(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def max(self) -> float:
        return max(self.values) if self.values else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median: the noise figure shown next to each median."""
        if len(self.values) < 2 or self.median == 0:
            return 0.0
        return (self.max - self.min) / self.median

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "spread": self.spread,
                "n": len(self.values), "values_s": self.values}


class Timer:
    """`with timer(samples): ...` adds the elapsed wall time (synchronized on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, samples: Samples) -> "_Timed":
        return _Timed(self.device, samples)


class _Timed:
    def __init__(self, device: torch.device, samples: Samples) -> None:
        self.device, self.samples = device, samples

    def __enter__(self) -> "_Timed":
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.samples.add(time.perf_counter() - self.t0)


def timeit(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> Samples:
    s = Samples()
    for _ in range(warmup):
        fn()
    sync(device)
    for _ in range(reps):
        with _Timed(device, s):
            fn()
    return s


# --- memory ------------------------------------------------------------------------------------------

def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def release_host_memory() -> None:
    """Collect garbage and give freed heap back to the OS (so RSS peaks of the next phase are visible)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak extra memory of a region: host RSS high-water mark on CPU, allocator peak on CUDA.

    CPU: `/proc/self/clear_refs` ← 5 resets VmHWM; extra = VmHWM − RSS at entry. Freed-but-kept heap
    (glibc) can hide part of a peak, so `release_host_memory()` is called first.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_extra = 0
        self.held_extra = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            release_host_memory()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_extra = torch.cuda.max_memory_allocated(self.device) - self.base
            self.held_extra = torch.cuda.memory_allocated(self.device) - self.base
        else:
            self.peak_extra = _status_kb("VmHWM") - self.base
            self.held_extra = _status_kb("VmRSS") - self.base


# --- machine limits ----------------------------------------------------------------------------------

def machine_limits(device: torch.device, dtype: torch.dtype, reps: int, copy_bytes: int, gemm_n: int) -> dict:
    """Copy and in-place read-modify-write bandwidth (bytes read + written) and GEMM rate in `dtype`."""
    n = copy_bytes // torch.tensor([], dtype=dtype).element_size()
    a = torch.empty(n, dtype=dtype, device=device).normal_()
    b = torch.empty_like(a).normal_()
    nbytes = a.numel() * a.element_size()
    copy = timeit(lambda: b.copy_(a), device, reps, warmup=2)
    rmw = timeit(lambda: a.add_(b, alpha=1e-3), device, reps, warmup=2)  # reads a, b; writes a: 3 passes
    del a, b
    x = torch.randn(gemm_n, gemm_n, dtype=dtype, device=device)
    y = torch.randn(gemm_n, gemm_n, dtype=dtype, device=device)
    z = torch.empty_like(x)
    gemm = timeit(lambda: torch.mm(x, y, out=z), device, reps, warmup=2)
    del x, y, z
    release_host_memory()
    flops = 2.0 * gemm_n ** 3
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "copy_GBps": 2 * nbytes / copy.median / GB,
        "copy_GBps_best": 2 * nbytes / copy.min / GB,
        "copy_spread": copy.spread,
        "rmw_GBps": 3 * nbytes / rmw.median / GB,
        "rmw_GBps_best": 3 * nbytes / rmw.min / GB,
        "rmw_spread": rmw.spread,
        "gemm_GFLOPs": flops / gemm.median / 1e9,
        "gemm_GFLOPs_best": flops / gemm.min / 1e9,
        "gemm_spread": gemm.spread,
        "gemm_n": gemm_n,
        "copy_bytes": nbytes,
    }


# --- traffic and FLOP counting --------------------------------------------------------------------------

_WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "set_"}
_GEMM = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


class OpCounter(TorchDispatchMode):
    """Counts bytes read/written and GEMM/conv FLOPs of every ATen op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.read = 0
        self.written = 0
        self.flops = 0
        self.ops = 0
        self.allocs = 0            # ops that returned a new full-size tensor (≥ 1 MiB)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        name = schema.name.split("::")[-1]
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return out   # a view: no traffic
        self.ops += 1
        base = name.rstrip("_") + "_" if name.endswith("_") else name
        write_only_self = base in _WRITE_ONLY
        for i, a in enumerate(schema.arguments):
            v = args[i] if i < len(args) else kwargs.get(a.name)
            if v is None:
                continue
            if a.name == "out" or (write_only_self and i == 0):
                continue
            for t in _tensors(v):
                self.read += _nbytes(t)
        outs = _tensors(out)
        for t in outs:
            self.written += _nbytes(t)
        fresh = all(r.alias_info is None for r in schema.returns)
        if fresh and "out" not in kwargs:
            self.allocs += sum(1 for t in outs if _nbytes(t) >= 1 << 20)
        name = name.rstrip("_")    # in-place variants (addmm_, baddbmm_) count as their op
        if name in _GEMM:
            if name in ("mm", "addmm", "matmul") and outs:
                # mm(a, b) / matmul(a, b): k = a's last dim; addmm(c, a, b): k = a's last dim
                k = args[1].shape[-1] if name == "addmm" else args[0].shape[-1]
                self.flops += 2 * outs[0].numel() * k
            elif name in ("bmm", "baddbmm") and outs:
                k = args[0].shape[-1] if name == "bmm" else args[1].shape[-1]
                self.flops += 2 * outs[0].numel() * k
        elif name == "convolution" and outs:
            # out (N, O, H, W) × per-output-element work in/groups·kh·kw (weight[0])
            self.flops += 2 * outs[0].numel() * args[1][0].numel()
        return out

    @property
    def bytes(self) -> int:
        return self.read + self.written

    def to_dict(self) -> dict:
        return {"read_bytes": self.read, "written_bytes": self.written, "flops": self.flops, "ops": self.ops,
                "big_allocs": self.allocs}


# --- formatting -------------------------------------------------------------------------------------------

def fmt_ms(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "-"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"


def fmt_num(x: Optional[float], digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-"
    return f"{x:.{digits}f}"


def md_table(header: list, rows: list) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def env_summary(device: torch.device) -> dict:
    d = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
         "device": str(device)}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    try:
        d["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return d
