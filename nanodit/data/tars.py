"""Tar shards at the byte level: member tables (from DALI index files or tar headers), positioned reads, and
.npy headers, without reading whole members.

A tar's members group into samples the way webdataset and DALI group them: consecutive members sharing a key
(the name up to the first dot of its last path part). ``tar_samples`` gives [(key, {ext: (offset, size)})] from
the wds2idx index file beside the tar when that is at least as new as the tar, else from a scan of the headers.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from nanodit.data.schema import ShardError

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
        raise ShardError(
            f"{tar}: not a readable tar shard ({e.__class__.__name__}: {e})", "unreadable"
        ) from None


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
    lines = Path(idx).read_text(errors="replace").splitlines()
    head = lines[0].split() if lines else []
    try:
        ok = len(head) == 2 and head[0] == INDEX_VERSION and int(head[1]) == len(lines) - 1
        out = []
        for line in lines[1:] if ok else []:
            parts = line.split()
            comps = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
            out.append((split_name(parts[3])[0], comps))
    except (ValueError, IndexError):
        ok = False
    if not ok:
        raise ShardError(f"{idx}: not a {INDEX_VERSION} index file with one line per sample", "unreadable")
    return out


def tar_samples(tar: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of a tar from its index file when that is at least as new as the tar, else from a scan."""
    idx = index_path(tar)
    try:
        if idx.is_file() and idx.stat().st_mtime_ns >= tar.stat().st_mtime_ns:
            return read_wds_index(idx)
    except OSError as e:
        raise ShardError(f"{tar}: not readable ({e.strerror})", "unreadable") from None
    return group_members(scan_tar(tar))


def pread(fd: int, off: int, n: int) -> bytes:
    out = os.pread(fd, n, off)
    while len(out) < n:  # short reads only at end of file (a truncated shard)
        more = os.pread(fd, n - len(out), off + len(out))
        if not more:
            break
        out += more
    return out


def reader_at(fd: int, off: int):
    """A ``read(offset, n)`` over the member that starts at ``off`` of an open file."""
    return lambda o, n: pread(fd, off + o, n)


# numpy parses a .npy header with ast.literal_eval; CPython 3.11's AST constructor is not safe to run in several
# threads at once (a rare "AST constructor recursion depth mismatch" SystemError, seen in the index's shard
# threads): the parse (microseconds) runs under one lock, the reads stay parallel
_PARSE = threading.Lock()


def npy_header(read, size: int, at: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset within the member) of a .npy member of ``size`` bytes, read through
    ``read(offset, n)``; refuses pickles (object dtypes), Fortran order and a size that does not add up."""
    head = read(0, min(size, _HEAD))
    try:
        f = io.BytesIO(head)
        version = npy_format.read_magic(f)
        if version != (1, 0) and len(head) < size:
            head = read(0, min(size, 1 << 16))
            f = io.BytesIO(head)
            npy_format.read_magic(f)
        parse = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        with _PARSE:
            shape, fortran, dtype = parse(f)
        hdr = f.tell()
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise ShardError(f"{at}: not a readable .npy without pickles ({msg})", "unreadable") from None
    if dtype.hasobject:
        raise ShardError(f"{at}: not a readable .npy without pickles (object dtype)", "pickle")
    if fortran and len(shape) > 1:
        raise ShardError(
            f"{at}: Fortran-order array; write C-order arrays (np.save of np.ascontiguousarray)", "unreadable"
        )
    if hdr + int(np.prod(shape)) * dtype.itemsize != size:
        raise ShardError(
            f"{at}: .npy header says {shape} {dtype} but the member holds {size} bytes", "unreadable"
        )
    return dtype, tuple(int(s) for s in shape), hdr


def read_npy(read, size: int, at: str) -> np.ndarray:
    """A whole .npy member (small arrays: masks) through ``read(offset, n)``, with npy_header's checks."""
    dtype, shape, hdr = npy_header(read, size, at)
    raw = read(hdr, size - hdr)
    if len(raw) != size - hdr:
        raise ShardError(
            f"{at}: the shard ends inside the array (truncated shard or stale index)", "unreadable"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
