"""g2d-bench: modality-imbalance benchmark (G2D and baselines)."""
__version__ = "0.1.0"
