"""The webdataset backend: WebDataset tar shards read by a torch DataLoader (workers, pinned memory,
non-blocking copies), in the exact seeded schedule.

Design. A streaming WebDataset pipeline reads each tar front to back and shuffles within a bounded buffer: its
order cannot equal the schedule (a seeded permutation of each bucket), so it cannot give MemoryLoader's batches.
Here the main process walks the schedule (``ScheduledLoader.upcoming``) and hands each worker one whole batch
spec (epoch, bucket, positions); the worker reads exactly those samples from the shards by (shard, offset) from
the ``SampleIndex`` (built once from the ShardWriter's wds2idx files) and returns the batch:
- arrays are read raw with ``preadv`` straight into the batch tensors, which a worker allocates in shared
  memory, so a sample's bytes are copied once from the page cache and once more into pinned memory (the
  DataLoader's pin thread) before the DMA; no .npy parsing, no per-sample tensors, no pickling of arrays;
- the flip decision is known before reading, so only the chosen variant is read (half the bytes of a
  read-both-then-choose loader);
- T5 crosses as unpadded rows (T, Dt) plus lengths: at random caption lengths about half the bytes of the padded
  (B, L, Dt) batch; ``pad_packed`` pads and builds the mask on the device;
- NaN/Inf are checked in the worker (``check_finite``), naming shard, sample and key.
Cost: random reads (one per array; fine on local NVMe or page cache, poor on spinning disks or network file
systems) and a start-up index pass (see index.py). Throughput scales with ``data.num_workers``; the single pin
thread (one memcpy of every byte) bounds it at a few GB/s.

The ``webdataset`` package writes the shards (ShardWriter) and validates them (``read_all``); reading here is by
index, through the same tar layout.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from nanodit.data.index import ARRAYS, DINO, LATENT, T5, SampleIndex
from nanodit.data.loader import ScheduledLoader, Semantics, pad_packed, padded_length, sample_flags, upcoming
from nanodit.data.shards import ShardError


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker it lives in shared memory, so handing it to the main
    process copies nothing (what torch's default_collate does for its batches)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


def _read_into(fd: int, offset: int, out: torch.Tensor, where: str) -> None:
    buf = memoryview(out.numpy().reshape(-1).view(np.uint8))
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise ShardError(
                f"{where}: the shard ends before the array does (truncated shard or stale index)"
            )
        done += n


def finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in a CPU fp16 tensor, i.e. no exponent field of all ones: as int16 no value >= 0x7C00 (positive
    Inf/NaN), as uint16 none >= 0xFC00 (negative). Two reductions at memory speed, no temporaries (~10 GB/s on
    one core; torch.isfinite on CPU fp16 is ~20x slower, a masked copy allocates and faults in fresh pages)."""
    a = t.numpy()
    return a.size == 0 or (int(a.view(np.int16).max()) < 0x7C00 and int(a.view(np.uint16).max()) < 0xFC00)


class BatchReader(Dataset):
    """Map-style dataset whose items are scheduled batches: ``reader[(epoch, index, bucket, positions)]`` -> host
    tensors (latent, DINO, packed T5 rows, lengths, flags) plus ids and captions."""

    def __init__(self, index: SampleIndex, sem: Semantics, check_finite: bool = True):
        self.index, self.sem, self.check_finite = index, sem, check_finite
        self._fds: dict[int, int] = {}  # per process: opened on first use (workers are forked)
        self._pid = os.getpid()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.index.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def __len__(self) -> int:
        raise TypeError("BatchReader has no length: its items are batch specs from the schedule")

    def __getitem__(self, spec: tuple) -> dict:
        epoch, pos, bucket, idx = spec
        ib, ix = self.index.buckets[bucket], self.index
        idx = np.asarray(idx, dtype=np.int64)
        ids = [ib.ids[i] for i in idx]
        flips, drop_text, drop_dino = sample_flags(ids, ib.has_flip[idx].tolist(), epoch, self.sem)
        f = np.asarray(flips, dtype=np.int64)  # (B,) 0/1: the variant column offset (+3) and t5_len column
        lens = ib.t5_len[idx, f]  # (B,)
        B, (H, W), T = len(idx), bucket, int(lens.sum())
        latent = _empty((B, ix.C, H, W), torch.float16)  # (B, C, H, W)
        dino = _empty((B, ix.Dd), torch.float16)  # (B, Dd)
        packed = _empty((T, ix.Dt), torch.float16)  # (T, Dt): valid rows only
        row = 0
        for k, i in enumerate(idx):
            fd, at = self._fd(int(ib.shard[i])), f"{ix.shards[ib.shard[i]]}: sample {ib.keys[i]}"
            v = 3 * int(f[k])
            _read_into(fd, int(ib.data_off[i, LATENT + v]), latent[k], at)
            _read_into(fd, int(ib.data_off[i, DINO + v]), dino[k], at)
            _read_into(fd, int(ib.data_off[i, T5 + v]), packed[row : row + lens[k]], at)
            row += int(lens[k])
        if self.check_finite:
            self._check_finite(latent, dino, packed, idx, f, lens, ib, bucket)
        return {
            "latent": latent,
            "dino": dino,
            "t5_packed": packed,
            "t5_len": torch.from_numpy(lens),  # (B,) int64
            "flags": torch.tensor([flips, drop_text, drop_dino]),  # (3, B) bool
            "ids": ids,
            "captions": [ib.flip_txt[i] if fl else ib.txt[i] for i, fl in zip(idx, flips)],
            "epoch": epoch,
            "index": pos,
            "bucket": bucket,
        }

    def _check_finite(self, latent, dino, packed, idx, f, lens, ib, bucket) -> None:
        if finite(latent) and finite(dino) and finite(packed):
            return
        starts = np.cumsum(lens) - lens
        for k, i in enumerate(idx):
            v = 3 * int(f[k])
            parts = ((LATENT, latent[k]), (DINO, dino[k]), (T5, packed[starts[k] : starts[k] + lens[k]]))
            for col, t in parts:
                if not finite(t):
                    raise ShardError(
                        f"{self.index.shards[ib.shard[i]]}: sample {ib.keys[i]}: key '{ARRAYS[col + v]}.npy': "
                        "contains NaN or Inf"
                    )


class _Schedule(Sampler):
    """The batch specs from a position on, endless (the DataLoader keeps them in order)."""

    def __init__(self, counts: dict, sem: Semantics, epoch: int, index: int):
        self.args = counts, sem, epoch, index

    def __iter__(self):
        for epoch, index, bucket, idx in upcoming(*self.args):
            yield epoch, index, bucket, tuple(idx)


class WebDatasetLoader(ScheduledLoader):
    """The streaming backend over a DataLoader (see the module docstring)."""

    name = "webdataset"

    def __init__(
        self,
        index: SampleIndex,
        sem: Semantics,
        device: str | torch.device = "cpu",
        num_workers: int = 2,
        prefetch: int = 4,
        check_finite: bool = True,
    ):
        super().__init__(index.counts, sem, device)
        self.data = index  # the sample index (self.index is the stream position)
        self.num_workers, self.prefetch = num_workers, prefetch
        self.reader = BatchReader(index, sem, check_finite)
        self._it = None

    def _start(self) -> None:
        workers = self.num_workers
        dl = DataLoader(
            self.reader,
            batch_size=None,
            sampler=_Schedule(self.counts, self.sem, self.epoch, self.index),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch if workers else None,
        )
        self._it, self._owner = iter(dl), os.getpid()  # a forked worker's copy of this loader owns nothing

    def _seek(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers now (dropping the iterator would too, at its next garbage collection)."""
        it, self._it = getattr(self, "_it", None), None
        if (
            it is not None
            and getattr(self, "_owner", None) == os.getpid()
            and hasattr(it, "_shutdown_workers")
        ):
            it._shutdown_workers()

    def __del__(self):
        self.close()

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        raw = next(self._it)
        epoch, bucket, idx = self._advance()
        if (raw["epoch"], raw["index"], tuple(raw["bucket"])) != (epoch, self.index - 1, bucket):
            raise RuntimeError(
                f"webdataset loader: got batch {raw['epoch']}/{raw['index']}, expected {epoch}/{self.index - 1}"
            )
        dev, nb = self.device, self.device.type == "cuda"
        lens = raw["t5_len"]
        L = padded_length(lens.tolist(), self.sem.pad_multiple)
        t5, mask = pad_packed(raw["t5_packed"].to(dev, non_blocking=nb), lens.to(dev, non_blocking=nb), L)
        flags = raw["flags"].to(dev, non_blocking=nb)
        return {
            "latent": raw["latent"].to(dev, non_blocking=nb),  # (B, C, H, W) fp16
            "dino": raw["dino"].to(dev, non_blocking=nb),  # (B, Dd) fp16
            "t5": t5,  # (B, L, Dt) fp16
            "t5_mask": mask,  # (B, L)
            "drop_text": flags[1],  # (B,)
            "drop_dino": flags[2],
            "flipped": flags[0],
            "ids": raw["ids"],
            "captions": raw["captions"],
            "epoch": epoch,
        }
