"""Batches straight from prepared arrays: index a permutation, no per-sample collate.

A split whose arrays fit `resident_bytes` (trainer.resident_gib, 2 GiB by default: every stand-in) is converted
to tensors once and lives on the target device (GPU memory on CUDA); a larger one stays memory-mapped and each
batch is read with one fancy-index per array. With `prefetch` (trainer.prefetch; on by default on CUDA) a
background thread gathers the next batch into pinned host memory while the current one trains, and the copy to
the device is issued without blocking the host. Arrays keep their stored dtype (uint8 frames stay uint8, 4x
smaller on the device); `g2d.data.transforms.InputPipeline` turns a batch into model inputs. The permutation is
drawn in the caller's thread from its generator, so prefetching never changes which samples a batch holds.
"""
from __future__ import annotations

import queue
import threading

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
                 shuffle: bool = False, generator: torch.Generator | None = None, task: str = "classification",
                 resident_bytes: int = IN_MEMORY_BYTES, prefetch: bool = False, drop_last: bool = False):
        self.keys = list(arrays)
        self.n = len(arrays["label"])
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.generator = generator
        self.task = task
        self.drop_last = drop_last and self.n >= batch_size  # never an empty epoch
        self.prefetch = prefetch
        self.pin = self.device.type == "cuda"
        total = sum(a.nbytes for a in arrays.values())
        self.arrays = arrays
        self.tensors = None
        self.resident = total <= resident_bytes
        if self.resident:
            self.tensors = {k: _to_tensor(np.array(a)).to(self.device) for k, a in arrays.items()}
            self._fix_label(self.tensors)

    def _fix_label(self, batch):
        batch["label"] = batch["label"].float() if self.task == "regression" else batch["label"].long()

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return (self.n + self.batch_size - 1) // self.batch_size

    def _chunks(self):
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        stop = len(self) * self.batch_size if self.drop_last else self.n
        return [order[s:s + self.batch_size] for s in range(0, stop, self.batch_size)]

    def _host_batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        i = idx.numpy()
        order = np.argsort(i, kind="stable")  # read in file order (fast on a memory map), then back to the
        back = np.argsort(order)  # batch's order: per-sample augmentation draws go to the same samples as resident
        batch = {k: _to_tensor(a[i[order]][back]) for k, a in self.arrays.items()}
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def _to_device(self, batch: dict) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self._fix_label(batch)
        return batch

    def __iter__(self):
        chunks = self._chunks()  # drawn here, in the caller's thread: the stream does not depend on prefetch
        if self.tensors is not None:
            for idx in chunks:
                i = idx.to(self.device)
                yield {k: v.index_select(0, i) for k, v in self.tensors.items()}
        elif not self.prefetch:
            for idx in chunks:
                yield self._to_device(self._host_batch(idx))
        else:
            yield from self._prefetched(chunks)

    def _prefetched(self, chunks, depth: int = 2):
        """Host batches gathered by a daemon thread `depth` ahead; its errors re-raise here."""
        q: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()
        done = object()

        def work():
            try:
                for idx in chunks:
                    item = self._host_batch(idx)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)

        t = threading.Thread(target=work, name="g2d-prefetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._to_device(item)
        finally:
            stop.set()
            while t.is_alive():  # unblock a put waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                t.join(timeout=0.05)
