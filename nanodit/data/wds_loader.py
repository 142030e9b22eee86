"""The webdataset backend: WebDataset tar shards read by a torch DataLoader (workers), in the exact seeded
schedule, into a ring of reusable shared-memory batch slots that the GPU reads directly.

Design. A streaming WebDataset pipeline reads each tar front to back and shuffles within a bounded buffer: its
order cannot equal the schedule (a seeded permutation of each bucket), so it cannot give MemoryLoader's batches.
Here the main process walks the schedule (``ScheduledLoader.upcoming``) and hands each worker one whole batch
spec (epoch, bucket, positions, slot); the worker reads exactly those samples from the shards by (shard,
offset) from the ``SampleIndex`` (built once from the ShardWriter's wds2idx files) straight into the slot:
- arrays are read raw with ``preadv`` into the slot's regions, so a sample's bytes are copied once, from the
  page cache, by a worker (in parallel); no .npy parsing, no per-sample tensors, no pickling of arrays;
- the flip decision is known before reading, so only the chosen variant is read (half the bytes of a
  read-both-then-choose loader);
- T5 crosses as unpadded rows (T, Dt) plus lengths: at random caption lengths about half the bytes of the padded
  (B, L, Dt) batch; ``pad_packed`` pads and builds the mask on the device;
- NaN/Inf are checked in the worker (``check_finite``), naming shard, sample and key.

Slots (``SlotRing``). K slots, each sized for the largest batch (latent of the largest bucket, the B longest
captions of any bucket), live in ONE shared-memory segment that the main process allocates before the workers
fork: its pages stay mapped in every process for the loader's life, so nothing is mapped, page-faulted, zeroed
or unmapped per batch. (The per-batch alternative, which ``slots=0`` keeps for comparison, has each worker
allocate fresh shm tensors per batch that the main process maps and faults in, plus the DataLoader's single
pin thread memcpy-ing every byte into pinned memory: bound by the main process, whatever the number of workers;
``bench/bench_loader.py``'s ``-s0`` variants measure it.) Batch j of a run goes to slot j % K; a worker returns only
metadata (slot, sizes, ids, captions). Flow control: the DataLoader keeps P = num_workers * prefetch batches
dispatched but not yet yielded, and asks the sampler for the next spec while the batch it is about to yield
still holds its slot, so P + 1 slots are in use; K = P + 2 leaves one batch for the device copy of the batch
before to finish. The sampler takes a slot only once its last copy completed (``SlotRing.acquire``); a slot
still held by an unconsumed batch there is a bug, raised, never a silent overwrite. Memory: K * slot bytes of
shared memory (/dev/shm), e.g. ~35 MB per slot at the nano shapes (B=16, 256 x 4096 fp16 T5 rows).

On CUDA the segment is page-locked once with ``cudaHostRegister`` (after the workers forked; released before
workers fork again), so each field is one DMA from the slot on a dedicated copy stream, overlapping the
training step on the current stream, which waits for the copies before it uses the batch (``record_stream``
keeps the allocator honest). An event recorded after the copies frees the slot. If registration fails (e.g. a
locked-memory limit), the copies still run, from pageable memory (slower, correct), with one warning. CUDA is
never touched inside a worker. On CPU (tests, CI) the same path runs without registration or events: the
fields are copied out of the slot before it is freed, so a yielded batch never changes afterwards.
Cost: random reads (one per array; fine on local NVMe or page cache, poor on spinning disks or network file
systems) and a start-up index pass (see index.py). Throughput scales with ``data.num_workers``.

The ``webdataset`` package writes the shards (ShardWriter) and validates them (``read_all``); reading here is by
index, through the same tar layout.
"""

from __future__ import annotations

import math
import os
import signal
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from nanodit.data.batch import Batch, make_batch
from nanodit.data.index import ARRAYS, DINO, LATENT, T5, SampleIndex
from nanodit.data.loader import ScheduledLoader, Semantics, pad_packed, padded_length, sample_flags, upcoming
from nanodit.data.schema import ShardError, all_finite

_ALIGN = 4096  # slot regions start on page boundaries: whole pages per DMA, no false sharing between regions


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker it lives in shared memory, so handing it to the main
    process copies nothing (what torch's default_collate does for its batches). The ``slots=0`` path only."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


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
    """No NaN/Inf in a CPU fp16 tensor (``schema.all_finite``: a bit test at memory speed, ~20x faster than
    torch.isfinite on CPU fp16)."""
    return all_finite(t.numpy())


def _clear_cuda_error() -> bool:
    """Reset cudart's "last error" after a failed runtime call: torch checks ``cudaGetLastError`` after every
    kernel launch, so a failed ``cudaHostRegister`` would surface later as an unrelated kernel's failure. torch
    does not expose ``cudaGetLastError``: call it in the libcudart the process loaded. False if none is found."""
    import ctypes

    with open("/proc/self/maps") as maps:
        libs = {line.split()[-1] for line in maps if "libcudart.so" in line}
    for lib in libs:
        ctypes.CDLL(lib).cudaGetLastError()
    return bool(libs)


def max_batch_rows(index: SampleIndex, batch_size: int) -> int:
    """An upper bound on the packed T5 rows of any batch: the ``batch_size`` longest captions of a bucket (either
    variant), over all buckets. Rank blocks and the flip choice only pick subsets, so it bounds every rank."""
    most = 0
    for ib in index.buckets.values():
        if len(ib):
            longest = np.sort(ib.t5_len.max(1))[-batch_size:]
            most = max(most, int(longest.sum()))
    return most


class SlotRing:
    """K reusable batch slots in one shared-memory segment (see the module docstring).

    Every slot has the same layout: latent (B, C, H, W) of the largest bucket, DINO (B, Dd), packed T5
    (max_rows, Dt), lengths (B,) int64, flags (3, B) bool, each region page-aligned; a batch uses a prefix of
    each region. Workers only call ``views``; ``acquire``/``release``/``register`` belong to the main process.
    """

    def __init__(self, index: SampleIndex, batch_size: int, count: int):
        if count < 1:
            raise ValueError(f"webdataset loader: {count} batch slots; need at least 1")
        B = batch_size
        hw = max((h * w for h, w in index.buckets), default=0)
        self.max_rows = max_batch_rows(index, B)
        sizes = [B * index.C * hw * 2, B * index.Dd * 2, self.max_rows * index.Dt * 2, B * 8, 3 * B]
        # byte offsets of latent, dino, t5, lens, flags within a slot
        self.offsets = np.cumsum([0] + [_aligned(n) for n in sizes[:-1]]).tolist()
        self.stride = _aligned(self.offsets[-1] + sizes[-1])
        self.count, self.dims = count, (index.C, index.Dd, index.Dt)
        nbytes = count * self.stride
        try:
            storage = torch.UntypedStorage._new_shared(nbytes)
        except RuntimeError as e:
            raise RuntimeError(
                f"webdataset loader: cannot allocate {nbytes / 2**20:.0f} MiB of shared memory for {count} batch "
                f"slots of {self.stride / 2**20:.1f} MiB (is /dev/shm too small? lower data.num_workers or "
                f"data.prefetch): {e}"
            ) from None
        self.buffer = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))  # (K * stride,) uint8
        self.busy = [False] * count  # held by a batch dispatched to a worker and not yet copied out
        self.events: list = [None] * count  # CUDA: the event after the last copies out of the slot
        self.registered = False
        self._owner = os.getpid()  # forked workers hold a copy of this object: they must not unregister

    def views(self, slot: int, B: int, bucket: tuple[int, int], T: int) -> tuple[torch.Tensor, ...]:
        """The slot's regions for a batch of B samples of ``bucket`` with T packed T5 rows: latent (B, C, H, W),
        dino (B, Dd), packed (T, Dt) fp16, lens (B,) int64, flags (3, B) bool."""
        if T > self.max_rows:
            raise RuntimeError(
                f"webdataset loader: batch has {T} T5 rows, slot holds {self.max_rows} (stale index?)"
            )
        (C, Dd, Dt), (H, W), base = self.dims, bucket, slot * self.stride
        shapes = ((B, C, H, W), (B, Dd), (T, Dt), (B,), (3, B))
        types = (torch.float16, torch.float16, torch.float16, torch.int64, torch.bool)
        out = []
        for off, shape, dt in zip(self.offsets, shapes, types):
            n = math.prod(shape) * dt.itemsize
            out.append(self.buffer[base + off : base + off + n].view(dt).view(shape))
        return tuple(out)

    def acquire(self, seq: int) -> int:
        """Slot for the ``seq``-th batch of a run: waits until the device copies out of it completed."""
        slot = seq % self.count
        if self.busy[slot]:
            raise RuntimeError(
                f"webdataset loader: batch slot {slot} is still held by an unconsumed batch "
                f"({self.count} slots are too few for the prefetch depth)"
            )
        if self.events[slot] is not None:
            self.events[slot].synchronize()
            self.events[slot] = None
        self.busy[slot] = True
        return slot

    def release(self, slot: int, event: torch.cuda.Event | None = None) -> None:
        """The batch in ``slot`` was copied out (CPU) or its copies were queued (CUDA, ``event`` after them)."""
        self.busy[slot], self.events[slot] = False, event

    def reset(self) -> None:
        """The workers are gone (nothing writes into a slot any more): every slot is free once its copies are."""
        for slot in range(self.count):
            if self.events[slot] is not None:
                self.events[slot].synchronize()
            self.busy[slot], self.events[slot] = False, None

    def register(self, device: torch.device) -> None:
        """Page-lock the segment for direct DMA. Called after the workers forked: the driver may keep pinned
        ranges out of forked children (MADV_DONTFORK), and the workers must see the slots."""
        if self.registered or os.getpid() != self._owner:
            return
        with torch.cuda.device(device):
            err = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), 0)
        try:
            torch.cuda.check_error(err)
            self.registered = True
        except RuntimeError as e:  # e.g. a driver or kernel that will not pin this shared memory
            what = f"webdataset loader: cannot page-lock the {self.buffer.numel() / 2**20:.0f} MiB batch slots ({e})"
            if not _clear_cuda_error():
                raise RuntimeError(f"{what}; pass slots=0 for per-batch pinned copies") from None
            warnings.warn(f"{what}; copies to the GPU go through pageable memory (slower)", stacklevel=2)

    def unregister(self) -> None:
        """Undo ``register`` (before workers fork again, and before the memory goes); no copy may be in flight."""
        if not self.registered or os.getpid() != self._owner:
            return
        self.reset()
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr()))
        self.registered = False


class BatchReader(Dataset):
    """Map-style dataset whose items are scheduled batches: ``reader[(epoch, index, bucket, positions, slot)]``
    reads the batch into ring slot ``slot`` and returns its metadata (slot, sizes, ids, captions); without a
    slot (``slots=0``) it returns host tensors (latent, DINO, packed T5 rows, lengths, flags) plus ids and
    captions."""

    def __init__(self, index: SampleIndex, sem: Semantics, check_finite: bool = True):
        self.index, self.sem, self.check_finite = index, sem, check_finite
        self.ring: SlotRing | None = None  # set by the loader before the workers start
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
        epoch, pos, bucket, idx, *slot = spec
        ib, ix = self.index.buckets[bucket], self.index
        idx = np.asarray(idx, dtype=np.int64)
        ids = [ib.ids[i] for i in idx]
        flips, drop_text, drop_dino = sample_flags(ids, ib.has_flip[idx].tolist(), epoch, self.sem)
        f = np.asarray(flips, dtype=np.int64)  # (B,) 0/1: the variant column offset (+3) and t5_len column
        lens = ib.t5_len[idx, f]  # (B,)
        B, (H, W), T = len(idx), bucket, int(lens.sum())
        flags = torch.tensor([flips, drop_text, drop_dino])  # (3, B) bool
        if slot:
            assert self.ring is not None, "a slot spec needs the loader's SlotRing"
            latent, dino, packed, lens_t, flags_t = self.ring.views(slot[0], B, bucket, T)
            lens_t.copy_(torch.from_numpy(lens))
            flags_t.copy_(flags)
        else:
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
        meta = {
            "ids": ids,
            "captions": [ib.flip_txt[i] if fl else ib.txt[i] for i, fl in zip(idx, flips)],
            "epoch": epoch,
            "index": pos,
            "bucket": bucket,
        }
        if slot:  # only small Python objects cross the worker queue: no tensor, so no shm segment per batch
            return meta | {"slot": slot[0], "size": (B, T)}
        return meta | {
            "latent": latent,
            "dino": dino,
            "t5_packed": packed,
            "t5_len": torch.from_numpy(lens),  # (B,) int64
            "flags": flags,
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
    """The batch specs from a position on, endless (the DataLoader keeps them in order). With a ring, each spec
    carries its slot, taken when the DataLoader dispatches it (flow control: see ``SlotRing.acquire``)."""

    def __init__(self, counts: dict, sem: Semantics, epoch: int, index: int, ring: SlotRing | None = None):
        self.args, self.ring = (counts, sem, epoch, index), ring

    def __iter__(self):
        for seq, (epoch, index, bucket, idx) in enumerate(upcoming(*self.args)):
            if self.ring is None:
                yield epoch, index, bucket, tuple(idx)
            else:
                yield epoch, index, bucket, tuple(idx), self.ring.acquire(seq)


def _worker_signals(worker_id: int) -> None:
    """Workers ignore SIGINT and SIGTERM: a Ctrl-C or a scheduler's SIGTERM reaches the whole process group,
    and a worker that died of it would make the main process raise (torch's SIGCHLD handler) in the middle of
    the step it is finishing before it saves. The main process stops the workers itself (``close``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class WebDatasetLoader(ScheduledLoader):
    """The streaming backend over a DataLoader (see the module docstring).

    ``slots``: None sizes the slot ring for the prefetch depth (num_workers * prefetch + 2); 0 is the per-batch
    shared-memory path with the DataLoader's pin thread (kept to compare); n > 0 sets the ring size.
    """

    name = "webdataset"

    def __init__(
        self,
        index: SampleIndex,
        sem: Semantics,
        device: str | torch.device = "cpu",
        num_workers: int = 2,
        prefetch: int = 4,
        check_finite: bool = True,
        slots: int | None = None,
    ):
        super().__init__(index.counts, sem, device)
        if num_workers < 0 or prefetch < 1:
            raise ValueError(
                f"webdataset loader: num_workers={num_workers} must be >= 0 and prefetch={prefetch} >= 1"
            )
        self.data = index  # the sample index (self.index is the stream position)
        self.num_workers, self.prefetch = num_workers, prefetch
        # batches dispatched but not yet yielded (the DataLoader's bound; one at a time without workers), plus
        # the one being yielded: all hold slots at once
        held = (num_workers * prefetch if num_workers else 1) + 1
        if slots is None:
            slots = held + 1  # one more: the device copy of the batch before may still be running
        elif slots and slots < held:
            raise ValueError(
                f"webdataset loader: slots={slots} must be 0 (per-batch shared memory) or >= "
                f"num_workers * prefetch + 1 = {held} (every batch read ahead holds a slot)"
            )
        self.slots = slots
        self.reader = BatchReader(index, sem, check_finite)
        self._ring: SlotRing | None = None  # allocated at the first start, kept across restarts
        self._copy_stream = None
        self._it = None

    def _start(self) -> None:
        workers, cuda = self.num_workers, self.device.type == "cuda"
        if self.slots and self._ring is None:
            self._ring = self.reader.ring = SlotRing(self.data, self.sem.batch_size, self.slots)
        dl = DataLoader(
            self.reader,
            batch_size=None,
            sampler=_Schedule(self.counts, self.sem, self.epoch, self.index, self._ring),
            num_workers=workers,
            pin_memory=cuda and not self.slots,  # slots are page-locked themselves
            prefetch_factor=self.prefetch if workers else None,
            worker_init_fn=_worker_signals,
            # the workers' base seed is drawn from this, not from the global RNG: restarting the workers
            # (a resume) must leave the global RNG where the uninterrupted run has it (workers draw nothing)
            generator=torch.Generator().manual_seed(0),
        )
        self._it, self._owner = iter(dl), os.getpid()  # a forked worker's copy of this loader owns nothing
        if self._ring is not None and cuda:
            self._ring.register(self.device)  # after the fork (see SlotRing.register)
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)

    def _seek(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers now (dropping the iterator would too, at its next garbage collection)."""
        it, self._it = getattr(self, "_it", None), None
        if getattr(self, "_owner", None) != os.getpid():
            return
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        ring = getattr(self, "_ring", None)
        if ring is not None:  # workers joined: no slot is being written; wait for the copies out of them
            ring.unregister()  # before workers fork again, and before the segment is freed
            ring.reset()

    def __del__(self):
        # at interpreter exit CUDA may be torn down before us; the process frees everything anyway
        try:
            self.close()
        except Exception:
            pass

    def __next__(self) -> Batch:
        if self._it is None:
            self._start()
        raw = next(self._it)
        epoch, bucket, idx = self._advance()
        if (raw["epoch"], raw["index"], tuple(raw["bucket"])) != (epoch, self.index - 1, bucket):
            raise RuntimeError(
                f"webdataset loader: got batch {raw['epoch']}/{raw['index']}, expected {epoch}/{self.index - 1}"
            )
        if self._ring is None:
            return self._legacy(raw, epoch)
        B, T = raw["size"]
        latent, dino, packed, lens, flags = self._ring.views(raw["slot"], B, bucket, T)
        L = padded_length(lens.tolist(), self.sem.pad_multiple)  # the slot is host memory: no device sync
        if self.device.type == "cuda":
            out, event = self._copy_out_cuda(latent, dino, packed, lens, flags, L)
        else:  # the slot is reused: a yielded batch owns its memory
            out, event = (latent.clone(), dino.clone(), *pad_packed(packed, lens, L), flags.clone()), None
        self._ring.release(raw["slot"], event)
        return make_batch(*out, raw["ids"], raw["captions"], epoch)

    def _copy_out_cuda(self, latent, dino, packed, lens, flags, L: int):
        """DMA the slot's fields on the copy stream (overlapping the step on the current stream), pad T5 there,
        and make the current stream wait: -> ((latent, dino, t5, mask, flags) on the device, slot event)."""
        dev, main, copy = self.device, torch.cuda.current_stream(self.device), self._copy_stream
        with torch.cuda.stream(copy):
            lat_d = latent.to(dev, non_blocking=True)
            dino_d = dino.to(dev, non_blocking=True)
            t5, mask = pad_packed(packed.to(dev, non_blocking=True), lens.to(dev, non_blocking=True), L)
            flags_d = flags.to(dev, non_blocking=True)
            event = torch.cuda.Event()
            event.record(copy)  # after the last read of the slot
        main.wait_stream(copy)
        out = (lat_d, dino_d, t5, mask, flags_d)
        for t in out:  # allocated on the copy stream, used on the current one
            t.record_stream(main)
        return out, event

    def _legacy(self, raw: dict, epoch: int) -> Batch:
        """``slots=0``: the batch arrived as fresh shared-memory tensors (pinned by the DataLoader on CUDA)."""
        dev, nb = self.device, self.device.type == "cuda"
        lens = raw["t5_len"]
        L = padded_length(lens.tolist(), self.sem.pad_multiple)
        t5, mask = pad_packed(raw["t5_packed"].to(dev, non_blocking=nb), lens.to(dev, non_blocking=nb), L)
        flags = raw["flags"].to(dev, non_blocking=nb)
        latent, dino = raw["latent"].to(dev, non_blocking=nb), raw["dino"].to(dev, non_blocking=nb)
        return make_batch(latent, dino, t5, mask, flags, raw["ids"], raw["captions"], epoch)
