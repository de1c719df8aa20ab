"""What this CPU can do (instruction-set flags, bf16), and the error for a request it or a runtime cannot serve."""

from __future__ import annotations

import platform
from pathlib import Path

from ..errors import MobilenetsError


class DeployError(MobilenetsError):
    """A request this machine or backend cannot serve; the message says what would work."""


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1]
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    flags = _cpuinfo_field("flags")
    return set(flags.split()) if flags else set()


def cpu_name() -> str:
    name = _cpuinfo_field("model name")
    return name.strip() if name else (platform.processor() or platform.machine())


def bf16_supported() -> bool:
    """True when the CPU computes bfloat16 natively (AMX tiles or AVX-512 BF16); elsewhere bf16 is emulated and slow."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags
