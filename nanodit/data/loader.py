"""Batches with one semantics for every loader backend.

Semantics (what a batch is, independent of how bytes reach the GPU):
- one bucket per batch; each epoch, every bucket's samples are shuffled (seeded by seed and epoch), cut into
  batches (the remainder is a smaller last batch, or dropped with ``last_batch=drop``), and the batches of all
  buckets are interleaved in a seeded random order: every epoch is a permutation, no repeats;
- flip and CFG dropout are per (sample id, seed, epoch) hashes, so every backend and a resumed run draw the same;
  a flipped sample uses the precomputed flipped latent, DINO and T5 (its left<->right swapped caption);
- CFG dropout is exclusive per sample: p_both drops both, p_text only the caption, p_dino only the DINO;
- T5 states are padded with zeros to the batch's longest caption, rounded up to ``pad_multiple``; the mask marks
  the valid prefix.
The loader's position is (epoch, batch index): ``state_dict()``/``load_state_dict()`` resume the exact stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from nanodit.data.shards import Sample


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) from the parts, stable across processes, machines and runs."""
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def flip_decision(sample_id: str, seed: int, epoch: int, enabled: bool = True) -> bool:
    return enabled and unit_hash("flip", seed, epoch, sample_id) < 0.5


def cfg_decision(sample_id: str, seed: int, epoch: int, p_both: float, p_text: float, p_dino: float):
    """(drop_text, drop_dino) for one sample: exclusive choice among both / text only / DINO only / none."""
    u = unit_hash("cfg", seed, epoch, sample_id)
    if u < p_both:
        return True, True
    if u < p_both + p_text:
        return True, False
    if u < p_both + p_text + p_dino:
        return False, True
    return False, False


@dataclass
class Semantics:
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    flip: bool = True
    last_batch: str = "partial"  # partial | drop
    pad_multiple: int = 8
    p_drop_both: float = 0.1
    p_drop_text: float = 0.1
    p_drop_dino: float = 0.1


def epoch_schedule(bucket_counts: dict[tuple[int, int], int], sem: Semantics, epoch: int):
    """The epoch's batches as [(bucket, [sample indices within the bucket])], deterministic in (seed, epoch)."""
    rng = np.random.default_rng([sem.seed, epoch])
    batches = []
    for bucket in sorted(bucket_counts):
        n = bucket_counts[bucket]
        order = rng.permutation(n) if sem.shuffle else np.arange(n)
        for start in range(0, n, sem.batch_size):
            idx = order[start : start + sem.batch_size].tolist()
            if len(idx) < sem.batch_size and sem.last_batch == "drop":
                continue
            batches.append((bucket, idx))
    if sem.shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def padded_length(lengths: list[int], multiple: int) -> int:
    return -(-max(lengths) // multiple) * multiple


def collate(samples: list[Sample], epoch: int, sem: Semantics) -> dict:
    """Samples of one bucket -> a batch of CPU tensors (fp16 arrays stay fp16)."""
    flips = [flip_decision(s.id, sem.seed, epoch, sem.flip and s.has_flip) for s in samples]
    drops = [
        cfg_decision(s.id, sem.seed, epoch, sem.p_drop_both, sem.p_drop_text, sem.p_drop_dino)
        for s in samples
    ]
    lat = [s.latent_flip if f else s.latent for s, f in zip(samples, flips)]
    dino = [s.dino_flip if f else s.dino for s, f in zip(samples, flips)]
    t5 = [s.t5_flip if f else s.t5 for s, f in zip(samples, flips)]
    L = padded_length([a.shape[0] for a in t5], sem.pad_multiple)
    t5_pad = np.zeros((len(samples), L, t5[0].shape[1]), dtype=np.float16)  # (B, L, Dt)
    mask = np.zeros((len(samples), L), dtype=bool)  # (B, L)
    for i, a in enumerate(t5):
        t5_pad[i, : a.shape[0]] = a
        mask[i, : a.shape[0]] = True
    return {
        "latent": torch.from_numpy(np.stack(lat)),  # (B, C, H, W) fp16
        "dino": torch.from_numpy(np.stack(dino)),  # (B, Dd) fp16
        "t5": torch.from_numpy(t5_pad),  # (B, L, Dt) fp16
        "t5_mask": torch.from_numpy(mask),  # (B, L) bool
        "drop_text": torch.tensor([d[0] for d in drops]),  # (B,) bool
        "drop_dino": torch.tensor([d[1] for d in drops]),  # (B,) bool
        "flipped": torch.tensor(flips),  # (B,) bool
        "ids": [s.id for s in samples],
        "captions": [(s.flip_txt if f else s.txt) for s, f in zip(samples, flips)],
        "epoch": epoch,
    }


class MemoryLoader:
    """All samples in host memory, batches assembled by index and moved to ``device``.

    The reference backend: the streaming backends (webdataset, dali) and the GPU-resident cache must yield
    batches bitwise equal to this one.
    """

    def __init__(
        self, groups: dict[tuple[int, int], list[Sample]], sem: Semantics, device: str | torch.device = "cpu"
    ):
        if not groups:
            raise ValueError("data: no samples to load")
        self.groups, self.sem, self.device = groups, sem, torch.device(device)
        self.counts = {b: len(s) for b, s in groups.items()}
        self.epoch, self.index = 0, 0
        self._batches = epoch_schedule(self.counts, sem, 0)
        if not self._batches:
            raise ValueError(
                f"data: no full batch of {sem.batch_size} in any bucket with last_batch=drop "
                f"(bucket sizes {sorted(self.counts.values())})"
            )

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._batches = epoch_schedule(self.counts, self.sem, self.epoch)

    def _to_device(self, batch: dict) -> dict:
        nb = self.device.type == "cuda"
        return {
            k: (v.to(self.device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = epoch_schedule(self.counts, self.sem, self.epoch)
        bucket, idx = self._batches[self.index]
        self.index += 1
        batch = collate([self.groups[bucket][i] for i in idx], self.epoch, self.sem)
        return self._to_device(batch)
