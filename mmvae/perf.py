"""How close a step runs to the machine's peak: FLOP of a step, the box's matmul peak, efficiency.

Absolute throughput moves from box to box; the ratio of achieved FLOP/s to the box's own dense
matmul peak (same precision, same thread count, measured in the same process) is what travels.
The benchmarks (benchmarks/bench*.py) share these pieces:

    flops = count_flops(step)                         # once, outside the timing
    ... time `step` ...
    peak = matmul_peak(precision_dtype("bf16"), device)
    record = efficiency(flops, seconds_per_step, peak)  # JSON fields
    print(profile_table(step, device))                # top operators of one step (--profile)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""train.mixed_precision -> the dtype of autocast's matmuls (the peak to compare with)."""


def precision_dtype(precision: str) -> torch.dtype:
    return PRECISION_DTYPES[precision]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOP of one call of `fn` (forward and backward if it backpropagates), as counted by
    torch's FlopCounterMode: matmuls and convolutions only, so elementwise maths is 'free' and
    the efficiency is that of the dense work."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass
class Peak:
    flops_per_s: float
    n: int  # side of the square matmul that gave it
    dtype: torch.dtype
    threads: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_matmul_seconds(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    torch.mm(a, b)  # first call: allocation, kernel selection
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                max_n: int | None = None, repeats: int = 5, max_call_seconds: float = 0.25) -> Peak:
    """The best FLOP/s of square n x n x n matmuls in `dtype` with the current thread count: n
    doubles from 256 to `max_n` (2048 on CPU, 8192 on CUDA), or until one call takes
    `max_call_seconds`; best of `repeats` calls at each size, best over the sizes. Best-of, and
    several sizes, because a shared box only ever makes a matmul slower, and a small one (a
    few scheduler ticks) can lose a whole tick to another process."""
    device = torch.device(device)
    max_n = max_n or (8192 if device.type == "cuda" else 2048)
    best, n = Peak(0.0, 0, dtype, torch.get_num_threads()), min(256, max_n)
    while True:
        seconds = _best_matmul_seconds(n, dtype, device, repeats)
        if 2 * n**3 / seconds > best.flops_per_s:
            best = Peak(2 * n**3 / seconds, n, dtype, best.threads)
        if n >= max_n or seconds >= max_call_seconds:
            return best
        n = min(2 * n, max_n)


def efficiency(flops: int, seconds: float, peak: Peak) -> dict:
    """The JSON fields of a benchmark: FLOP per measured step, achieved and peak GFLOP/s,
    efficiency = achieved / peak."""
    achieved = flops / seconds
    return {"gflop_per_step": round(flops / 1e9, 3), "achieved_gflops": round(achieved / 1e9, 2),
            "peak_gflops": round(peak.flops_per_s / 1e9, 2),
            "peak_matmul": f"{peak.n}^3 {str(peak.dtype).removeprefix('torch.')}",
            "peak_threads": peak.threads, "efficiency": round(achieved / peak.flops_per_s, 4)}


def profile_table(fn: Callable[[], object], device: torch.device | str = "cpu",
                  top: int = 15) -> str:
    """The `top` operators of one call of `fn` by self time (CUDA time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=top)
