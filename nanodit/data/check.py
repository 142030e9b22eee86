"""The data check: what ``python -m nanodit.data check`` runs, and the stamp that lets the loaders trust it.

``check_data(path)`` is ``index.build_index`` with every array read (NaN/Inf) and every problem collected: the
same function, with the same rules, that every loader runs at start (``nanodit.data.build_loader``). When it
finds no problem it can write a stamp, ``.nanodit-check.json`` in the data folder, recording what was checked:
each shard's path, size and modification time, the key map, the T5 length limit and the check's version. A
loader whose data matches a stamp exactly reads only the headers (``data.check=auto``); any change to a shard,
the keys or the limit, or a newer rule set (``STAMP_VERSION``), and the loader reads every sample itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from nanodit.data.index import SampleIndex, build_index
from nanodit.data.layout import Layout, resolve
from nanodit.data.schema import Keys, ShardError, skip_counts

STAMP = ".nanodit-check.json"
STAMP_VERSION = 1  # bump when a rule changes: stamps of the older rules stop vouching for the data


@dataclass
class CheckReport:
    layout: Layout
    index: SampleIndex

    @property
    def counts(self) -> dict[str, int]:
        return {f"{h}x{w}": n for (h, w), n in sorted(self.index.counts.items())}

    @property
    def problems(self) -> list[ShardError]:
        """Data-set problems (manifest counts), then broken samples, in shard order."""
        return list(self.index.problems) + list(self.index.skipped)

    def first_problem(self) -> ShardError | None:
        return self.problems[0] if self.problems else None

    @property
    def by_reason(self) -> dict[str, int]:
        return skip_counts(self.problems)

    @property
    def float32_samples(self) -> int:
        return sum(int(ib.f32.any(1).sum()) for ib in self.index.buckets.values() if ib.f32 is not None)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar and a thread-safe ``tick(n)`` for the index's shard threads (None, None when disabled)."""
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar, lock = tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True), threading.Lock()

    def tick(n: int) -> None:
        with lock:  # the shard jobs run in threads; tqdm's counter is not atomic
            bar.update(n)

    return bar, tick


def check_data(
    spec: str | Path | Layout,
    keys: Keys | None = None,
    t5_max_len: int | None = None,
    threads: int = 4,
    progress: bool = True,
) -> CheckReport:
    """Read every sample of ``spec`` against the schema (arrays included); every problem is collected."""
    layout = spec if isinstance(spec, Layout) else resolve(spec, keys, t5_max_len)
    bar, tick = progress_bar(layout.manifest["count"], "data check", progress)
    try:
        index = build_index(layout, "skip", threads, values=True, streaming=False, progress=tick)
    finally:
        if bar is not None:
            bar.close()
    return CheckReport(layout, index)


# ---------------------------------------------------------------------------------------------
# the stamp


def stamp_path(layout: Layout) -> Path:
    """``.nanodit-check.json`` in a data folder; for a glob or a list, one per pattern beside the shards."""
    if Path(layout.spec).is_dir():
        return Path(layout.spec) / STAMP
    digest = hashlib.sha1(os.path.abspath(layout.spec).encode()).hexdigest()[:10]
    return layout.root / f".nanodit-check-{digest}.json"


def fingerprint(layout: Layout) -> dict:
    """What a stamp vouches for: the rules' version, the reading options and every shard's size and mtime."""
    shards = []
    for p in layout.shards:
        st = p.stat()
        shards.append([str(p.absolute()), st.st_size, st.st_mtime_ns])
    m = layout.manifest
    return {
        "version": STAMP_VERSION,
        "keys": m.get("keys", {}),
        "t5_limit": m["t5_limit"]["value"],
        "dims": [m["latent_channels"], m["dino_dim"], m["t5_dim"]],
        "shards": shards,
    }


def write_stamp(report: CheckReport) -> Path:
    """Record a clean check (raises ShardError if it found problems; OSError if the folder is read-only)."""
    if report.problems:
        raise ShardError(
            f"{report.layout.spec}: not stamped: the check found {len(report.problems)} problems"
        )
    path = stamp_path(report.layout)
    body = {**fingerprint(report.layout), "samples": report.index.manifest["count"], "counts": report.counts}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(path)
    return path


def stamp_matches(layout: Layout) -> bool:
    """True when a stamp vouches for exactly these shards, read this way."""
    path = stamp_path(layout)
    try:
        stamp = json.loads(path.read_text())
        return {k: stamp.get(k) for k in ("version", "keys", "t5_limit", "dims", "shards")} == fingerprint(
            layout
        )
    except (OSError, ValueError):
        return False
