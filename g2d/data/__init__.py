"""Datasets: importing this package registers every dataset module."""
from g2d.data import cremad  # noqa: F401
