"""The DALI backend: ``fn.readers.webdataset`` -> ``fn.decoders.numpy`` -> ``.gpu()`` -> ``fn.pad``, one pipeline
per bucket, in the exact seeded schedule.

Design. DALI's reader reads the samples of its index files in order, archive after archive, and its own shuffle
is a bounded buffer: left alone it cannot give MemoryLoader's batches. But an index file is only a list of
(extension, offset, size) per sample, and the reader seeks to every component, so the loader writes its own
index files: for a chunk of the schedule (whole epochs, at least ``chunk_samples`` samples), per bucket, the
samples of that bucket's batches in schedule order, pointing each sample's ``latent.npy``/``dino.npy``/``t5.npy``
at the flipped members when its flip is drawn (only the chosen variant is read). An index file belongs to one
archive, so the reading sequence is cut into runs of one shard: ``paths`` repeats a shard once per run (DALI
maps each file once and shares the mapping). Inside a batch the samples are read grouped by shard (fewer runs)
and put back in schedule order on the device. Every batch of the sequence is B samples long (a partial batch
repeats its last sample, as ``pad_last_batch`` would), so pipeline batches line up with scheduled batches; the
padding rows are cut off. Cost: one small index file per run, i.e. per (batch, distinct shard in it), plus the
plan's hashes, ~30 us of Python per sample, done by a thread one chunk ahead; and per chunk the pipelines are
rebuilt (index files change) and refill their prefetch queues, a stall of tens of ms.

T5 crosses the bus unpadded (``.gpu()`` before ``fn.pad``) and is padded on the GPU to the batch's longest
caption, rounded up to pad_multiple: MemoryLoader's padding. Ids, captions, flips and CFG bits come from the
host (the index and the hashes). With ``device_id=None`` the same pipeline runs on the CPU (the CI parity test).

DALI is an optional extra (``pip install nvidia-dali-cuda130``, or the CUDA 12 build); without it,
``data.loader=dali`` fails with one line saying so.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanodit.data.batch import Batch, make_batch
from nanodit.data.index import ARRAYS, DINO, LATENT, T5, SampleIndex
from nanodit.data.loader import ScheduledLoader, Semantics, epoch_schedule, padded_length, sample_flags
from nanodit.data.shards import ShardError

CHUNK_SAMPLES = 20_000  # samples per pipeline build: whole epochs, at least this many
EXT = ("latent.npy", "dino.npy", "t5.npy")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    if not dali_available():
        raise ShardError(
            "data.loader=dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130, or "
            "nvidia-dali-cuda120 for CUDA 12); use data.loader=webdataset or gpu-cache"
        )


def _build_pipe(paths, index_paths, sem: Semantics, device_id, threads: int, prefetch: int):
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(
        batch_size=sem.batch_size,
        num_threads=threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        seed=0,
    )
    with pipe:
        lat, dino, t5 = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=list(EXT),
            missing_component_behavior="error",
            random_shuffle=False,
            pad_last_batch=True,  # the sequence is B-aligned already; this only guards the wrap
            name="reader",
        )
        lat, dino, t5 = fn.decoders.numpy(lat), fn.decoders.numpy(dino), fn.decoders.numpy(t5)
        if device_id is not None:
            lat, dino, t5 = lat.gpu(), dino.gpu(), t5.gpu()  # unpadded T5 crosses the bus
        t5 = fn.pad(t5, axes=(0,), align=sem.pad_multiple, fill_value=0)  # (B, Lp, Dt): on the GPU when there
        pipe.set_outputs(lat, dino, t5)
    pipe.build()
    return pipe


@dataclass
class _Chunk:
    """A stretch of the schedule ready for DALI: the planned batches and, per bucket, the reader's inputs."""

    start: tuple[int, int]  # (epoch, index) it begins at
    end: tuple[int, int]  # the position after its last batch
    plan: list  # (epoch, index, bucket, positions, read order, flips, drop_text, drop_dino) per batch
    runs: dict  # bucket -> (paths, index_paths, rows)
    tmp: Path  # its index files

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class DaliLoader(ScheduledLoader):
    """The DALI backend (see the module docstring). While a chunk is consumed, a thread prepares the next one
    (plan, hashes, index files: ~30 us per sample of Python), so a chunk change costs only the pipeline builds."""

    name = "dali"

    def __init__(
        self,
        index: SampleIndex,
        sem: Semantics,
        device: str | torch.device = "cpu",
        threads: int = 4,
        prefetch: int = 2,
        chunk_samples: int = CHUNK_SAMPLES,
    ):
        require_dali()
        super().__init__(index.counts, sem, device)
        self.data, self.threads, self.prefetch, self.chunk_samples = index, threads, prefetch, chunk_samples
        self._padded_t5 = index.padded_t5
        self._plan: deque = deque()
        self._pipes: dict = {}
        self._chunk: _Chunk | None = None
        self._next: Future | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="nanodit-dali-plan")
        self._tmp = Path(tempfile.mkdtemp(prefix="nanodit-dali-"))  # one folder per chunk inside
        weakref.finalize(self, shutil.rmtree, str(self._tmp), True)  # also at interpreter exit

    # ---- chunk: plan the batches, write the index files (any thread); build the pipelines (this one) ----------
    def _prepare(self, epoch: int, index: int) -> _Chunk:
        """The chunk starting at (epoch, index): whole epochs holding at least chunk_samples samples."""
        B, plan, seqs, n = self.sem.batch_size, [], {}, 0
        start, batches = (epoch, index), epoch_schedule(self.counts, self.sem, epoch)
        while True:
            if index >= len(batches):
                if n >= self.chunk_samples:
                    break
                epoch, index = epoch + 1, 0
                batches = epoch_schedule(self.counts, self.sem, epoch)
            bucket, idx = batches[index]
            ib = self.data.buckets[bucket]
            flips, drop_text, drop_dino = sample_flags(
                [ib.ids[i] for i in idx], ib.has_flip[idx].tolist(), epoch, self.sem
            )
            order = np.argsort(ib.shard[idx], kind="stable")  # read grouped by shard: fewer runs
            read = [(idx[k], flips[k]) for k in order]
            read += [read[-1]] * (B - len(read))  # B-aligned, as pad_last_batch would
            seqs.setdefault(bucket, []).extend(read)
            plan.append((epoch, index, bucket, idx, order, flips, drop_text, drop_dino))
            n += len(idx)
            index += 1
        tmp = Path(tempfile.mkdtemp(prefix="chunk-", dir=self._tmp))
        runs = {
            b: (*self._write_runs(tmp, k, self.data.buckets[b], seq), len(seq))
            for k, (b, seq) in enumerate(seqs.items())
        }
        return _Chunk(start, (epoch, index), plan, runs, tmp)

    def _write_runs(self, tmp: Path, number: int, ib, seq: list) -> tuple[list[str], list[str]]:
        """One index file per run of samples from one shard; ``paths`` names that shard once per run."""
        paths, index_paths, lines, shard = [], [], [], None

        def flush():
            p = tmp / f"{number}-{len(paths):06d}.idx"
            p.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
            paths.append(str(self.data.shards[shard]))
            index_paths.append(str(p))

        for i, flip in seq:
            if shard is not None and ib.shard[i] != shard:
                flush()
                lines = []
            shard, v = ib.shard[i], 3 * int(flip)
            key = ib.keys[i].replace(" ", "_")
            lines.append(
                " ".join(
                    f"{ext} {ib.member_off[i, col + v]} {ib.member_size[i, col + v]} {key}.{ARRAYS[col + v]}.npy"
                    for ext, col in zip(EXT, (LATENT, DINO, T5))
                )
            )
        flush()
        return paths, index_paths

    def _start_chunk(self) -> None:
        pos = (self.epoch, self.index)
        ready = self._next.result() if self._next is not None else None
        self._next = None
        if ready is not None and ready.start != pos:
            ready.discard()
            ready = None
        self._close_pipes()
        self._chunk = chunk = ready or self._prepare(*pos)
        dev = None if self.device.type != "cuda" else (self.device.index or torch.cuda.current_device())
        for bucket, (paths, index_paths, rows) in chunk.runs.items():
            pipe = _build_pipe(paths, index_paths, self.sem, dev, self.threads, self.prefetch)
            size = pipe.reader_meta("reader")["epoch_size"]
            if size != rows:
                raise RuntimeError(f"dali loader: the reader sees {size} samples, the plan has {rows}")
            self._pipes[bucket] = pipe
        self._plan.extend(chunk.plan)
        self._next = self._pool.submit(self._prepare, *chunk.end)

    def _close_pipes(self) -> None:
        self._pipes.clear()  # pipelines stop and free their threads and buffers when dropped
        self._plan.clear()
        if self._chunk is not None:
            self._chunk.discard()
            self._chunk = None

    def _seek(self) -> None:
        self.close()

    def close(self) -> None:
        """Drop the pipelines, the prepared chunk and their index files."""
        self._close_pipes()
        if self._next is not None:
            nxt, self._next = self._next, None
            try:
                nxt.result().discard()
            except Exception:  # a failed preparation leaves nothing to clean
                pass

    def __del__(self):
        if hasattr(self, "_pool"):
            self.close()
            self._pool.shutdown(wait=False)

    # ---- one batch -------------------------------------------------------------------------------------------
    def _torch(self, out) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        t = out.as_tensor()
        dst = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(t, dst, cuda_stream=stream)  # a copy: DALI reuses its output buffers
        return dst

    def __next__(self) -> Batch:
        if not self._plan:
            self._start_chunk()
        epoch, index, bucket, idx, order, flips, drop_text, drop_dino = self._plan.popleft()
        if (epoch, bucket, idx) != self._advance() or index != self.index - 1:
            raise RuntimeError(
                f"dali loader: planned batch {epoch}/{index} is not at {self.epoch}/{self.index - 1}"
            )
        ib, n, dev = self.data.buckets[bucket], len(idx), self.device
        lat, dino, t5 = (self._torch(o) for o in self._pipes[bucket].run())
        lens = ib.t5_len[idx, np.asarray(flips, dtype=np.int64)]  # (B,) valid rows
        L = padded_length(lens.tolist(), self.sem.pad_multiple)
        if t5.shape[1] < L:
            raise RuntimeError(f"dali loader: padded T5 has {t5.shape[1]} rows, the batch needs {L}")
        host = torch.from_numpy(
            np.stack([np.argsort(order), lens, flips, drop_text, drop_dino]).astype(np.int64)
        )
        h = host.to(dev, non_blocking=True)  # (5, B): inverse read order, lengths, flags
        back = h[0]  # rows were read grouped by shard: put them back in schedule order
        mask = torch.arange(L, device=dev)[None, :] < h[1][:, None]  # (B, L)
        t5 = t5[:n, :L].index_select(0, back)  # (B, L, Dt)
        if self._padded_t5:  # stored padded (+ mask): zero what lies past each valid prefix
            t5 = t5.masked_fill(~mask[:, :, None], 0)
        return make_batch(
            lat[:n].index_select(0, back),  # (B, C, H, W) fp16
            dino[:n].index_select(0, back),  # (B, Dd) fp16
            t5,
            mask,
            h[2:],  # (3, B): flipped, drop_text, drop_dino
            [ib.ids[i] for i in idx],
            [ib.flip_txt[i] if f else ib.txt[i] for i, f in zip(idx, flips)],
            epoch,
        )
