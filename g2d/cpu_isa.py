"""Pin the CPU instruction set of torch's kernels, so CPU runs give the same bits on every x86-64 machine with AVX2.

ATen's vectorised kernels, MKL's BLAS and oneDNN's convolutions each pick a code path from the CPU they run on
(AVX2, AVX-512, ...), and the paths round differently: on one AVX2 machine a conv, a matmul, a softmax, a
layer norm and a batch norm each gave different bits under another path (ATEN_CPU_CAPABILITY=default changed all
five, ONEDNN_MAX_CPU_ISA=SSE41 the conv, MKL_CBWR=COMPATIBLE the matmul). Over 20 epochs those bits grow into
different accuracies: the same code and byte-identical prepared data gave table cells up to ~0.5 points apart
on two machines. Pinning all three to AVX2 (the native path of an AVX2 machine, so its bits do not change) makes
an AVX-512 machine run the same kernels. Set at import of `g2d`, before the first tensor op reads them; a value
the user set is kept, and G2D_NATIVE_ISA=1 turns the pin off (each library then picks its fastest path).
Machines without AVX2 (aarch64, old x86) are not pinned and do not reproduce x86 bits.
"""
from __future__ import annotations

import os
import platform

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
OFF = "G2D_NATIVE_ISA"


def has_avx2(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and "avx2" in line.split(":", 1)[-1].split() for line in f)
    except OSError:
        return False


def pin_cpu_isa(environ=os.environ, machine: str | None = None, cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """Set the unset PINS in `environ` on an x86-64 machine with AVX2; return what was set."""
    if environ.get(OFF, "").strip() not in ("", "0"):
        return {}
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64") or not has_avx2(cpuinfo):
        return {}
    new = {k: v for k, v in PINS.items() if k not in environ}
    environ.update(new)
    return new
