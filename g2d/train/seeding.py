"""Seeding and deterministic mode; RNG state capture for exact resume."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """Every global RNG's state as tensors, ints and lists only, so a checkpoint holding it loads with
    `torch.load(weights_only=True)` (Python's and numpy's state tuples are converted; see set_rng_state)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [int(version), torch.tensor(internal, dtype=torch.int64),
                        None if gauss is None else float(gauss)],
             "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state captured (also accepts the native tuples older checkpoints held)."""
    version, internal, gauss = state["python"]
    if torch.is_tensor(internal):
        internal = tuple(int(x) for x in internal.cpu().tolist())
    random.setstate((int(version), tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    if torch.is_tensor(keys):
        keys = keys.cpu().numpy()
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].cpu())  # .cpu(): a checkpoint loaded with map_location=cuda
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name!r} but no CUDA device is visible; use trainer.device=auto or cpu")
    return dev
