"""Batches straight from prepared arrays: index a permutation, no per-sample collate.

Small (stand-in) splits are converted to tensors once and live on the target device; large ones
stay memory-mapped and each batch is read with one fancy-index per array. Arrays keep their stored
dtype (uint8 frames stay uint8, 4x smaller on the device); `g2d.data.transforms.InputPipeline` turns
a batch into model inputs.
"""
from __future__ import annotations

import numpy as np
import torch

IN_MEMORY_BYTES = 2 * 1024**3


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype in (torch.float16, torch.float64):
        return t.float()
    return t


class BatchLoader:
    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, device: torch.device,
                 shuffle: bool = False, generator: torch.Generator | None = None, task: str = "classification"):
        self.keys = list(arrays)
        self.n = len(arrays["label"])
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.generator = generator
        self.task = task
        total = sum(a.nbytes for a in arrays.values())
        self.arrays = arrays
        self.tensors = None
        if total <= IN_MEMORY_BYTES:
            self.tensors = {k: _to_tensor(np.array(a)).to(device) for k, a in arrays.items()}
            self._fix_label(self.tensors)

    def _fix_label(self, batch):
        batch["label"] = batch["label"].float() if self.task == "regression" else batch["label"].long()

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.tensors is not None:
                i = idx.to(self.device)
                yield {k: v.index_select(0, i) for k, v in self.tensors.items()}
            else:
                srt = np.sort(idx.numpy())
                batch = {k: _to_tensor(a[srt]).to(self.device, non_blocking=True) for k, a in self.arrays.items()}
                self._fix_label(batch)
                yield batch
