"""Where the shards are: ``data.path`` (a folder, a glob, a brace pattern, a list of tars) -> one canonical
manifest that every reader uses, whoever wrote the shards.

Accepted layouts (the README shows an example of each):

- this project's: ``DIR/manifest.json`` listing shards per bucket (``ShardWriter`` writes it);
- another producer's manifest: ``"buckets": {"bucket-64x64": 20, ...}`` (folder name -> count) or
  ``{"bucket-64x64": {"count": 20}}``; the shards are the tars in those folders; missing ``count``, dims or
  ``t5_max_len`` are taken from the data (the last from the config or ``schema.DEFAULT_T5_MAX_LEN``);
- one folder per bucket, no manifest: ``DIR/<anything HxW>/*.tar`` (the bucket from the folder's ``HxW``; a
  folder without one: from each sample's json ``bucket`` or its latent's shape);
- a flat folder ``DIR/*.tar``, a glob ``data/*.tar``, a brace pattern ``shard-{0000..0099}.tar``, a
  comma-separated list, or one tar: each sample's bucket from its json or its latent's shape (a tar may then
  hold several buckets).

The canonical manifest (what ``load_manifest`` returns, saved in every checkpoint) has this project's form:
``count``, ``latent_channels``, ``dino_dim``, ``t5_dim``, ``t5_max_len`` (as stated, or None), ``t5_limit``
(the T5 length limit in force and where it comes from), ``buckets: {"HxW": {"count", "shards"}}``, ``keys``
(the key map, when not the default), ``layout`` (what was found), and every other field of the producer's
manifest unchanged. Counts are what the tars hold; a manifest that states other counts is a problem
(``Layout.problems``) that ``data check`` reports and the loaders raise (or, with ``data.on_error=skip``, warn).
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nanodit.data.schema import (
    DEFAULT_KEYS,
    REQUIRED,
    Keys,
    ShardError,
    check_members,
    max_len_rule,
    parse_bucket,
)
from nanodit.data.tars import npy_header, pread, reader_at, tar_samples

MANIFEST = "manifest.json"
FORMAT = "nanodit-shards/1"
_HXW = re.compile(r"(\d+)x(\d+)")
_DIM_PROBES = 16  # samples tried when the dims must come from the data


@dataclass
class Layout:
    """A resolved ``data.path``: the canonical manifest and what the readers need beside it."""

    spec: str  # data.path as given
    root: Path  # the folder that holds it (stamps, messages)
    kind: str  # manifest | bucket-folders | flat | list
    manifest: dict
    shards: list[Path]  # every shard once, in read order (bucket positions follow it)
    listed: dict[Path, set]  # buckets each shard is listed under
    problems: list[ShardError] = field(default_factory=list)  # data-set level: stated counts that differ
    members: dict[Path, list] = field(default_factory=dict)  # tar -> tar_samples(tar), read once


# data.keys / data.t5_max_len of the run that named a data.path, so that readers given only the path
# (validation re-reads samples by ``loader.root``) read it the way the loader did
_OPTIONS: dict[str, tuple[Keys, int | None]] = {}


def register(spec: str | Path, keys: Keys, t5_max_len: int | None) -> None:
    _OPTIONS[os.path.abspath(str(spec))] = (keys, t5_max_len)


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def _tars_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*.tar") if not p.name.startswith(".")), key=_natural)


def folder_bucket(name: str) -> tuple[int, int] | None:
    """``bucket-64x64`` -> (64, 64): the last HxW in a name, if any."""
    found = _HXW.findall(name)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})", "manifest") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not readable ({e.__class__.__name__}: {e})", "manifest") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: a JSON {type(manifest).__name__}, expected an object", "manifest")
    return manifest


# ---------------------------------------------------------------------------------------------
# groups: (label, bucket declared for the group or None, stated count or None, tars)


def _groups_from_manifest(root: Path, manifest: dict) -> list[tuple]:
    where = root / MANIFEST
    buckets = manifest["buckets"]
    if isinstance(buckets, list):
        buckets = {str(b): None for b in buckets}
    if not isinstance(buckets, dict) or not buckets:
        raise ShardError(
            f"{where}: 'buckets' must be a non-empty object (name -> count or entry)", "manifest"
        )
    groups = []
    for name, entry in buckets.items():
        at = f"{where}: bucket {name!r}"
        if isinstance(entry, bool) or not isinstance(entry, (int, dict, type(None))):
            raise ShardError(f"{at}: expected a count or an object with 'count'/'shards'", "manifest")
        entry = {"count": entry} if not isinstance(entry, dict) else entry
        count = entry.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise ShardError(f"{at}: count {count!r} is not a number of samples", "manifest")
        declared = folder_bucket(name)
        if "shards" in entry:
            if not isinstance(entry["shards"], list):
                raise ShardError(f"{at}: 'shards' must be a list of tar paths", "manifest")
            tars = [root / str(s) for s in entry["shards"]]
            for p in tars:
                if not p.is_file():
                    raise ShardError(f"{at}: shard {p} does not exist", "manifest")
        else:
            folder = root / name
            if not folder.is_dir() and declared is not None:  # "64x64" naming a folder "bucket_64x64"
                same = [d for d in root.iterdir() if d.is_dir() and folder_bucket(d.name) == declared]
                folder = same[0] if len(same) == 1 else folder
            if not folder.is_dir():
                raise ShardError(f"{at}: lists no shards and there is no folder {folder}", "manifest")
            tars = _tars_in(folder)
            if not tars:
                raise ShardError(f"{at}: folder {folder} holds no .tar shards", "manifest")
        groups.append((name, declared, count, tars))
    return groups


def _groups_from_folders(root: Path) -> tuple[str, list[tuple]]:
    own = sorted((p for p in root.glob("*.tar") if not p.name.startswith(".")), key=_natural)
    subs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=_natural)
    groups = [(d.name, folder_bucket(d.name), None, _tars_in(d)) for d in subs]
    groups = [g for g in groups if g[3]]
    if own:
        groups.insert(0, (".", None, None, own))
    if not groups:
        raise ShardError(
            f"{root}: no manifest.json and no .tar shards (is it a shard folder? `python -m nanodit.data synth "
            "data.path=DIR` makes one)",
            "manifest",
        )
    return ("bucket-folders" if not own else "flat"), groups


def split_spec(spec: str) -> list[str]:
    """``a.tar,b/*.tar`` or ``a.tar::b.tar`` -> the parts; commas inside braces belong to the pattern."""
    parts, depth, cur = [], 0, ""
    for ch in spec.replace("::", ","):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def expand_spec(spec: str) -> list[Path]:
    """The tars a non-folder ``data.path`` names (globs, brace patterns, lists), in the order given."""
    from braceexpand import braceexpand  # webdataset's own dependency: the same patterns as its URLs

    out: list[Path] = []
    for part in split_spec(spec):
        for name in braceexpand(part):
            if globlib.has_magic(name):
                hits = sorted(globlib.glob(name, recursive=True), key=lambda s: _natural(Path(s)))
                if not hits:
                    raise ShardError(f"data.path={spec!r}: {name!r} matches no file", "manifest")
                out += [Path(h) for h in hits if Path(h).is_file()]
                out += [t for h in hits if Path(h).is_dir() for t in _tars_in(Path(h))]
            elif Path(name).is_dir():
                out += _tars_in(Path(name))
            elif Path(name).is_file():
                out.append(Path(name))
            else:
                raise ShardError(f"data.path={spec!r}: {name} does not exist", "manifest")
    for p in out:
        if not p.name.endswith(".tar"):
            raise ShardError(
                f"data.path={spec!r}: {p} is not a .tar (compressed tars cannot be read by offset: decompress them)",
                "manifest",
            )
    if not out:
        raise ShardError(f"data.path={spec!r}: names no .tar shard", "manifest")
    return list(dict.fromkeys(out))  # each tar once


# ---------------------------------------------------------------------------------------------
# what must be read: buckets of undeclared tars, dims the manifest does not state


def _scan_buckets(tar: Path, members: list, keys: Keys) -> list[tuple[int, int] | None]:
    """Per sample of a tar: its json bucket, else its latent's (h, w), else None (the index reports why)."""
    out = []
    fd = _open(tar)
    try:
        for key, comps in members:
            comps = keys.rename(comps)
            b = None
            try:
                if "json" in comps:
                    meta = json.loads(pread(fd, *comps["json"]))
                    b = parse_bucket(meta["bucket"]) if isinstance(meta, dict) and "bucket" in meta else None
                if b is None and "latent.npy" in comps:
                    off, size = comps["latent.npy"]
                    _, shape, _ = npy_header(reader_at(fd, off), size, f"{tar}: sample {key}")
                    b = tuple(shape[1:3]) if len(shape) == 3 else None
            except (ShardError, ValueError, TypeError, KeyError):
                b = None  # a broken sample: the index pass names what is wrong with it
            out.append(b)
    finally:
        os.close(fd)
    return out


def _open(tar: Path) -> int:
    try:
        return os.open(tar, os.O_RDONLY)
    except OSError as e:
        raise ShardError(f"{tar}: not readable ({e.strerror})", "unreadable") from None


def _dims_from_data(shards: list[Path], members: dict, keys: Keys) -> dict[str, int]:
    """latent_channels, dino_dim, t5_dim from the .npy headers of the first readable sample; when none of the
    first few is readable, the first one's problem (what the index would report first) is raised."""
    first: ShardError | None = None
    tried = 0
    for tar in shards:
        fd = _open(tar)
        try:
            for key, comps in members[tar]:
                comps, at = keys.rename(comps), f"{tar}: sample {key}"
                tried += 1
                try:
                    check_members(comps, keys, at)
                    shapes = {}
                    for k in REQUIRED:
                        off, size = comps[k]
                        shapes[k] = npy_header(reader_at(fd, off), size, f"{at}: key {keys.name(k)!r}")[1]
                    lat, dino, t5 = (shapes[k] for k in REQUIRED)
                    if len(lat) == 3 and len(dino) == 1 and len(t5) == 2:
                        return {"latent_channels": lat[0], "dino_dim": dino[0], "t5_dim": t5[1]}
                except ShardError as e:
                    first = first or e
                if tried >= _DIM_PROBES:
                    break
        finally:
            os.close(fd)
        if tried >= _DIM_PROBES:
            break
    if first is not None:
        raise first
    raise ShardError(
        f"{shards[0] if shards else '?'}: cannot tell the latent channels and the DINO/T5 widths from the first "
        f"{tried} samples (their {', '.join(keys.name(k) for k in REQUIRED)} have unexpected ranks)",
        "shape",
    )


# ---------------------------------------------------------------------------------------------
# the entry point


def resolve(spec: str | Path, keys: Keys | None = None, t5_max_len: int | None = None) -> Layout:
    """Find the shards of ``spec`` and build the canonical manifest (see the module docstring)."""
    spec = str(spec)
    if keys is None:  # a reader given only the path: read it as the run that registered it does
        keys, registered_len = _OPTIONS.get(os.path.abspath(spec), (DEFAULT_KEYS, None))
        t5_max_len = t5_max_len or registered_len
    root, stated, kind, groups = _find_groups(spec)
    keys = _manifest_keys(stated, keys, root / MANIFEST)
    shards, listed, per_shard, members, problems = _read_groups(root, groups, keys)
    buckets = _bucket_entries(shards, per_shard, root, kind)
    total = sum(sum(per_shard[tar].values()) for tar in shards)  # what the tars hold, bucketed or not
    if "count" in stated and stated["count"] != total and not problems:
        problems.append(
            ShardError(
                f"{root / MANIFEST}: manifest says {stated['count']} samples, shards hold {total}", "count"
            )
        )
    where = root / MANIFEST
    dims = {k: _number(stated, k, where) for k in ("latent_channels", "dino_dim", "t5_dim") if stated.get(k)}
    if len(dims) < 3:
        dims = {**_dims_from_data(shards, members, keys), **dims}
    manifest = {
        **stated,
        "format": stated.get("format", FORMAT),
        "count": total,
        **dims,
        "t5_max_len": _number(stated, "t5_max_len", where) if stated.get("t5_max_len") else None,
        "buckets": {f"{h}x{w}": buckets[(h, w)] for h, w in sorted(buckets)},
        "layout": {"kind": kind, "path": spec},
    }
    limit, source = max_len_rule(t5_max_len, manifest)
    manifest["t5_limit"] = {"value": limit, "source": source}
    if keys.custom():
        manifest["keys"] = keys.custom()
    return Layout(spec, root, kind, manifest, shards, listed, problems, members)


def _find_groups(spec: str) -> tuple[Path, dict, str, list[tuple]]:
    """(root, the manifest's own fields, layout kind, groups of (label, declared bucket, stated count, tars))."""
    root, stated = Path(spec), {}
    if root.is_dir():
        if (root / MANIFEST).is_file():
            stated = _read_manifest(root / MANIFEST)
        if "buckets" in stated:
            return root, stated, "manifest", _groups_from_manifest(root, stated)
        return root, stated, *_groups_from_folders(root)
    tars = expand_spec(spec)
    root = Path(os.path.commonpath([str(t.parent.absolute()) for t in tars]))
    return root, stated, "list", [(spec, None, None, tars)]


def _read_groups(root: Path, groups: list[tuple], keys: Keys) -> tuple[list, dict, dict, dict, list]:
    """Every tar's headers read once: (shards in read order, buckets each is listed under, {bucket: samples} per
    tar, its members, problems); a group whose stated count differs from what its tars hold is a problem."""
    shards: list[Path] = []
    listed: dict[Path, set] = {}
    per_shard: dict[Path, dict] = {}  # tar -> {bucket: samples}
    members: dict[Path, list] = {}
    problems: list[ShardError] = []
    for label, declared, count, tars in groups:
        found = 0
        for tar in tars:
            if tar not in per_shard:
                shards.append(tar)
                members[tar] = tar_samples(tar)
                per_shard[tar] = _shard_buckets(tar, members[tar], declared, keys)
            listed.setdefault(tar, set()).update(b for b in per_shard[tar] if b is not None)
            found += sum(per_shard[tar].values())
        if count is not None and count != found:
            problems.append(
                ShardError(
                    f"{root / MANIFEST}: bucket {label!r}: manifest says {count} samples, shards hold {found}",
                    "count",
                )
            )
    return shards, listed, per_shard, members, problems


def _shard_buckets(tar: Path, members: list, declared: tuple[int, int] | None, keys: Keys) -> dict:
    """{bucket: samples} of one tar: all in its folder's bucket when one is declared, else each sample's own
    (None: a sample whose bucket cannot be told)."""
    if declared is not None:
        return {declared: len(members)}
    got: dict = {}
    for b in _scan_buckets(tar, members, keys):
        got[b] = got.get(b, 0) + 1
    return got


def _bucket_entries(
    shards: list[Path], per_shard: dict, root: Path, kind: str
) -> dict[tuple[int, int], dict]:
    """The manifest's bucket entries: samples and shards (relative to root; absolute for a list of tars)."""
    buckets: dict[tuple[int, int], dict] = {}
    for tar in shards:
        for b, n in per_shard[tar].items():
            if b is None:
                continue
            entry = buckets.setdefault(b, {"count": 0, "shards": []})
            entry["count"] += n
            entry["shards"].append(_rel(tar, root) if kind != "list" else str(tar.absolute()))
    return buckets


def _manifest_keys(stated: dict, keys: Keys, where: Path) -> Keys:
    """A manifest may record its own key map (``"keys": {"latent": "lat.npy"}``); it applies when the config
    names none (``data.keys`` wins)."""
    if "keys" not in stated:
        return keys
    try:
        own = Keys.from_fields(stated["keys"], "keys")
    except ShardError as e:
        raise ShardError(f"{where}: {e}", "manifest") from None
    return own if keys == DEFAULT_KEYS else keys


def _number(stated: dict, key: str, where: Path) -> int:
    v = stated[key]
    if isinstance(v, bool) or not isinstance(v, (int, float, str)) or not str(v).isdigit() or int(v) <= 0:
        raise ShardError(f"{where}: {key} {v!r} is not a positive whole number", "manifest")
    return int(v)


def _rel(tar: Path, root: Path) -> str:
    try:
        return str(tar.relative_to(root))
    except ValueError:
        return str(tar.absolute())


def load_manifest(root: str | Path, keys: Keys | None = None) -> dict:
    """The canonical manifest of a ``data.path`` (see the module docstring)."""
    return resolve(root, keys).manifest


def shard_paths(root: str | Path, manifest: dict) -> dict[tuple[int, int], list[Path]]:
    """{bucket: its shards} of a canonical manifest (a tar holding several buckets is listed under each)."""
    out = {}
    for name, entry in manifest["buckets"].items():
        h, w = parse_bucket(name)
        paths = [
            Path(root) / s for s in entry["shards"]
        ]  # absolute entries (a list of tars) stay as they are
        for p in paths:
            if not p.is_file():
                raise ShardError(
                    f"{Path(root) / MANIFEST}: bucket {name}: shard {p} does not exist", "manifest"
                )
        out[(h, w)] = paths
    return out
