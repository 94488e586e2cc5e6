"""`train.mixed_precision: auto`: bf16 where the hardware runs it natively, fp32 (`no`) elsewhere.

Native bf16 means a CUDA device that supports it (Ampere and later), or a CPU with avx512_bf16
or AMX (amx_bf16): there, bf16 autocast roughly halves the step time; on other CPUs bf16 is
emulated and slower than fp32. fp16 is never chosen (it needs loss scaling and buys nothing
over bf16 where bf16 is native).
"""
from __future__ import annotations

import os

import torch

from mmvae.config import Config

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of a CPU with native bf16 matmuls (either is enough)."""


def choose_precision(device_type: str, cpu_flags: set[str] = frozenset(),
                     cuda_bf16: bool = False) -> tuple[str, str]:
    """The precision `auto` stands for, and why: ("bf16" | "no", reason). Pure, for tests."""
    if device_type == "cuda":
        return ("bf16", "the GPU supports bf16") if cuda_bf16 else \
            ("no", "the GPU has no native bf16")
    native = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in cpu_flags]
    if native:
        return "bf16", f"the CPU has {' and '.join(native)}"
    return "no", "the CPU has neither avx512_bf16 nor AMX"


def cpu_flags() -> set[str]:
    """The CPU's feature flags: /proc/cpuinfo on Linux, else torch's own CPU probes."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    cpu = getattr(torch._C, "_cpu", None)
    return {flag for flag, probe in probes.items() if getattr(cpu, probe, lambda: False)()}


def resolve_precision(cfg: Config, device_type: str | None = None, *, announce: bool = True) -> str:
    """cfg.train.mixed_precision with `auto` replaced by the choice -- in `cfg` too, so the run's
    config.yaml, W&B and the benchmarks show what ran -- said in one line at start (unless
    `announce` is False: the trainer says it once its start checks have passed, so that a bad
    start stays one line). Other values are returned as they are."""
    if cfg.train.mixed_precision != "auto":
        return cfg.train.mixed_precision
    precision, reason = auto_precision(device_type)
    cfg.train.mixed_precision = precision
    # Called before the Accelerator exists, so the launcher's RANK says which process speaks.
    if announce and os.environ.get("RANK", "0") == "0":
        from mmvae.log import console

        console.print(auto_message(precision, reason))
    return precision


def auto_precision(device_type: str | None = None) -> tuple[str, str]:
    """What `auto` stands for on this machine's `device_type` (default: cuda if available)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
    flags = cpu_flags() if device_type == "cpu" else set()
    return choose_precision(device_type, flags, cuda_bf16)


def auto_message(precision: str, reason: str) -> str:
    return f"train.mixed_precision=auto -> {precision} ({reason})"
