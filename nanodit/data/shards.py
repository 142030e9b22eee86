"""The Stage-2 shard schema: writer, reader and checker for WebDataset tars of precomputed latents.

Layout: ``DIR/manifest.json`` and ``DIR/bucket_<h>x<w>/shard-<n>.tar``. One sample per key, fields:

    latent.npy        fp16 (16, h, w)   VAE latent, already scaled/shifted as the manifest says
    latent_flip.npy   fp16 (16, h, w)   latent of the flipped image (optional, with the other *_flip)
    dino.npy          fp16 (Dd,)        DINOv3 CLS of the image      (dino_flip.npy: of the flipped image)
    t5.npy            fp16 (L, Dt)      unpadded T5 states of the caption (t5_flip.npy: left<->right swapped)
    t5_mask.npy       bool/int (L,)     optional: t5.npy is padded and this marks the valid prefix
    txt, flip.txt     utf-8             captions
    json              {"bucket": [h, w], "id": str, ...}

A sample that breaks the schema raises ``ShardError`` naming the shard, the sample, the key and what is wrong.
Run ``python -m nanodit.data check DIR`` to print counts per bucket and the first problem found.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "nanodit-shards/1"
REQUIRED = ("latent.npy", "dino.npy", "t5.npy", "json")
FLIP_KEYS = ("latent_flip.npy", "dino_flip.npy", "t5_flip.npy")
FORBIDDEN_EXT = (".pth", ".pt", ".pkl", ".pickle")


class ShardError(ValueError):
    """A shard or sample that breaks the schema; the message is one line."""


@dataclass
class Sample:
    """One decoded sample; arrays are numpy fp16, T5 states unpadded (L, Dt)."""

    id: str
    bucket: tuple[int, int]
    latent: np.ndarray
    dino: np.ndarray
    t5: np.ndarray
    txt: str
    meta: dict
    latent_flip: np.ndarray | None = None
    dino_flip: np.ndarray | None = None
    t5_flip: np.ndarray | None = None
    flip_txt: str | None = None

    @property
    def has_flip(self) -> bool:
        return self.latent_flip is not None


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
            from nanodit.data.index import write_wds_index

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
# reader


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ShardError(
            f"{path}: no manifest.json (is {root} a shard folder? `python -m nanodit.data synth` makes one)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    for key in ("buckets", "dino_dim", "t5_dim"):
        if key not in manifest:
            raise ShardError(f"{path}: missing key {key!r}")
    return manifest


def shard_paths(root: str | Path, manifest: dict) -> dict[tuple[int, int], list[Path]]:
    out = {}
    for name, entry in manifest["buckets"].items():
        h, w = (int(v) for v in name.split("x"))
        paths = [Path(root) / s for s in entry["shards"]]
        for p in paths:
            if not p.is_file():
                raise ShardError(f"{Path(root) / MANIFEST}: bucket {name}: shard {p} does not exist")
        out[(h, w)] = paths
    return out


def _load_npy(raw: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:
        raise ShardError(f"{where}: not a readable .npy without pickles ({str(e).splitlines()[0]})") from None


def _check_float(a: np.ndarray, where: str, shape_desc: str, ndim: int) -> np.ndarray:
    if a.dtype not in (np.float16, np.float32):
        raise ShardError(f"{where}: dtype {a.dtype}, expected float16 {shape_desc}")
    if a.ndim != ndim:
        raise ShardError(f"{where}: shape {a.shape}, expected {shape_desc}")
    if not np.isfinite(a).all():
        raise ShardError(f"{where}: contains NaN or Inf")
    return a.astype(np.float16, copy=False)


def decode_sample(raw: dict, url: str, manifest: dict) -> Sample:
    """Validate and decode one raw WebDataset record (bytes per key) against the schema."""
    key = raw.get("__key__", "?")
    at = f"{url}: sample {key}"
    for k in raw:
        if k.endswith(FORBIDDEN_EXT):
            raise ShardError(f"{at}: key {k!r}: pickled tensors are not allowed in shards")
    for k in REQUIRED:
        if k not in raw:
            raise ShardError(f"{at}: missing key {k!r}")
    try:
        meta = json.loads(raw["json"])
        bucket = tuple(int(v) for v in meta["bucket"])
        sid = str(meta.get("id", key))
    except Exception as e:
        raise ShardError(
            f"{at}: key 'json': {e.__class__.__name__}: needs {{'bucket': [h, w], 'id': ...}}"
        ) from None
    C, Dd, Dt = manifest.get("latent_channels", 16), manifest["dino_dim"], manifest["t5_dim"]
    arrays = {}
    for k in ("latent.npy", "dino.npy", "t5.npy") + FLIP_KEYS:
        if k in raw:
            arrays[k] = _load_npy(raw[k], f"{at}: key {k!r}")
    present_flip = [k for k in FLIP_KEYS if k in arrays]
    if present_flip and len(present_flip) != len(FLIP_KEYS):
        missing = sorted(set(FLIP_KEYS) - set(present_flip))
        raise ShardError(f"{at}: has {present_flip[0]!r} but not {missing[0]!r} (flip keys come together)")
    for k in ("latent.npy", "latent_flip.npy"):
        if k in arrays:
            a = _check_float(arrays[k], f"{at}: key {k!r}", f"({C}, {bucket[0]}, {bucket[1]})", 3)
            if a.shape != (C, *bucket):
                raise ShardError(
                    f"{at}: key {k!r}: shape {a.shape}, expected ({C}, {bucket[0]}, {bucket[1]})"
                )
            arrays[k] = a
    for k in ("dino.npy", "dino_flip.npy"):
        if k in arrays:
            a = _check_float(arrays[k], f"{at}: key {k!r}", f"({Dd},)", 1)
            if a.shape != (Dd,):
                raise ShardError(f"{at}: key {k!r}: shape {a.shape}, expected ({Dd},)")
            arrays[k] = a
    mask = None
    if "t5_mask.npy" in raw:
        mask = _load_npy(raw["t5_mask.npy"], f"{at}: key 't5_mask.npy'").astype(bool).reshape(-1)
    for k in ("t5.npy", "t5_flip.npy"):
        if k in arrays:
            a = _check_float(arrays[k], f"{at}: key {k!r}", f"(L, {Dt})", 2)
            if a.shape[1] != Dt or a.shape[0] == 0:
                raise ShardError(f"{at}: key {k!r}: shape {a.shape}, expected (L >= 1, {Dt})")
            if mask is not None:  # padded states + mask: keep the valid prefix
                if mask.shape[0] != a.shape[0]:
                    raise ShardError(
                        f"{at}: key 't5_mask.npy': length {mask.shape[0]} != {k} length {a.shape[0]}"
                    )
                n = int(mask.sum())
                if n == 0 or not mask[:n].all():
                    raise ShardError(f"{at}: key 't5_mask.npy': valid tokens must be a non-empty prefix")
                a = a[:n]
            arrays[k] = a
    txt = raw.get("txt", b"").decode("utf-8")
    flip_txt = raw["flip.txt"].decode("utf-8") if "flip.txt" in raw else None
    return Sample(
        id=sid,
        bucket=bucket,
        latent=arrays["latent.npy"],
        dino=arrays["dino.npy"],
        t5=arrays["t5.npy"],
        txt=txt,
        meta=meta,
        latent_flip=arrays.get("latent_flip.npy"),
        dino_flip=arrays.get("dino_flip.npy"),
        t5_flip=arrays.get("t5_flip.npy"),
        flip_txt=flip_txt,
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
            f"{path}: not a readable tar shard ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None


def iter_samples(path: str | Path, manifest: dict, on_error: str = "raise", skipped: list | None = None):
    """Decoded samples of one shard; with on_error='skip', broken samples are counted in ``skipped``."""
    for raw in iter_raw(path):
        try:
            yield decode_sample(raw, str(path), manifest)
        except ShardError as e:
            if on_error != "skip":
                raise
            if skipped is not None:
                skipped.append(str(e))


def read_all(
    root: str | Path, on_error: str = "raise"
) -> tuple[dict, dict[tuple[int, int], list[Sample]], list]:
    """Every sample of a shard folder, grouped by bucket (in shard order). Returns (manifest, groups, skipped)."""
    manifest = load_manifest(root)
    groups: dict[tuple[int, int], list[Sample]] = {}
    skipped: list[str] = []
    for bucket, paths in shard_paths(root, manifest).items():
        for p in paths:
            for s in iter_samples(p, manifest, on_error, skipped):
                if s.bucket != bucket:
                    raise ShardError(
                        f"{p}: sample {s.id}: json bucket {list(s.bucket)} but shard is in {bucket}"
                    )
                groups.setdefault(bucket, []).append(s)
    return manifest, groups, skipped


# ---------------------------------------------------------------------------------------------
# checker


def check_dir(root: str | Path) -> tuple[dict[str, int], str | None]:
    """Counts per bucket and the first problem found (None if the folder is clean)."""
    counts: dict[str, int] = {}
    try:
        manifest = load_manifest(root)
        seen: set[str] = set()
        for bucket, paths in shard_paths(root, manifest).items():
            name = f"{bucket[0]}x{bucket[1]}"
            counts[name] = 0
            for p in paths:
                for s in iter_samples(p, manifest):
                    if s.bucket != bucket:
                        return (
                            counts,
                            f"{p}: sample {s.id}: json bucket {list(s.bucket)} but shard is in {name}",
                        )
                    if s.id in seen:
                        return counts, f"{p}: sample {s.id}: duplicate id"
                    if s.t5.shape[0] > manifest.get("t5_max_len", s.t5.shape[0]):
                        return counts, f"{p}: sample {s.id}: t5 length {s.t5.shape[0]} > manifest t5_max_len"
                    seen.add(s.id)
                    counts[name] += 1
            expected = manifest["buckets"][name].get("count")
            if expected is not None and expected != counts[name]:
                return (
                    counts,
                    f"{Path(root) / MANIFEST}: bucket {name}: manifest says {expected} samples, shards hold {counts[name]}",
                )
    except ShardError as e:
        return counts, str(e)
    return counts, None
