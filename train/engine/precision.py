"""Which mixed precision a run uses."""

from __future__ import annotations

import torch


def resolve_mixed_precision(setting: str, on_cpu: bool) -> str:
    """`training.mixed_precision` for Accelerate. "auto" is bf16 autocast where the hardware computes bf16 natively (a
    GPU that supports it; a CPU with AVX512-BF16 or AMX), else "no" (fp32): emulated bf16 would be slower than
    fp32. "fp32" is "no"; any other value is passed on as it is."""
    if setting != "auto":
        return "no" if setting == "fp32" else setting
    if not on_cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if native else "no"
