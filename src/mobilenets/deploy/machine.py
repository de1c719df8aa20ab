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


# instructions that add u8 x s8 products straight into int32 (no saturating int16 pair sums on the way)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
X86 = ("x86_64", "amd64", "i386", "i686")


def int8_saturates() -> bool:
    """True on an x86 CPU without VNNI (AVX2 only): there ONNX Runtime's and OpenVINO's int8 kernels multiply uint8
    activations by int8 weights with vpmaddubsw, which adds each pair of products into a saturating int16, so
    full-range int8 weights lose answers (the real 1.0-224 weights kept 34-43% of the float top-1 answers)."""
    return platform.machine().lower() in X86 and not cpu_flags() & set(VNNI_FLAGS)


def int8_weight_qmax() -> int:
    """The widest int8 weight grid, [-qmax, qmax], that this CPU's int8 kernels sum without saturating."""
    from ..quantize.sim import REDUCED_WEIGHT_QMAX, WEIGHT_QMAX

    return REDUCED_WEIGHT_QMAX if int8_saturates() else WEIGHT_QMAX


def bf16_supported() -> bool:
    """True when the CPU computes bfloat16 natively (AMX tiles or AVX-512 BF16); elsewhere bf16 is emulated and slow."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags
