"""What this CPU's integer and bf16 kernels can do, from /proc/cpuinfo: bars and checks that depend on it."""

FLAGS = set(next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), []))
# int8 dot products without saturation: without these (AVX2 only), the runtimes' u8 x s8 kernels sum pairs into
# saturating int16, so deploy builds int8 with 7-bit weights there (docs/deploy.md), and a full-range int8 file
# (train --qat's) is rounded to 7 bits when compiled there
VNNI = bool(FLAGS & {"avx512_vnni", "avx_vnni", "amx_int8"})
# bf16 arithmetic: without it OpenVINO's bf16 hint leaves fp32 (torch emulates bf16)
BF16 = bool(FLAGS & {"avx512_bf16", "amx_bf16"})
