"""The Stage-2 sample schema: canonical keys, the key map, and every rule a sample must pass.

Both readers apply these rules: the decode path (``shards.decode_sample``, the bytes of a WebDataset record) and
the index path (``index.build_index``, .npy headers and arrays read by offset). ``python -m nanodit.data check``,
every loader and validation therefore judge a sample the same way. A broken sample raises ``ShardError``: its
message is one line naming the file, the sample, the key and what is wrong; its ``reason`` is the short name
under which ``data.on_error=skip`` counts it (log, metrics.jsonl, summary.json).

Keys of a sample (canonical name = the default member extension in the tar; ``data.keys.<field>=<ext>`` maps
shards whose members are named otherwise, e.g. ``data.keys.latent=vae_latent.npy``):

    field         canonical        dtype, shape      notes
    latent        latent.npy       fp16 (C, h, w)    required; (h, w) is the bucket
    latent_flip   latent_flip.npy  fp16 (C, h, w)    optional, together with dino_flip and t5_flip
    dino          dino.npy         fp16 (Dd,)        required
    dino_flip     dino_flip.npy    fp16 (Dd,)
    t5            t5.npy           fp16 (L, Dt)      required; unpadded (L valid rows) or padded + t5_mask
    t5_flip       t5_flip.npy      fp16 (L, Dt)
    t5_mask       t5_mask.npy      bool/int (L,)     optional: the valid prefix of a padded t5 (and t5_flip)
    t5_flip_mask  t5_flip_mask.npy bool/int (L,)     optional: t5_flip's own mask (default: t5_mask)
    txt           txt              utf-8             caption
    flip_txt      flip.txt         utf-8             left<->right swapped caption
    json          json             object            optional: {"bucket": [h, w] or "HxW", "id": str, ...}

float32 arrays are accepted by the in-memory backends (converted to fp16); the streaming backends read bytes as
stored and need fp16. A sample's id is its json ``id``, else its tar key. T5 states may be at most
``data.t5_max_len`` tokens (else the manifest's ``t5_max_len``, else ``DEFAULT_T5_MAX_LEN``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

FORBIDDEN_EXT = (".pth", ".pt", ".pkl", ".pickle")
# T5's own context length (t5-v1_1 / Flux's T5-XXL encoders take 512 tokens): longer states did not come
# out of a T5 encoder as configured, so they are an error unless the config or the manifest says otherwise
DEFAULT_T5_MAX_LEN = 512

# config field -> canonical member extension
FIELDS = {
    "latent": "latent.npy",
    "latent_flip": "latent_flip.npy",
    "dino": "dino.npy",
    "dino_flip": "dino_flip.npy",
    "t5": "t5.npy",
    "t5_flip": "t5_flip.npy",
    "t5_mask": "t5_mask.npy",
    "t5_flip_mask": "t5_flip_mask.npy",
    "txt": "txt",
    "flip_txt": "flip.txt",
    "json": "json",
}
REQUIRED = ("latent.npy", "dino.npy", "t5.npy")
FLIP_KEYS = ("latent_flip.npy", "dino_flip.npy", "t5_flip.npy")
ARRAY_KEYS = ("latent.npy", "dino.npy", "t5.npy") + FLIP_KEYS


class ShardError(ValueError):
    """A shard or sample that breaks the schema; the message is one line. ``reason`` names the rule broken
    (the key under which ``data.on_error=skip`` counts skipped samples)."""

    def __init__(self, message: str, reason: str = "schema"):
        super().__init__(message)
        self.reason = reason


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


@dataclass(frozen=True)
class Keys:
    """The key map: canonical member extension -> the extension the shards use."""

    stored: dict[str, str] = field(default_factory=lambda: {c: c for c in FIELDS.values()})

    @classmethod
    def from_fields(cls, fields: dict | None, label: str = "data.keys") -> Keys:
        """From ``data.keys`` (config field -> stored extension); unset fields keep the canonical name.
        ``label`` names where the map came from in errors."""
        stored = {c: c for c in FIELDS.values()}
        if fields is not None and not isinstance(fields, dict):
            raise ShardError(
                f"{label}: must be a mapping of field -> stored extension, not {type(fields).__name__}",
                "config",
            )
        for name, ext in (fields or {}).items():
            if not isinstance(name, str) or name not in FIELDS:
                raise ShardError(f"{label}.{name}: unknown key (known: {', '.join(FIELDS)})", "config")
            if ext is not None and not isinstance(ext, str):
                raise ShardError(f"{label}.{name}: must be a file extension string, not {ext!r}", "config")
            if ext:
                stored[FIELDS[name]] = ext
        if len(set(stored.values())) != len(stored):
            dup = [e for e, n in Counter(stored.values()).items() if n > 1][0]
            raise ShardError(f"{label}: {dup!r} is mapped to two keys", "config")
        return cls(stored)

    def custom(self) -> dict[str, str]:
        """The config fields that differ from the canonical names (what a manifest or stamp records)."""
        return {f: self.stored[c] for f, c in FIELDS.items() if self.stored[c] != c}

    def name(self, canonical: str) -> str:
        """The stored name of a canonical key, as error messages show it."""
        return self.stored.get(canonical, canonical)

    def rename(self, members: dict) -> dict:
        """{stored extension: v} -> {canonical extension: v}; members that are not schema keys keep their
        names (the pickle rule and the error hints look at them)."""
        out, used = {}, set()
        for canonical, stored in self.stored.items():
            if stored in members:
                out[canonical] = members[stored]
                used.add(stored)
        for ext, v in members.items():
            if ext not in used and ext not in out and ext not in self.stored:
                out[ext] = v
        return out


DEFAULT_KEYS = Keys()


def keys_of(manifest: dict) -> Keys:
    return Keys.from_fields(manifest.get("keys"))


# ---------------------------------------------------------------------------------------------
# per-sample rules


def check_members(exts: Iterable[str], keys: Keys, at: str) -> bool:
    """Pickles, required keys, flip keys together. ``exts`` are canonical (``Keys.rename``); returns has_flip."""
    exts = list(exts)
    for ext in exts:
        if ("." + ext).endswith(FORBIDDEN_EXT):
            raise ShardError(f"{at}: key {ext!r}: pickled tensors are not allowed in shards", "pickle")
    for k in REQUIRED:
        if k not in exts:
            dotted = [e for e in exts if e.endswith("." + keys.name(k))]
            hint = (
                f" (it has {dotted[0]!r}: sample keys must not contain dots)"
                if dotted
                else f" (it has {', '.join(sorted(exts)) or 'no members'}; map other names with data.keys.*)"
            )
            raise ShardError(f"{at}: missing key {keys.name(k)!r}{hint}", "missing_key")
    present = [k for k in FLIP_KEYS if k in exts]
    if present and len(present) != len(FLIP_KEYS):
        missing = sorted(set(FLIP_KEYS) - set(present))
        raise ShardError(
            f"{at}: has {keys.name(present[0])!r} but not {keys.name(missing[0])!r} (flip keys come together)",
            "missing_key",
        )
    return bool(present)


def parse_meta(raw: bytes | None, keys: Keys, at: str) -> dict:
    """The sample's json object ({} without one)."""
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise TypeError(f"a JSON {type(meta).__name__}, not an object")
        if "bucket" in meta:
            parse_bucket(meta["bucket"])
    except Exception as e:
        raise ShardError(
            f"{at}: key {keys.name('json')!r}: {e.__class__.__name__}: needs an object like "
            "{'bucket': [h, w], 'id': ...}",
            "bad_json",
        ) from None
    return meta


def parse_bucket(value) -> tuple[int, int]:
    """A json bucket: [h, w] or "HxW"."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", value)
        if not m:
            raise ValueError(f"bucket {value!r} is not 'HxW'")
        return int(m.group(1)), int(m.group(2))
    h, w = (int(v) for v in value)
    return h, w


def sample_id(meta: dict, key: str) -> str:
    return str(meta.get("id", key))


def sample_bucket(
    meta: dict, latent_shape: tuple, listed: set, url: str, sid: str, at: str
) -> tuple[int, int]:
    """The bucket of a sample: its json bucket, else the latent's (h, w). It must be one the shard is listed
    under (a folder named HxW, a manifest entry) and agree with the latent's shape."""
    json_b = parse_bucket(meta["bucket"]) if "bucket" in meta else None
    if json_b is not None and len(listed) == 1 and json_b not in listed:
        raise ShardError(
            f"{url}: sample {sid}: json bucket {list(json_b)} but shard is in {next(iter(listed))}", "bucket"
        )
    bucket = json_b or tuple(int(s) for s in latent_shape[1:3])
    if listed and bucket not in listed:
        names = ", ".join(f"{h}x{w}" for h, w in sorted(listed))
        raise ShardError(
            f"{at}: bucket {bucket[0]}x{bucket[1]} but the shard is listed under {names}", "bucket"
        )
    return bucket


def _desc(expect: tuple) -> str:
    return "(" + ", ".join(str(e) for e in expect) + ("," if len(expect) == 1 else "") + ")"


def expected_shape(ext: str, dims: tuple[int, int, int], bucket: tuple[int, int]) -> tuple:
    C, Dd, Dt = dims
    kind = ext.split(".")[0].split("_")[0]
    return {"latent": (C, *bucket), "dino": (Dd,), "t5": ("L", Dt)}[kind]


def check_array(
    ext: str, dtype: np.dtype, shape: tuple, dims: tuple, bucket: tuple, keys: Keys, at: str, streaming: bool
) -> None:
    """dtype and shape of a latent/DINO/T5 array (``ext`` canonical), from its .npy header."""
    expect = expected_shape(ext, dims, bucket)
    where = f"{at}: key {keys.name(ext)!r}"
    if dtype == np.float32 and streaming:
        raise ShardError(
            f"{where}: dtype float32; the streaming loaders (data.loader=webdataset|dali) read float16 as stored: "
            "use data.loader=gpu-cache or rewrite the shards in float16",
            "dtype",
        )
    if dtype not in (np.float16, np.float32):
        raise ShardError(f"{where}: dtype {dtype}, expected float16 {_desc(expect)}", "dtype")
    # str entries ("L", or "h", "w" when no bucket is known) accept any size
    if len(shape) != len(expect) or any(not isinstance(e, str) and s != e for s, e in zip(shape, expect)):
        raise ShardError(f"{where}: shape {tuple(shape)}, expected {_desc(expect)}", "shape")
    if expect[0] == "L" and shape[0] == 0:
        raise ShardError(f"{where}: shape {tuple(shape)}, expected (L >= 1, {expect[1]})", "shape")


def mask_length(mask: np.ndarray, rows: int, mask_ext: str, t5_ext: str, keys: Keys, at: str) -> int:
    """Valid tokens of a padded T5 array from its mask: a non-empty prefix of the array's rows."""
    where = f"{at}: key {keys.name(mask_ext)!r}"
    if mask.dtype.kind not in "biuf":
        raise ShardError(f"{where}: dtype {mask.dtype}, expected bool or integer", "mask")
    mask = mask.reshape(-1)
    if mask.dtype.kind == "f" and not np.isin(mask, (0.0, 1.0)).all():
        raise ShardError(f"{where}: a float mask must hold only 0 and 1", "mask")
    mask = mask.astype(bool)
    if mask.shape[0] != rows:
        raise ShardError(f"{where}: length {mask.shape[0]} != {keys.name(t5_ext)} length {rows}", "mask")
    n = int(mask.sum())
    if n == 0 or not mask[:n].all():
        raise ShardError(f"{where}: valid tokens must be a non-empty prefix", "mask")
    return n


def check_t5_len(n: int, max_len: int, source: str, ext: str, keys: Keys, at: str) -> None:
    if n > max_len:
        raise ShardError(
            f"{at}: key {keys.name(ext)!r}: {n} T5 tokens > {source}; set data.t5_max_len if that is meant",
            "t5_too_long",
        )


def decode_text(raw: bytes | None, ext: str, keys: Keys, at: str) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShardError(
            f"{at}: key {keys.name(ext)!r}: not UTF-8 (byte {raw[e.start]:#04x} at position {e.start})",
            "not_utf8",
        ) from None


def all_finite(a: np.ndarray) -> bool:
    """No NaN/Inf. For fp16, no exponent field of all ones: as int16 no value >= 0x7C00 (positive Inf/NaN), as
    uint16 none >= 0xFC00 (negative). Two reductions at memory speed, no temporaries (np.isfinite on fp16 is
    ~20x slower, a masked copy allocates and faults in fresh pages)."""
    if a.size == 0:
        return True
    if a.dtype == np.float16:
        return int(a.view(np.int16).max()) < 0x7C00 and int(a.view(np.uint16).max()) < 0xFC00
    return bool(np.isfinite(a).all())


def nonfinite(ext: str, keys: Keys, at: str) -> ShardError:
    return ShardError(f"{at}: key {keys.name(ext)!r}: contains NaN or Inf", "nan_inf")


def max_len_rule(configured: int | None, manifest: dict) -> tuple[int, str]:
    """(limit, how it was chosen) for T5 lengths: data.t5_max_len, else the manifest's, else the default."""
    if configured:
        return int(configured), f"data.t5_max_len={configured}"
    if manifest.get("t5_max_len"):
        return int(manifest["t5_max_len"]), f"the manifest's t5_max_len={manifest['t5_max_len']}"
    return DEFAULT_T5_MAX_LEN, f"the default t5_max_len={DEFAULT_T5_MAX_LEN} (the manifest names none)"


# ---------------------------------------------------------------------------------------------
# data-set rules


class Tally:
    """What holds across samples, applied in shard order: unique ids, and what ``on_error`` does with a broken
    sample (raise it, or skip and count it by reason)."""

    def __init__(self, on_error: str = "raise"):
        self.on_error = on_error
        self.seen: dict[str, str] = {}
        self.skipped: list[ShardError] = []

    def fail(self, err: ShardError) -> None:
        if self.on_error != "skip":
            raise err
        self.skipped.append(err)

    def admit(self, sid: str, url: str) -> bool:
        """False (the sample is dropped) when another sample already has this id."""
        if sid in self.seen:
            self.fail(
                ShardError(f"{url}: sample {sid}: duplicate id (first in {self.seen[sid]})", "duplicate_id")
            )
            return False
        self.seen[sid] = url
        return True


def skip_counts(skipped: Iterable) -> dict[str, int]:
    """Skipped samples by reason (strings from older callers count as 'schema')."""
    return dict(sorted(Counter(getattr(e, "reason", "schema") for e in skipped).items()))
