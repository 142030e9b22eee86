"""Random access into tar shards: where every array of every sample lies, so a loader can read any batch.

    index = build_index(root)                    # a few small reads per sample, at start
    ib = index.buckets[(64, 64)]; i = 3          # position 3 of the bucket, in shard order (as read_all)
    ib.shard[i], ib.data_off[i, T5], ib.t5_len[i, 0]

Why: every backend must yield MemoryLoader's exact batches, whose schedule is a seeded permutation of each
bucket. A stream through the tars (with a bounded shuffle buffer) cannot produce that order; reads addressed by
(shard, offset) can. The cost is paid once at start: the member table of each tar comes from the DALI index file
the ShardWriter writes beside it (``shard-00000.idx``, wds2idx format v1.2; else the tar headers are scanned),
then per sample the json (id, bucket), the captions and the .npy headers (dtype, shape, where the array bytes
begin) are read: ~10 small reads per sample, ~1-3 s per 10k samples from local disk. Schema errors (missing
key, wrong dtype or shape, pickles) surface then, naming shard, sample and key; NaN/Inf can only be seen when
an array is read (the webdataset backend checks; ``python -m nanodit.data check`` checks everything).

The streaming readers read arrays raw (no .npy parsing per step), so they need float16 C-order arrays, as the
ShardWriter writes them; a float32 shard is an error here (the in-memory backends convert it).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from nanodit.data.shards import FORBIDDEN_EXT, REQUIRED, ShardError, load_manifest, shard_paths

ARRAYS = ("latent", "dino", "t5", "latent_flip", "dino_flip", "t5_flip")  # columns of the offset tables
LATENT, DINO, T5, LATENT_FLIP, DINO_FLIP, T5_FLIP = range(6)
INDEX_VERSION = "v1.2"
_HEAD = 256  # bytes read for an .npy header (np.save writes 128 for our arrays)


def index_path(tar: str | Path) -> Path:
    """The DALI index file beside a tar: ``shard-00000.tar`` -> ``shard-00000.idx`` (wds2idx's default name)."""
    tar = Path(tar)
    return tar.with_name(tar.name.split(".", 1)[0] + ".idx")


def split_name(name: str) -> tuple[str, str]:
    """Tar member name -> (sample key, extension): the extension starts at the first dot of the last path part."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def scan_tar(tar: str | Path) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of the regular files of a tar, in order; reads headers only."""
    try:
        with tarfile.open(tar, "r:") as tf:
            return [(m.name, m.offset_data, m.size) for m in tf if m.isreg()]
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{tar}: not a readable tar shard ({e.__class__.__name__}: {e})") from None


def group_members(members: list[tuple[str, int, int]]) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Consecutive members with the same key form a sample: [(key, {ext: (offset, size)})]."""
    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for name, off, size in members:
        key, ext = split_name(name)
        if not key or key.rsplit("/", 1)[-1].startswith("."):
            continue  # hidden files: neither webdataset nor DALI reads them
        if not out or out[-1][0] != key:
            out.append((key, {}))
        out[-1][1][ext] = (off, size)
    return out


def write_wds_index(tar: str | Path, idx: str | Path | None = None) -> Path:
    """Write DALI's index file (wds2idx format v1.2: ``<ext> <offset> <size> <name>`` per component) for a tar."""
    idx = Path(idx) if idx is not None else index_path(tar)
    samples = group_members(scan_tar(tar))
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for key, comps in samples:
        lines.append(" ".join(f"{ext} {off} {size} {_safe(key)}.{ext}" for ext, (off, size) in comps.items()))
    tmp = idx.with_name(idx.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(idx)
    return idx


def _safe(name: str) -> str:
    return name.replace(" ", "_")  # the index is whitespace-separated; the name is informative only


def read_wds_index(idx: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of a v1.2 index file: [(key, {ext: (offset, size)})]."""
    lines = Path(idx).read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or int(head[1]) != len(lines) - 1:
        raise ShardError(f"{idx}: not a {INDEX_VERSION} index file with one line per sample")
    out = []
    for line in lines[1:]:
        parts = line.split()
        comps = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
        out.append((split_name(parts[3])[0], comps))
    return out


def tar_samples(tar: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of a tar from its index file when that is at least as new as the tar, else from a scan."""
    idx = index_path(tar)
    if idx.is_file() and idx.stat().st_mtime_ns >= tar.stat().st_mtime_ns:
        return read_wds_index(idx)
    return group_members(scan_tar(tar))


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
    skipped: list[str] = field(default_factory=list)

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


def _pread(fd: int, off: int, n: int) -> bytes:
    out = os.pread(fd, n, off)
    while len(out) < n:  # short reads only at end of file (a truncated shard)
        more = os.pread(fd, n - len(out), off + len(out))
        if not more:
            break
        out += more
    return out


def _npy_header(fd: int, off: int, size: int, at: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) of the .npy member at ``off``; refuses pickles and Fortran order."""
    head = _pread(fd, off, min(size, _HEAD))
    try:
        f = io.BytesIO(head)
        version = npy_format.read_magic(f)
        if version != (1, 0) and len(head) < size:
            head = _pread(fd, off, min(size, 1 << 16))
            f = io.BytesIO(head)
            npy_format.read_magic(f)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        hdr = f.tell()
    except Exception as e:
        raise ShardError(f"{at}: not a readable .npy without pickles ({str(e).splitlines()[0]})") from None
    if dtype.hasobject:
        raise ShardError(f"{at}: not a readable .npy without pickles (object dtype)")
    if fortran and len(shape) > 1:
        raise ShardError(f"{at}: Fortran-order array; write C-order arrays (np.save of np.ascontiguousarray)")
    if hdr + int(np.prod(shape)) * dtype.itemsize != size:
        raise ShardError(f"{at}: .npy header says {shape} {dtype} but the member holds {size} bytes")
    return dtype, tuple(int(s) for s in shape), off + hdr


def _check_array(dtype: np.dtype, shape: tuple, expect: tuple, at: str) -> None:
    desc = "(" + ", ".join(str(e) for e in expect) + ("," if len(expect) == 1 else "") + ")"
    if dtype == np.float32:
        raise ShardError(
            f"{at}: dtype float32; the streaming loaders (data.loader=webdataset|dali) read float16 as stored: "
            "use data.loader=gpu-cache or rewrite the shards in float16"
        )
    if dtype != np.float16:
        raise ShardError(f"{at}: dtype {dtype}, expected float16 {desc}")
    if len(shape) != len(expect) or any(e != "L" and s != e for s, e in zip(shape, expect)):
        raise ShardError(f"{at}: shape {shape}, expected {desc}")


def _index_sample(fd: int, url: str, key: str, comps: dict, bucket: tuple[int, int], dims: tuple) -> dict:
    """Validate one sample from its headers (as decode_sample does from its bytes) and locate its arrays."""
    C, Dd, Dt = dims
    at = f"{url}: sample {key}"
    for ext in comps:
        if ("." + ext).endswith(FORBIDDEN_EXT):
            raise ShardError(f"{at}: key {ext!r}: pickled tensors are not allowed in shards")
    for k in REQUIRED:
        if k not in comps:
            raise ShardError(f"{at}: missing key {k!r}")
    try:
        meta = json.loads(_pread(fd, *comps["json"]))
        jb = tuple(int(v) for v in meta["bucket"])
        sid = str(meta.get("id", key))
    except Exception as e:
        raise ShardError(
            f"{at}: key 'json': {e.__class__.__name__}: needs {{'bucket': [h, w], 'id': ...}}"
        ) from None
    if jb != bucket:
        raise ShardError(f"{url}: sample {sid}: json bucket {list(jb)} but shard is in {bucket}")
    flips = [f"{a}.npy" for a in ARRAYS[3:]]
    present = [k for k in flips if k in comps]
    if present and len(present) != 3:
        missing = sorted(set(flips) - set(present))
        raise ShardError(f"{at}: has {present[0]!r} but not {missing[0]!r} (flip keys come together)")
    rec = {"id": sid, "key": key, "off": [-1] * 6, "size": [-1] * 6, "data": [-1] * 6, "rows": [0, 0]}
    expect = {"latent": (C, *bucket), "dino": (Dd,), "t5": ("L", Dt)}
    for col, name in enumerate(ARRAYS):
        k = f"{name}.npy"
        if k not in comps:
            continue
        off, size = comps[k]
        dtype, shape, data = _npy_header(fd, off, size, f"{at}: key {k!r}")
        _check_array(dtype, shape, expect[name.split("_")[0]], f"{at}: key {k!r}")
        if name.startswith("t5"):
            if shape[0] == 0:
                raise ShardError(f"{at}: key {k!r}: shape {shape}, expected (L >= 1, {Dt})")
            rec["rows"][col // 3] = shape[0]
        rec["off"][col], rec["size"][col], rec["data"][col] = off, size, data
    rec["len"] = list(rec["rows"])
    if "t5_mask.npy" in comps:  # padded states + mask: the valid prefix, as decode_sample keeps it
        try:
            mask = np.load(io.BytesIO(_pread(fd, *comps["t5_mask.npy"])), allow_pickle=False)
        except Exception as e:
            raise ShardError(
                f"{at}: key 't5_mask.npy': not a readable .npy ({str(e).splitlines()[0]})"
            ) from None
        mask = mask.astype(bool).reshape(-1)
        n = int(mask.sum())
        for j, rows in enumerate(rec["rows"]):
            if rows and mask.shape[0] != rows:
                k = ("t5.npy", "t5_flip.npy")[j]
                raise ShardError(f"{at}: key 't5_mask.npy': length {mask.shape[0]} != {k} length {rows}")
        if n == 0 or not mask[:n].all():
            raise ShardError(f"{at}: key 't5_mask.npy': valid tokens must be a non-empty prefix")
        rec["len"] = [n if rows else 0 for rows in rec["rows"]]
    rec["txt"] = _pread(fd, *comps["txt"]).decode("utf-8") if "txt" in comps else ""
    rec["flip_txt"] = _pread(fd, *comps["flip.txt"]).decode("utf-8") if "flip.txt" in comps else None
    rec["has_flip"] = bool(present)
    return rec


def _index_shard(
    tar: Path, bucket: tuple[int, int], dims: tuple, on_error: str
) -> tuple[list[dict], list[str]]:
    recs, skipped = [], []
    samples = tar_samples(tar)
    fd = os.open(tar, os.O_RDONLY)
    try:
        for key, comps in samples:
            try:
                recs.append(_index_sample(fd, str(tar), key, comps, bucket, dims))
            except ShardError as e:
                if on_error != "skip":
                    raise
                skipped.append(str(e))
    finally:
        os.close(fd)
    return recs, skipped


def build_index(root: str | Path, on_error: str = "raise", threads: int = 8) -> SampleIndex:
    """The sample index of a shard folder (same buckets, order and positions as ``read_all``)."""
    root = Path(root)
    manifest = load_manifest(root)
    dims = (int(manifest.get("latent_channels", 16)), int(manifest["dino_dim"]), int(manifest["t5_dim"]))
    per_bucket = shard_paths(root, manifest)
    shards = [p for paths in per_bucket.values() for p in paths]
    jobs = [(p, b) for b, paths in per_bucket.items() for p in paths]
    with ThreadPoolExecutor(max(1, min(threads, len(jobs)))) as pool:  # reads release the GIL
        results = list(pool.map(lambda j: _index_shard(j[0], j[1], dims, on_error), jobs))
    buckets: dict[tuple[int, int], list[tuple[int, dict]]] = {b: [] for b in per_bucket}
    skipped: list[str] = []
    number = {p: i for i, p in enumerate(shards)}
    for (p, b), (recs, skip) in zip(jobs, results):
        buckets[b] += [(number[p], r) for r in recs]
        skipped += skip
    out = {b: _bucket_index(b, rows) for b, rows in buckets.items() if rows}
    return SampleIndex(root, manifest, shards, out, *dims, skipped=skipped)


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
    )
