"""The Stage-2 shards of this project: the writer, the decode-path reader, and ``check_dir``.

Layout written: ``DIR/manifest.json`` and ``DIR/bucket_<h>x<w>/shard-<n>.tar``; the keys and rules of a sample
are in ``schema.py``, the layouts other producers write (and that every reader accepts) in ``layout.py``.

    latent.npy        fp16 (16, h, w)   VAE latent, already scaled/shifted as the manifest says
    latent_flip.npy   fp16 (16, h, w)   latent of the flipped image (optional, with the other *_flip)
    dino.npy          fp16 (Dd,)        DINOv3 CLS of the image      (dino_flip.npy: of the flipped image)
    t5.npy            fp16 (L, Dt)      unpadded T5 states of the caption (t5_flip.npy: left<->right swapped)
    t5_mask.npy       bool/int (L,)     optional: t5.npy is padded and this marks the valid prefix
    txt, flip.txt     utf-8             captions
    json              {"bucket": [h, w], "id": str, ...}

Two readers apply the same per-sample check (``index.check_sample``): the decode path here (``iter_samples``,
``read_all``: WebDataset records, every array in memory; validation and the tests' reference) and the index
(``index.build_index``: headers and arrays by offset; ``data check`` and every loader). A sample that breaks the
schema raises ``ShardError`` naming the shard, the sample, the key and what is wrong. ``python -m nanodit.data
check data.path=DIR`` reads every sample and prints counts per bucket and the problems found.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nanodit.data.check import check_data
from nanodit.data.index import BytesMembers, Rules, check_sample, sample_arrays
from nanodit.data.layout import FORMAT, MANIFEST, Layout, load_manifest, resolve, shard_paths  # noqa: F401
from nanodit.data.schema import FLIP_KEYS, FORBIDDEN_EXT, REQUIRED, Sample, ShardError, Tally  # noqa: F401
from nanodit.data.tars import write_wds_index


def bucket_name(h: int, w: int) -> str:
    return f"bucket_{h}x{w}"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# writer


class ShardWriter:
    """Writes samples into per-bucket tar shards and, on close, ``manifest.json``.

    ``manifest_extra`` (encoder names/versions, VAE scale/shift, ...) is merged into the manifest.
    """

    def __init__(
        self,
        out_dir: str | Path,
        manifest_extra: dict | None = None,
        samples_per_shard: int = 1000,
        write_index: bool = True,
    ):
        import webdataset as wds

        self._wds = wds
        self.write_index = write_index  # a DALI index file (wds2idx format) beside each finished tar
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.extra = dict(manifest_extra or {})
        self.per_shard = samples_per_shard
        self.writers: dict[tuple[int, int], object] = {}
        self.counts: dict[tuple[int, int], int] = {}
        self.shards: dict[tuple[int, int], list[str]] = {}
        self.dims: dict[str, int] = {}
        self.max_len = 0

    def _writer(self, bucket: tuple[int, int]):
        n = self.counts.get(bucket, 0)
        if bucket not in self.writers or n % self.per_shard == 0:
            if bucket in self.writers:
                self._finish(bucket)
            folder = self.out / bucket_name(*bucket)
            folder.mkdir(exist_ok=True)
            rel = f"{bucket_name(*bucket)}/shard-{len(self.shards.get(bucket, [])):05d}.tar"
            self.shards.setdefault(bucket, []).append(rel)
            self.writers[bucket] = self._wds.TarWriter(str(self.out / rel), mtime=0.0)  # byte-reproducible
        return self.writers[bucket]

    def _finish(self, bucket: tuple[int, int]) -> None:
        self.writers[bucket].close()
        if self.write_index:
            write_wds_index(self.out / self.shards[bucket][-1])

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        if "." in key:
            raise ShardError(f"ShardWriter: sample key {key!r} contains a dot")
        meta = sample["json"]
        bucket = tuple(int(v) for v in meta["bucket"])
        lat = sample["latent"]
        if tuple(lat.shape[1:]) != bucket:
            raise ShardError(
                f"ShardWriter: sample {key}: latent shape {lat.shape} does not match bucket {bucket}"
            )
        rec = {"__key__": key, "json": json.dumps(meta).encode()}
        for k in ("latent", "latent_flip", "dino", "dino_flip", "t5", "t5_flip", "t5_mask"):
            if sample.get(k) is not None:
                arr = sample[k]
                if k != "t5_mask":
                    arr = np.asarray(arr, dtype=np.float16)
                rec[f"{k}.npy"] = _npy_bytes(arr)
        for k in ("txt", "flip.txt"):
            if sample.get(k) is not None:
                rec[k] = sample[k].encode("utf-8")
        self.dims["dino"] = int(np.asarray(sample["dino"]).shape[-1])
        self.dims["t5"] = int(np.asarray(sample["t5"]).shape[-1])
        self.dims["latent_channels"] = int(lat.shape[0])
        lens = [np.asarray(sample["t5"]).shape[0]]
        if sample.get("t5_flip") is not None:
            lens.append(np.asarray(sample["t5_flip"]).shape[0])
        self.max_len = max(self.max_len, *lens)
        self._writer(bucket).write(rec)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1

    def close(self) -> dict:
        for bucket in self.writers:
            self._finish(bucket)
        manifest = {
            "format": FORMAT,
            "count": sum(self.counts.values()),
            "latent_channels": self.dims.get("latent_channels", 16),
            "dino_dim": self.dims.get("dino"),
            "t5_dim": self.dims.get("t5"),
            "t5_max_len": self.max_len,
            "buckets": {
                f"{h}x{w}": {"count": self.counts[(h, w)], "shards": self.shards[(h, w)]}
                for (h, w) in sorted(self.counts)
            },
        }
        manifest.update(self.extra)
        tmp = self.out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(self.out / MANIFEST)
        return manifest


# ---------------------------------------------------------------------------------------------
# reader (the decode path)


def decode_sample(raw: dict, url: str, manifest: dict, listed: set | None = None) -> Sample:
    """Validate and decode one raw WebDataset record (bytes per key) against the schema (``check_sample``,
    arrays included); ``listed``: the buckets its shard is listed under (empty: any)."""
    rules = Rules.of(manifest, values=True, streaming=False)
    key = str(raw.get("__key__", "?"))
    members = BytesMembers(rules.keys.rename({k: v for k, v in raw.items() if not k.startswith("__")}))
    rec = check_sample(members, url, key, listed or set(), rules)
    at = f"{url}: sample {key}"
    arrays = {k: a.astype(np.float16) for k, a in sample_arrays(members, rec, rules.keys, at).items()}
    return Sample(
        id=rec["id"],
        bucket=rec["bucket"],
        latent=arrays["latent"],
        dino=arrays["dino"],
        t5=arrays["t5"],
        txt=rec["txt"],
        meta=rec["meta"],
        latent_flip=arrays.get("latent_flip"),
        dino_flip=arrays.get("dino_flip"),
        t5_flip=arrays.get("t5_flip"),
        flip_txt=rec["flip_txt"],
    )


def iter_raw(path: str | Path) -> Iterator[dict]:
    """Raw records (bytes per key) of one tar shard, in order."""
    import webdataset as wds

    try:
        yield from wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(
            f"{path}: not a readable tar shard ({e.__class__.__name__}: {str(e).splitlines()[0]})",
            "unreadable",
        ) from None


def iter_samples(
    path: str | Path,
    manifest: dict,
    on_error: str = "raise",
    skipped: list | None = None,
    listed: set | None = None,
):
    """Decoded samples of one shard; with on_error='skip', broken samples are counted in ``skipped``."""
    for raw in iter_raw(path):
        try:
            yield decode_sample(raw, str(path), manifest, listed)
        except ShardError as e:
            if on_error != "skip":
                raise
            if skipped is not None:
                skipped.append(e)


def read_all(
    root: str | Path | Layout, on_error: str = "raise"
) -> tuple[dict, dict[tuple[int, int], list[Sample]], list]:
    """Every sample of a ``data.path``, grouped by bucket (in shard order). Returns (manifest, groups, skipped):
    the same samples, positions and errors as ``index.build_index`` + ``index.read_samples``."""
    layout = root if isinstance(root, Layout) else resolve(root)
    if on_error != "skip" and layout.problems:
        raise layout.problems[0]
    tally = Tally(on_error)
    groups: dict[tuple[int, int], list[Sample]] = {}
    for p in layout.shards:
        for s in iter_samples(p, layout.manifest, "skip", tally.skipped, layout.listed.get(p, set())):
            if tally.on_error != "skip" and tally.skipped:
                raise tally.skipped[0]
            if tally.admit(s.id, str(p)):
                groups.setdefault(s.bucket, []).append(s)
        if tally.on_error != "skip" and tally.skipped:
            raise tally.skipped[0]
    return layout.manifest, dict(sorted(groups.items())), tally.skipped


# ---------------------------------------------------------------------------------------------
# checker


def check_dir(root: str | Path) -> tuple[dict[str, int], str | None]:
    """Counts per bucket of the samples that pass every check, and the first problem found (None if clean)."""
    try:
        report = check_data(root, progress=False)
    except ShardError as e:
        return {}, str(e)
    first = report.first_problem()
    return report.counts, (str(first) if first is not None else None)
