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
- several ranks (``world_size > 1``): rank r owns a fixed contiguous block of every bucket (samples
  [r*n/W, (r+1)*n/W) in shard order, so a rank touches ~1/W of the shards and a rank-local cache holds 1/W of the
  data); it shuffles its own block with a (seed, epoch, rank) generator, and every rank keeps the same number of
  batches per bucket (that of the smallest block), interleaved in one (seed, epoch) order: every rank takes the
  same number of steps (no DDP hang) and every step has the same bucket on every rank. With one rank the stream
  is exactly the single-GPU one above.
The loader's position is (epoch, batch index): ``state_dict()``/``load_state_dict()`` resume the exact stream, and
the state means the same for every backend (a run may resume on another backend).

Backends: ``MemoryLoader`` (here; host memory, the reference), ``GpuCacheLoader`` (gpu_cache.py),
``WebDatasetLoader`` (wds_loader.py), ``DaliLoader`` (dali_loader.py). Letters: B batch, C latent channels,
H, W latent size, L T5 tokens (padded), T packed T5 rows of a batch, Dt T5 width, Dd DINO width.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from nanodit.data.batch import Batch, make_batch
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
    rank: int = 0  # this process's share of the data when world_size > 1
    world_size: int = 1

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"data: batch size {self.batch_size} must be > 0")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"data: rank {self.rank} is not in [0, world_size={self.world_size})")


def rank_block(n: int, sem: Semantics) -> range:
    """The bucket positions (in shard order) owned by ``sem.rank`` out of a bucket of ``n`` samples."""
    return range(sem.rank * n // sem.world_size, (sem.rank + 1) * n // sem.world_size)


def _n_batches(n: int, sem: Semantics) -> int:
    return n // sem.batch_size if sem.last_batch == "drop" else -(-n // sem.batch_size)


def epoch_schedule(bucket_counts: dict[tuple[int, int], int], sem: Semantics, epoch: int):
    """This rank's batches of the epoch as [(bucket, [sample positions within the bucket])], deterministic in
    (seed, epoch, rank). Positions index the whole bucket in shard order, whatever the rank."""
    single = sem.world_size == 1
    rng = np.random.default_rng([sem.seed, epoch] if single else [sem.seed, epoch, sem.rank])
    batches = []
    for bucket in sorted(bucket_counts):
        n = bucket_counts[bucket]
        block = rank_block(n, sem)
        order = rng.permutation(len(block)) if sem.shuffle else np.arange(len(block))
        order = order + block.start
        # equal steps per rank: every rank keeps the batch count of the smallest block (n // W samples)
        keep = None if single else _n_batches(n // sem.world_size, sem)
        cut = []
        for start in range(0, len(order), sem.batch_size):
            idx = order[start : start + sem.batch_size].tolist()
            if len(idx) < sem.batch_size and sem.last_batch == "drop":
                continue
            cut.append((bucket, idx))
        batches += cut if keep is None else cut[:keep]
    if sem.shuffle:
        # one rank: the same generator goes on (the single-GPU stream); several: one order shared by all ranks
        mix = rng if single else np.random.default_rng([sem.seed, epoch])
        batches = [batches[i] for i in mix.permutation(len(batches))]
    return batches


def sample_flags(ids: list[str], has_flip: list[bool], epoch: int, sem: Semantics):
    """(flipped, drop_text, drop_dino) lists for the samples of one batch: the per-sample hashes."""
    flips = [flip_decision(i, sem.seed, epoch, sem.flip and f) for i, f in zip(ids, has_flip)]
    drops = [cfg_decision(i, sem.seed, epoch, sem.p_drop_both, sem.p_drop_text, sem.p_drop_dino) for i in ids]
    return flips, [d[0] for d in drops], [d[1] for d in drops]


def padded_length(lengths: list[int], multiple: int) -> int:
    return -(-max(lengths) // multiple) * multiple


def collate(samples: list[Sample], epoch: int, sem: Semantics) -> Batch:
    """Samples of one bucket -> a batch of CPU tensors (fp16 arrays stay fp16)."""
    flips, drop_text, drop_dino = sample_flags(
        [s.id for s in samples], [s.has_flip for s in samples], epoch, sem
    )
    lat = [s.latent_flip if f else s.latent for s, f in zip(samples, flips)]
    dino = [s.dino_flip if f else s.dino for s, f in zip(samples, flips)]
    t5 = [s.t5_flip if f else s.t5 for s, f in zip(samples, flips)]
    L = padded_length([a.shape[0] for a in t5], sem.pad_multiple)
    t5_pad = np.zeros((len(samples), L, t5[0].shape[1]), dtype=np.float16)  # (B, L, Dt)
    mask = np.zeros((len(samples), L), dtype=bool)  # (B, L)
    for i, a in enumerate(t5):
        t5_pad[i, : a.shape[0]] = a
        mask[i, : a.shape[0]] = True
    return make_batch(
        torch.from_numpy(np.stack(lat)),  # (B, C, H, W) fp16
        torch.from_numpy(np.stack(dino)),  # (B, Dd) fp16
        torch.from_numpy(t5_pad),  # (B, L, Dt) fp16
        torch.from_numpy(mask),  # (B, L) bool
        torch.tensor([flips, drop_text, drop_dino]),  # (3, B) bool
        [s.id for s in samples],
        [(s.flip_txt if f else s.txt) for s, f in zip(samples, flips)],
        epoch,
    )


def pad_packed(packed: torch.Tensor, lengths: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded T5 rows of a batch, concatenated, -> (zero-padded states, mask), on ``packed``'s device.

    The streaming backends move only the valid rows across the bus (half the T5 bytes at random caption
    lengths) and pad here, on the GPU. ``lengths`` (B,) int64 sits on the same device; no host sync.
    """
    B, T = lengths.shape[0], packed.shape[0]
    pos = torch.arange(L, device=packed.device)  # (L,)
    mask = pos[None, :] < lengths[:, None]  # (B, L)
    row = torch.arange(B, device=packed.device).repeat_interleave(lengths, output_size=T)  # (T,)
    start = torch.cumsum(lengths, 0) - lengths  # (B,)
    within = torch.arange(T, device=packed.device) - start[row]  # (T,)
    t5 = packed.new_zeros(B * L, packed.shape[1])  # (B*L, Dt)
    t5.index_copy_(0, row * L + within, packed)
    return t5.view(B, L, packed.shape[1]), mask  # (B, L, Dt), (B, L)


def upcoming(counts: dict[tuple[int, int], int], sem: Semantics, epoch: int, index: int):
    """(epoch, index, bucket, positions) of every scheduled batch from (epoch, index) on, without end.
    (A free function: a reader that holds it must not hold the loader, or loader and reader form a cycle.)"""
    batches = epoch_schedule(counts, sem, epoch)
    while True:
        if index >= len(batches):
            epoch, index = epoch + 1, 0
            batches = epoch_schedule(counts, sem, epoch)
        yield epoch, index, *batches[index]
        index += 1


class ScheduledLoader:
    """The stream position shared by every backend: (epoch, batch index) into ``epoch_schedule``.

    Subclasses turn a scheduled batch (bucket, positions) into tensors; ``state_dict``/``load_state_dict`` mean
    the same for all of them.
    """

    name = "base"

    def __init__(
        self, counts: dict[tuple[int, int], int], sem: Semantics, device: str | torch.device = "cpu"
    ):
        if not counts or not sum(counts.values()):
            raise ValueError("data: no samples to load")
        self.counts, self.sem, self.device = dict(counts), sem, torch.device(device)
        self.epoch, self.index = 0, 0
        self._batches = epoch_schedule(self.counts, sem, 0)
        if not self._batches:
            raise ValueError(
                f"data: no full batch of {sem.batch_size} in any bucket with last_batch=drop "
                f"(bucket sizes {sorted(self.counts.values())}, world_size {sem.world_size})"
            )

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._batches = epoch_schedule(self.counts, self.sem, self.epoch)
        self._seek()

    def _seek(self) -> None:
        """Hook: the position changed (resume); streaming backends drop what they read ahead."""

    def upcoming(self) -> Iterator[tuple[int, int, tuple[int, int], list[int]]]:
        """(epoch, index, bucket, positions) of every batch from the current position on, without end."""
        return upcoming(self.counts, self.sem, self.epoch, self.index)

    def _advance(self) -> tuple[int, tuple[int, int], list[int]]:
        """Consume one scheduled batch: (epoch, bucket, positions)."""
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = epoch_schedule(self.counts, self.sem, self.epoch)
        bucket, idx = self._batches[self.index]
        self.index += 1
        return self.epoch, bucket, idx

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers, pipelines and temporary files (no-op for in-memory backends)."""


class MemoryLoader(ScheduledLoader):
    """All samples in host memory, batches assembled by index and moved to ``device``.

    The reference backend: the streaming backends (webdataset, dali) and the GPU-resident cache must yield
    batches bitwise equal to this one.
    """

    name = "memory"

    def __init__(
        self, groups: dict[tuple[int, int], list[Sample]], sem: Semantics, device: str | torch.device = "cpu"
    ):
        if not groups:
            raise ValueError("data: no samples to load")
        self.groups = groups
        super().__init__({b: len(s) for b, s in groups.items()}, sem, device)

    def __next__(self) -> Batch:
        epoch, bucket, idx = self._advance()
        batch = collate([self.groups[bucket][i] for i in idx], epoch, self.sem)
        return batch.to(self.device, non_blocking=self.device.type == "cuda")
