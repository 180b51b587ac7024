"""g2d-bench: modality-imbalance benchmark (G2D and baselines)."""
from g2d.cpu_isa import pin_cpu_isa

pin_cpu_isa()  # before any torch kernel runs: same CPU bits on every AVX2 x86-64 machine (g2d/cpu_isa.py)

__version__ = "0.1.0"
