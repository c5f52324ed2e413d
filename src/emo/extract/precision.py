"""The arithmetic of the extraction forward pass: fp32, or bf16 where the hardware computes it natively.

Under bf16 autocast the convolutions run in bfloat16 and the pooled rows are accumulated in
float32. Hardware without native bf16 emulates it, which is slower than fp32, so ``auto`` only
picks bf16 on CUDA GPUs of compute capability 8.0 (Ampere) or newer and on CPUs with AVX512-BF16
or AMX-BF16.
"""

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
# Flags in /proc/cpuinfo for instructions that compute bf16 dot products natively.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")
CUDA_BF16_CAPABILITY = (8, 0)


def read_cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """Return the feature flags of the first processor listed in ``cpuinfo``.

    Returns an empty set where the file does not exist (any OS but Linux), so ``auto`` falls back
    to fp32 there.

    Example:
        >>> "avx2" in read_cpu_flags()  # doctest: +SKIP
        True
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(device: torch.device, *, cpu_flags: frozenset[str] | None = None,
                    cuda_capability: tuple[int, int] | None = None) -> bool:
    """Return whether ``device`` computes bf16 natively.

    Args:
        device: the device of the forward pass.
        cpu_flags: CPU feature flags; read from /proc/cpuinfo when ``None``.
        cuda_capability: the GPU's compute capability; queried from CUDA when ``None``.

    Example:
        >>> has_native_bf16(torch.device("cpu"), cpu_flags=frozenset({"avx2"}))
        False
    """
    if device.type == "cuda":
        capability = cuda_capability if cuda_capability is not None else torch.cuda.get_device_capability(device)
        return tuple(capability) >= CUDA_BF16_CAPABILITY
    if device.type == "cpu":
        flags = cpu_flags if cpu_flags is not None else read_cpu_flags()
        return any(flag in flags for flag in CPU_BF16_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device, *, cpu_flags: frozenset[str] | None = None,
                      cuda_capability: tuple[int, int] | None = None) -> str:
    """Turn ``auto`` into ``bf16`` or ``fp32`` for ``device``; return ``fp32`` and ``bf16`` unchanged.

    Args:
        precision: ``auto``, ``fp32`` or ``bf16``.
        device: the device of the forward pass.
        cpu_flags: CPU feature flags, as for :func:`has_native_bf16`.
        cuda_capability: the GPU's compute capability, as for :func:`has_native_bf16`.

    Returns:
        ``"fp32"`` or ``"bf16"``.

    Example:
        >>> resolve_precision("auto", torch.device("cpu"), cpu_flags=frozenset({"avx512_bf16"}))
        'bf16'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    native = has_native_bf16(device, cpu_flags=cpu_flags, cuda_capability=cuda_capability)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        logger.warning("%s has no native bf16 arithmetic, so --precision bf16 is emulated and likely slower "
                       "than fp32", device)
    return precision
