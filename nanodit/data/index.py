"""Random access into tar shards, and the data check every loader and ``python -m nanodit.data check`` share:
where every array of every sample lies, so a loader can read any batch, after every sample passed the schema.

    index = build_index(root)                    # a few small reads per sample, at start
    index = build_index(root, values=True)       # the full check: every array read (NaN/Inf), as `data check`
    ib = index.buckets[(64, 64)]; i = 3          # position 3 of the bucket, in shard order (as read_all)
    ib.shard[i], ib.data_off[i, T5], ib.t5_len[i, 0]

Why: every backend must yield MemoryLoader's exact batches, whose schedule is a seeded permutation of each
bucket. A stream through the tars (with a bounded shuffle buffer) cannot produce that order; reads addressed by
(shard, offset) can. The cost is paid once at start: the member table of each tar comes from the DALI index file
the ShardWriter writes beside it (``shard-00000.idx``, wds2idx format v1.2; else the tar headers are scanned),
then per sample the json (id, bucket), the captions and the .npy headers (dtype, shape, where the array bytes
begin) are read: ~10 small reads per sample, ~1-3 s per 10k samples from local disk. Every rule of
``schema.py`` is applied then (the decode path, ``shards.decode_sample``, applies the same ones), naming shard,
sample and key. ``values=True`` also reads every array for NaN/Inf: the loaders do that unless a stamp written
by ``data check`` vouches for the same files (check.py).

The streaming readers read arrays raw (no .npy parsing per step), so they need float16 C-order arrays, as the
ShardWriter writes them; a float32 shard is an error with ``streaming=True`` (the in-memory backend converts).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanodit.data.layout import Layout, resolve
from nanodit.data.schema import (
    Keys,
    Sample,
    ShardError,
    Tally,
    all_finite,
    check_array,
    check_members,
    check_t5_len,
    decode_text,
    mask_length,
    max_len_rule,
    nonfinite,
    parse_meta,
    sample_bucket,
    sample_id,
)
from nanodit.data.tars import (  # noqa: F401  (re-exported: the index's tar helpers, as before)
    INDEX_VERSION,
    group_members,
    index_path,
    npy_header,
    pread,
    read_npy,
    read_wds_index,
    scan_tar,
    split_name,
    tar_samples,
    write_wds_index,
)

ARRAYS = ("latent", "dino", "t5", "latent_flip", "dino_flip", "t5_flip")  # columns of the offset tables
LATENT, DINO, T5, LATENT_FLIP, DINO_FLIP, T5_FLIP = range(6)


@dataclass
class BucketIndex:
    """Where the samples of one bucket lie, in shard order (the positions ``epoch_schedule`` hands out)."""

    bucket: tuple[int, int]
    shard: np.ndarray  # (N,) int32: into SampleIndex.shards
    member_off: np.ndarray  # (N, 6) int64: .npy member offset in the tar (what DALI reads), -1 if absent
    member_size: np.ndarray  # (N, 6) int64
    data_off: np.ndarray  # (N, 6) int64: where the array bytes start (what the raw readers read)
    t5_len: np.ndarray  # (N, 2) int64: valid T5 rows of t5, t5_flip (the mask prefix, if padded)
    t5_rows: np.ndarray  # (N, 2) int64: stored T5 rows (> t5_len only for padded T5 + mask)
    has_flip: np.ndarray  # (N,) bool
    ids: list[str]
    keys: list[str]
    txt: list[str]
    flip_txt: list[str | None]
    f32: np.ndarray | None = None  # (N, 6) bool: stored as float32 (only with streaming=False)
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class SampleIndex:
    root: Path
    manifest: dict
    shards: list[Path]
    buckets: dict[tuple[int, int], BucketIndex]
    C: int
    Dd: int
    Dt: int
    skipped: list[ShardError] = field(default_factory=list)
    problems: list[ShardError] = field(default_factory=list)  # data-set level, warned under on_error=skip
    values_checked: bool = False
    layout: Layout | None = None

    @property
    def counts(self) -> dict[tuple[int, int], int]:
        return {b: len(ib) for b, ib in self.buckets.items()}

    @property
    def padded_t5(self) -> bool:
        """True when some T5 arrays are stored padded (with a mask): readers must cut them to t5_len."""
        return any(bool((ib.t5_rows != ib.t5_len).any()) for ib in self.buckets.values())

    @property
    def max_t5_len(self) -> int:
        return max((int(ib.t5_len.max()) for ib in self.buckets.values() if len(ib)), default=0)


@dataclass
class Rules:
    """What every sample is checked against (from the canonical manifest)."""

    dims: tuple[int, int, int]  # C, Dd, Dt
    keys: Keys
    limit: tuple[int, str]  # T5 tokens, and where that limit comes from
    values: bool = False  # read every array for NaN/Inf
    streaming: bool = True  # float32 is an error (the raw readers need float16)

    @classmethod
    def of(cls, manifest: dict, values: bool = False, streaming: bool = True) -> Rules:
        limit = manifest.get("t5_limit") or {}
        value, source = (limit["value"], limit["source"]) if limit else max_len_rule(None, manifest)
        dims = (int(manifest.get("latent_channels", 16)), int(manifest["dino_dim"]), int(manifest["t5_dim"]))
        return cls(dims, Keys.from_fields(manifest.get("keys")), (value, source), values, streaming)


class FileMembers:
    """The members of one sample inside an open tar: ``read(ext, offset, n)`` is a positioned read."""

    def __init__(self, fd: int, comps: dict):
        self.fd, self.comps = fd, comps

    def __contains__(self, ext: str) -> bool:
        return ext in self.comps

    def __iter__(self):
        return iter(self.comps)

    def size(self, ext: str) -> int:
        return self.comps[ext][1]

    def read(self, ext: str, offset: int = 0, n: int | None = None) -> bytes:
        off, size = self.comps[ext]
        return pread(self.fd, off + offset, size - offset if n is None else n)


class BytesMembers:
    """The members of a decoded WebDataset record (bytes per extension), with the same interface."""

    def __init__(self, raw: dict):
        self.raw = raw

    def __contains__(self, ext: str) -> bool:
        return ext in self.raw

    def __iter__(self):
        return iter(self.raw)

    def size(self, ext: str) -> int:
        return len(self.raw[ext])

    def read(self, ext: str, offset: int = 0, n: int | None = None) -> bytes:
        b = self.raw[ext]
        return bytes(b[offset:] if n is None else b[offset : offset + n])


def check_sample(members, url: str, key: str, listed: set, rules: Rules) -> dict:
    """Every per-sample rule of schema.py, in one fixed order, for a sample whose (canonical) members are
    read through ``members`` (FileMembers: the index; BytesMembers: the decode path). Returns what the
    readers need: id, bucket, meta, captions, and per array column its header offset within the member
    (``hdr``), dtype and rows; T5 valid lengths (``len``)."""
    keys = rules.keys
    at = f"{url}: sample {key}"
    has_flip = check_members(members, keys, at)
    meta = parse_meta(members.read("json") if "json" in members else None, keys, at)
    sid = sample_id(meta, key)
    heads = {}
    for name in ARRAYS:
        k = f"{name}.npy"
        if k in members:
            read = lambda o, n, k=k: members.read(k, o, n)  # noqa: E731
            heads[name] = npy_header(read, members.size(k), f"{at}: key {keys.name(k)!r}")
    lat_dtype, lat_shape, _ = heads["latent"]
    if "bucket" not in meta and len(lat_shape) != 3:  # no bucket to expect: the shape alone is wrong
        check_array("latent.npy", lat_dtype, lat_shape, rules.dims, ("h", "w"), keys, at, rules.streaming)
    bucket = sample_bucket(meta, lat_shape, listed, url, sid, at)
    rec = {"id": sid, "key": key, "bucket": bucket, "meta": meta, "has_flip": has_flip, "heads": heads}
    rec["rows"] = [0, 0]
    for name, (dtype, shape, _) in heads.items():
        check_array(f"{name}.npy", dtype, shape, rules.dims, bucket, keys, at, rules.streaming)
        if name.startswith("t5"):
            rec["rows"][int(name == "t5_flip")] = shape[0]
    rec["len"] = _t5_lengths(members, rec["rows"], rules, at)
    rec["txt"] = decode_text(members.read("txt") if "txt" in members else b"", "txt", keys, at)
    flip = members.read("flip.txt") if "flip.txt" in members else None
    rec["flip_txt"] = decode_text(flip, "flip.txt", keys, at)
    if rules.values:
        for name, array in sample_arrays(members, rec, keys, at).items():
            if not all_finite(array):
                raise nonfinite(f"{name}.npy", keys, at)
    return rec


def _t5_lengths(members, rows: list[int], rules: Rules, at: str) -> list[int]:
    """Valid T5 rows of t5 and t5_flip: all of them, or a padded array's mask prefix; within the limit."""
    lens, keys = list(rows), rules.keys
    for j, (t5_ext, mask_ext) in enumerate((("t5.npy", "t5_mask.npy"), ("t5_flip.npy", "t5_flip_mask.npy"))):
        if not rows[j]:
            continue
        if j == 1 and mask_ext not in members:
            mask_ext = "t5_mask.npy"  # one mask for both variants (padded to the same length)
        if mask_ext in members:
            read = lambda o, n, k=mask_ext: members.read(k, o, n)  # noqa: E731
            mask = read_npy(read, members.size(mask_ext), f"{at}: key {keys.name(mask_ext)!r}")
            lens[j] = mask_length(mask, rows[j], mask_ext, t5_ext, keys, at)
        check_t5_len(lens[j], *rules.limit, t5_ext, keys, at)
    return lens


def sample_arrays(members, rec: dict, keys: Keys, at: str) -> dict[str, np.ndarray]:
    """The arrays of a checked sample as stored (dtype as stored; T5 cut to its valid rows)."""
    out = {}
    for name, (dtype, shape, hdr) in rec["heads"].items():
        if name.startswith("t5"):
            shape = (rec["len"][int(name == "t5_flip")], shape[1])
        n = int(np.prod(shape)) * dtype.itemsize
        raw = members.read(f"{name}.npy", hdr, n)
        if len(raw) != n:
            raise ShardError(
                f"{at}: key {keys.name(name + '.npy')!r}: the shard ends inside the array (truncated shard or stale index)",
                "unreadable",
            )
        out[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return out


def _index_sample(fd: int, url: str, key: str, comps: dict, listed: set, rules: Rules) -> dict:
    """check_sample on a sample inside an open tar, plus where its arrays lie (the offset tables)."""
    members = FileMembers(fd, rules.keys.rename(comps))
    rec = check_sample(members, url, key, listed, rules)
    rec.update(off=[-1] * 6, size=[-1] * 6, data=[-1] * 6, f32=[False] * 6)
    for col, name in enumerate(ARRAYS):
        if name in rec["heads"]:
            dtype, _, hdr = rec["heads"][name]
            off, size = members.comps[f"{name}.npy"]
            rec["off"][col], rec["size"][col], rec["data"][col] = off, size, off + hdr
            rec["f32"][col] = dtype == np.float32
    del rec["heads"]
    return rec


def _index_shard(
    tar: Path, samples: list | None, listed: set, rules: Rules, on_error: str, stop: threading.Event, tick
) -> list[dict | ShardError]:
    """One shard's samples in order: a record or the error that sample raised (stops at the first error when
    errors raise, or when another shard already failed)."""
    out: list[dict | ShardError] = []
    try:
        samples = samples if samples is not None else tar_samples(tar)
        fd = os.open(tar, os.O_RDONLY)
    except ShardError as e:
        return [e]
    except OSError as e:
        return [ShardError(f"{tar}: not readable ({e.strerror})", "unreadable")]
    try:
        for key, comps in samples:
            if stop.is_set():
                break
            try:
                out.append(_index_sample(fd, str(tar), key, comps, listed, rules))
            except ShardError as e:
                out.append(e)
                if on_error != "skip":
                    break
            except OSError as e:  # a read failing under us: the file, not the schema
                out.append(ShardError(f"{tar}: sample {key}: read failed ({e.strerror})", "unreadable"))
                break
            if tick is not None:
                tick(1)
    finally:
        os.close(fd)
    return out


def build_index(
    root: str | Path | Layout,
    on_error: str = "raise",
    threads: int = 8,
    *,
    values: bool = False,
    streaming: bool = True,
    progress: Callable[[int], None] | None = None,
) -> SampleIndex:
    """The sample index of a ``data.path`` (same buckets, order and positions as ``read_all``), every sample
    checked against the schema; ``values`` also reads every array (NaN/Inf). ``on_error='skip'`` drops broken
    samples into ``skipped`` (each a ShardError with its ``reason``); data-set problems (manifest counts) go
    into ``problems`` instead of raising."""
    layout = root if isinstance(root, Layout) else resolve(root)
    if on_error != "skip" and layout.problems:
        raise layout.problems[0]
    m = layout.manifest
    rules = Rules.of(m, values, streaming)
    stop, tally = threading.Event(), Tally(on_error)
    buckets: dict[tuple[int, int], list[tuple[int, dict]]] = {}
    with ThreadPoolExecutor(max(1, min(threads, len(layout.shards)))) as pool:  # reads release the GIL
        jobs = [
            pool.submit(
                _index_shard,
                p,
                layout.members.get(p),
                layout.listed.get(p, set()),
                rules,
                on_error,
                stop,
                progress,
            )
            for p in layout.shards
        ]
        try:
            for number, (p, job) in enumerate(zip(layout.shards, jobs)):
                for r in job.result():
                    if isinstance(r, ShardError):
                        tally.fail(r)
                    elif tally.admit(r["id"], str(p)):
                        buckets.setdefault(r["bucket"], []).append((number, r))
        except BaseException:
            stop.set()  # the other shards stop at their next sample
            raise
    out = {b: _bucket_index(b, rows) for b, rows in sorted(buckets.items())}
    return SampleIndex(
        Path(layout.spec),
        m,
        list(layout.shards),
        out,
        *rules.dims,
        skipped=tally.skipped,
        problems=list(layout.problems),
        values_checked=values,
        layout=layout,
    )


def _bucket_index(bucket: tuple[int, int], rows: list[tuple[int, dict]]) -> BucketIndex:
    recs = [r for _, r in rows]
    return BucketIndex(
        bucket=bucket,
        shard=np.array([s for s, _ in rows], dtype=np.int32),
        member_off=np.array([r["off"] for r in recs], dtype=np.int64),
        member_size=np.array([r["size"] for r in recs], dtype=np.int64),
        data_off=np.array([r["data"] for r in recs], dtype=np.int64),
        t5_len=np.array([r["len"] for r in recs], dtype=np.int64),
        t5_rows=np.array([r["rows"] for r in recs], dtype=np.int64),
        has_flip=np.array([r["has_flip"] for r in recs], dtype=bool),
        ids=[r["id"] for r in recs],
        keys=[r["key"] for r in recs],
        txt=[r["txt"] for r in recs],
        flip_txt=[r["flip_txt"] for r in recs],
        f32=np.array([r["f32"] for r in recs], dtype=bool),
        meta=[r["meta"] for r in recs],
    )


def read_samples(index: SampleIndex) -> dict[tuple[int, int], list[Sample]]:
    """Every indexed sample, read by offset into host memory (the in-memory backend's input; the same arrays
    as ``read_all``: fp16, T5 cut to its valid rows)."""
    fds = [os.open(p, os.O_RDONLY) for p in index.shards]
    try:
        return {
            b: [_read_sample(index, ib, i, fds) for i in range(len(ib))] for b, ib in index.buckets.items()
        }
    finally:
        for fd in fds:
            os.close(fd)


def _read_sample(index: SampleIndex, ib: BucketIndex, i: int, fds: list[int]) -> Sample:
    fd, (h, w) = fds[ib.shard[i]], ib.bucket
    shapes = [(index.C, h, w), (index.Dd,), (int(ib.t5_rows[i, 0]), index.Dt)]
    shapes += [shapes[0], shapes[1], (int(ib.t5_rows[i, 1]), index.Dt)]
    arrays = {}
    for col, name in enumerate(ARRAYS):
        if ib.data_off[i, col] < 0:
            continue
        dtype = np.dtype(np.float32 if ib.f32 is not None and ib.f32[i, col] else np.float16)
        shape = shapes[col]
        if name.startswith("t5"):
            shape = (int(ib.t5_len[i, col // 3]), shape[1])  # only the valid prefix of padded states
        raw = pread(fd, int(ib.data_off[i, col]), int(np.prod(shape)) * dtype.itemsize)
        arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.float16)
    return Sample(
        id=ib.ids[i],
        bucket=ib.bucket,
        latent=arrays["latent"],
        dino=arrays["dino"],
        t5=arrays["t5"],
        txt=ib.txt[i],
        meta=ib.meta[i] if ib.meta else {},
        latent_flip=arrays.get("latent_flip"),
        dino_flip=arrays.get("dino_flip"),
        t5_flip=arrays.get("t5_flip"),
        flip_txt=ib.flip_txt[i],
    )
