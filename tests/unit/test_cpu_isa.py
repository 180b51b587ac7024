"""The CPU instruction-set pin (g2d/cpu_isa.py): set on AVX2 x86-64, never over a user's value, off on request."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from g2d.cpu_isa import OFF, PINS, has_avx2, pin_cpu_isa


def _cpuinfo(tmp_path, flags: str):
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse sse2 {flags}\n\n")
    return str(p)


def test_pins_all_three_on_avx2_x86(tmp_path):
    env = {}
    assert pin_cpu_isa(env, "x86_64", _cpuinfo(tmp_path, "fma avx avx2 bmi2")) == PINS
    assert env == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_keeps_the_users_values_and_can_be_turned_off(tmp_path):
    info = _cpuinfo(tmp_path, "avx2")
    env = {"MKL_CBWR": "COMPATIBLE"}
    assert set(pin_cpu_isa(env, "x86_64", info)) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"}
    assert env["MKL_CBWR"] == "COMPATIBLE"
    env = {OFF: "1"}
    assert pin_cpu_isa(env, "x86_64", info) == {} and env == {OFF: "1"}


@pytest.mark.parametrize("machine,flags", [("aarch64", "avx2"), ("x86_64", "avx avx512f"), ("x86_64", "avx2x")])
def test_no_pin_without_avx2_x86(tmp_path, machine, flags):
    """avx512f alone, a flag merely starting with avx2, or another architecture: nothing to pin to."""
    env = {}
    assert pin_cpu_isa(env, machine, _cpuinfo(tmp_path, flags)) == {} and env == {}


@pytest.mark.skipif(not has_avx2(), reason="this CPU has no AVX2: g2d pins nothing here")
def test_importing_g2d_pins_torch_kernels_before_the_first_op():
    """A fresh process: `import torch` first (as a test or notebook would), then g2d, then ops."""
    env = {k: v for k, v in os.environ.items() if k not in PINS and k != OFF}
    code = ("import os, torch, g2d; torch.ones(2) + 1; "
            "print(torch.backends.cpu.get_cpu_capability(), *(os.environ.get(k) for k in %r))" % (sorted(PINS),))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AVX2", "avx2", "AVX2", "AVX2"]
