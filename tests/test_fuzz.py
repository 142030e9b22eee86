"""Fuzzing (hypothesis): the shard readers and the config loader on inputs nobody would write on purpose.

Shards: tars of samples whose every member may be valid, missing, of another dtype or shape, NaN/Inf, truncated,
pickled, garbage, not UTF-8 or an unexpected extra. Both readers (the decode path and the index the loaders
use) raise nothing but ShardError, agree on every sample (the same accepted samples in the same order, the same
one-line message for every rejected one) and read the same bytes. Config: dotlist overrides and YAML files of
any content give a Config or a one-line ConfigError. Bounded to well under a minute together on 2 CPU cores.

The default run is derandomized (the same examples every time), so the suite cannot go red on one machine and
green on the next; NANODIT_FUZZ_EXAMPLES=N runs N times the budget with fresh random examples, the way to hunt
for new failures (each one found becomes a fixed case below or in test_layouts.py).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanodit.config import Config, ConfigError, from_dict, load_config, to_dict
from nanodit.data.index import build_index, read_samples
from nanodit.data.schema import ShardError
from nanodit.data.shards import read_all

SCALE = int(os.environ.get("NANODIT_FUZZ_EXAMPLES", "0")) or 1
FUZZ = settings(
    max_examples=150 * SCALE,
    derandomize="NANODIT_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
C, DD, DT = 16, 8, 8


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def valid_sample(h: int = 4, w: int = 4, L: int = 3) -> dict[str, bytes]:
    rng = np.random.default_rng(h * 100 + w * 10 + L)
    return {
        "latent.npy": npy(rng.standard_normal((C, h, w)).astype(np.float16)),
        "dino.npy": npy(rng.standard_normal(DD).astype(np.float16)),
        "t5.npy": npy(rng.standard_normal((L, DT)).astype(np.float16)),
        "txt": b"a caption",
        "json": json.dumps({"bucket": [h, w], "id": f"ok{h}{w}{L}"}).encode(),
    }


def array_member(kind: str):
    """Bytes for an array member: mostly plausible, often subtly or grossly wrong."""
    expect = {"latent": (C, 4, 4), "dino": (DD,), "t5": (3, DT)}[kind]
    shapes = st.sampled_from([expect, (C, 4, 6), (C, 4), (DD + 1,), (0, DT), (600, DT), (3, DT + 1), ()])
    dtypes = st.sampled_from([np.float16, np.float16, np.float32, np.float64, np.int32, np.bool_])
    poison = st.sampled_from([None, None, np.nan, np.inf, -np.inf])

    @st.composite
    def build(draw):
        shape, dtype, bad = draw(shapes), draw(dtypes), draw(poison)
        a = np.ones(shape, dtype=dtype)
        if bad is not None and a.size and np.issubdtype(dtype, np.floating):
            a.reshape(-1)[draw(st.integers(0, a.size - 1))] = bad
        raw = npy(a)
        how = draw(st.sampled_from(["ok", "ok", "ok", "truncate", "garbage", "object", "fortran"]))
        if how == "truncate":
            return raw[: draw(st.integers(0, len(raw) - 1))]
        if how == "garbage":
            return draw(st.binary(max_size=64))
        if how == "object":
            return npy(np.array([{"x": 1}], dtype=object))
        if how == "fortran" and a.ndim > 1:
            return npy(np.asfortranarray(np.ones(shape[::-1], dtype).T))
        return raw

    return build()


def mask_member():
    return st.one_of(
        st.lists(st.booleans(), min_size=0, max_size=6).map(lambda v: npy(np.array(v, dtype=bool))),
        st.integers(0, 3).map(lambda n: npy((np.arange(3) < n).astype(np.int64))),
        st.just(npy(np.array([0.5, 1.0, 0.0]))),
        st.binary(max_size=16),
    )


def json_member():
    return st.one_of(
        st.just(json.dumps({"bucket": [4, 4], "id": "dup"}).encode()),
        st.builds(lambda i: json.dumps({"bucket": [4, 4], "id": f"id{i}"}).encode(), st.integers(0, 99)),
        st.just(json.dumps({"bucket": [4, 6]}).encode()),
        st.just(json.dumps({"bucket": "4x4"}).encode()),
        st.just(json.dumps({"bucket": "four"}).encode()),
        st.just(b"[1, 2]"),
        st.binary(max_size=24),
    )


@st.composite
def fuzzed_sample(draw) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for kind in ("latent", "dino", "t5"):
        if draw(st.integers(0, 9)):  # a key goes missing one time in ten
            members[f"{kind}.npy"] = draw(array_member(kind))
    flips = draw(st.sampled_from(["none", "all", "some"]))
    for kind in ("latent", "dino", "t5"):
        if flips == "all" or (flips == "some" and draw(st.booleans())):
            members[f"{kind}_flip.npy"] = draw(array_member(kind))
    if draw(st.booleans()):
        members["t5_mask.npy"] = draw(mask_member())
    if draw(st.booleans()):
        members["txt"] = draw(st.one_of(st.text(max_size=20).map(str.encode), st.binary(max_size=12)))
    if draw(st.booleans()):
        members["flip.txt"] = draw(st.binary(max_size=12))
    if draw(st.integers(0, 3)):
        members["json"] = draw(json_member())
    if not draw(st.integers(0, 9)):
        members[draw(st.sampled_from(["weights.pth", "extra.bin", "meta.pkl"]))] = b"\x80\x04junk"
    return members


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"k{i:03d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def by_bucket(groups: dict) -> dict:
    return {
        b: [(s.id, s.latent.tobytes(), s.dino.tobytes(), s.t5.tobytes(), s.txt, s.flip_txt) for s in g]
        for b, g in groups.items()
    }


@FUZZ
@given(st.lists(fuzzed_sample(), min_size=1, max_size=4))
def test_both_shard_readers_agree_on_anything(samples):
    """A valid first sample (so the dims are known), then the fuzzed ones, in a flat folder."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_tar(root / "a.tar", [valid_sample(), *samples])
        try:
            _, groups, skipped = read_all(root, on_error="skip")
        except ShardError as e:  # a data-set level problem: the index must say the same
            msg = str(e)
            assert "\n" not in msg
            try:
                build_index(root, "skip", values=True, streaming=False)
            except ShardError as e2:
                assert str(e2) == msg
            else:
                raise AssertionError(f"only the decode path failed: {msg}") from None
            return
        index = build_index(root, "skip", values=True, streaming=False)
        assert [(e.reason, str(e)) for e in index.skipped] == [(e.reason, str(e)) for e in skipped]
        assert by_bucket(read_samples(index)) == by_bucket(groups)
        for e in skipped:
            assert "\n" not in str(e) and str(e).startswith(str(root / "a.tar"))
        first = skipped[0] if skipped else None
        for reader in (lambda: read_all(root), lambda: build_index(root, values=True, streaming=False)):
            try:
                reader()
                assert first is None
            except ShardError as e:
                assert first is not None and str(e) == str(first)


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
MANIFESTS = st.fixed_dictionaries(
    {},
    optional={
        "buckets": st.one_of(
            JSONISH,
            st.dictionaries(
                st.sampled_from(["bucket-4x4", "4x4", "bucket-9x9", "nope"]), JSONISH, max_size=2
            ),
            st.just({"bucket-4x4": 3}),
            st.just({"4x4": {"count": 3, "shards": ["bucket-4x4/part-0.tar"]}}),
        ),
        "count": JSONISH,
        "dino_dim": JSONISH,
        "t5_dim": JSONISH,
        "latent_channels": JSONISH,
        "t5_max_len": JSONISH,
        "keys": st.one_of(
            JSONISH,
            st.dictionaries(st.sampled_from(["latent", "dino", "t5", "nope"]), JSONISH, max_size=2),
            st.just({"latent": "lat.npy"}),
        ),
    },
)


@FUZZ
@given(st.one_of(MANIFESTS, JSONISH))
def test_any_manifest_resolves_or_is_one_line(manifest):
    """Three valid samples in bucket-4x4/, beside a manifest.json of any content: either the layout resolves
    and the index reads it, or a one-line ShardError says what is wrong."""
    from nanodit.data.layout import resolve

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "bucket-4x4").mkdir()
        write_tar(root / "bucket-4x4" / "part-0.tar", [valid_sample(L=n) for n in (1, 2, 3)])
        (root / "manifest.json").write_text(json.dumps(manifest))
        try:
            layout = resolve(root)
            index = build_index(layout, "skip")
        except ShardError as e:
            assert "\n" not in str(e)
            return
        assert sum(index.counts.values()) + len(index.skipped) <= 3


KEYS = sorted(k for k in __import__("nanodit.resume", fromlist=["_flat"])._flat(to_dict(Config())))
VALUES = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["true", "false", "null", "none", "auto", "[1, 2]", "[]", "{a: 1}", "${foo}", "${oc.env:NOPE}", ""]
    ),
    st.text(max_size=12),
)


@FUZZ
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), VALUES), max_size=5))
def test_config_overrides_give_a_config_or_one_line(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = load_config("smoke", overrides)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("config:")
        return
    assert from_dict(to_dict(cfg)) == cfg  # what a checkpoint stores loads back


@FUZZ
@given(st.text(max_size=200))
def test_config_files_of_any_content_give_a_config_or_one_line(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text)
        try:
            load_config(path)
        except ConfigError as e:
            assert "\n" not in str(e)
