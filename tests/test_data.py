"""Shards and loader semantics: schema round trip, checker, bucket batching, flip, CFG dropout, padding."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import write_random_shards

from nanodit.config import load_config
from nanodit.data import build_loader, data_root, synthetic_dir
from nanodit.data.__main__ import main as data_main
from nanodit.data.layout import load_manifest
from nanodit.data.loader import MemoryLoader, Semantics, cfg_decision, epoch_schedule, flip_decision
from nanodit.data.prepare import prepare
from nanodit.data.shards import ShardError, ShardWriter, check_dir, read_all
from nanodit.shapes import make_dataset


def test_roundtrip(tmp_path):
    manifest = write_random_shards(tmp_path, n=10)
    m, groups, skipped = read_all(tmp_path)
    assert m["count"] == 10 and not skipped
    assert sorted(groups) == [(6, 10), (8, 8)] and sum(len(g) for g in groups.values()) == 10
    s = groups[(8, 8)][0]
    assert s.latent.dtype == np.float16 and s.latent.shape == (16, 8, 8)
    assert s.t5.shape[1] == 48 and s.has_flip and "right" in s.flip_txt
    assert manifest["t5_max_len"] >= s.t5.shape[0]


def test_check_cli_counts_and_ok(tmp_path, capsys):
    write_random_shards(tmp_path, n=10)
    assert data_main(["check", f"data.path={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "8x8: 5" in out and "6x10: 5" in out and "ok" in out


def test_synth_cli_takes_config_keys_and_writes_where_training_reads(tmp_path, capsys):
    """``synth`` with ``key=value`` settings: without data.path it writes the built-in set where a run with the same
    settings reads it (data_root), with data.path into that folder; the set is make_dataset's, byte for byte."""
    over = [f"data.cache_dir={tmp_path / 'cache'}", "data.synth_samples=8", "data.synth_size=16"]
    assert data_main(["synth", *over, "data.synth_seed=3"]) == 0
    cfg = load_config(None, [*over, "data.synth_seed=3"])
    root = data_root(cfg)
    assert root == synthetic_dir(cfg) and f"wrote 8 samples to {root}" in capsys.readouterr().out
    assert data_main(["synth", "--config", "smoke", f"data.path={tmp_path / 'mine'}", *over[1:]]) == 0
    make_dataset(tmp_path / "ref", samples=8, seed=3, size=16)
    for got in (root, tmp_path / "mine"):
        assert load_manifest(got)["count"] == 8
    files = {
        d: sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file()) for d in (root, tmp_path / "ref")
    }
    assert files[root] == files[tmp_path / "ref"] != []
    assert all((root / p).read_bytes() == (tmp_path / "ref" / p).read_bytes() for p in files[root])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["synth", "data.synth_samples=0"], "error: config: data.synth_samples=0 must be > 0"),
        (["synth", "data.synth_size=10"], "error: config: data.synth_size=10 must be >= 16"),
        (["synth", "train.steps=3"], "only data.* settings apply to a data command"),
        (["check", "shards/"], "'shards/' is not of the form key=value (a data folder is data.path=shards/)"),
        (["check", "data.t5_max_len=0"], "error: config: data.t5_max_len=0 must be > 0"),
    ],
)
def test_data_cli_mistakes_are_one_line_errors(argv, message, capsys):
    """A bad setting is exit 2 with one line naming it, before anything is read or written."""
    assert data_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, options",
    [
        (["-h"], ["synth", "check"]),
        (
            ["synth", "-h"],
            ["--config", "data.path", "data.cache_dir", "data.synth_samples", "data.synth_seed"],
        ),
        (["check", "-h"], ["--config", "--show", "--no-stamp", "--no-progress", "data.path", "data.keys"]),
    ],
)
def test_data_cli_help_documents_every_option(argv, options, capsys):
    """``-h`` of the tool and of each subcommand names every option and the data.* keys it takes."""
    with pytest.raises(SystemExit) as e:
        data_main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(o in out for o in options), out


def test_prepare_writes_the_builtin_set_and_loading_only_reads(tmp_path):
    """With data.path null, data_root and build_loader read only (a one-line error naming the folder while the set
    is not written); prepare writes it once and returns the root; a given data.path is never written."""
    cfg = load_config("smoke", [f"data.cache_dir={tmp_path / 'cache'}", "data.synth_samples=4"])
    with pytest.raises(ShardError, match="holds none: write it first") as e:
        build_loader(cfg, torch.device("cpu"))
    assert str(synthetic_dir(cfg)) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()
    root = prepare(cfg)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert root == synthetic_dir(cfg) and prepare(cfg) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp  # written once
    manifest, loader = build_loader(cfg, torch.device("cpu"))
    assert manifest["count"] == 4 and loader.root == root
    write_random_shards(tmp_path / "given", n=4)
    before = sorted((tmp_path / "given").rglob("*"))
    given = load_config("smoke", [f"data.path={tmp_path / 'given'}"])
    assert prepare(given) == tmp_path / "given" and sorted((tmp_path / "given").rglob("*")) == before


def _rewrite_one(path: Path, key: str, change):
    """Rewrite the first sample of a tar with field ``key`` changed (None removes it)."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    first = members[0][0].name.split(".")[0]
    with tarfile.open(path, "w") as tf:
        for m, data in members:
            if m.name == f"{first}.{key}":
                data = change(data)
                if data is None:
                    continue
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return first


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize(
    "key, change, expect",
    [
        ("latent.npy", lambda b: None, "missing key 'latent.npy'"),
        ("latent.npy", lambda b: _npy(np.zeros((16, 3, 3), np.float16)), "expected (16, 8, 8)"),
        ("dino.npy", lambda b: _npy(np.zeros(32, np.int32)), "dtype int32"),
        ("t5.npy", lambda b: _npy(np.full((2, 48), np.nan, np.float16)), "NaN"),
        ("t5_flip.npy", lambda b: None, "flip keys come together"),
        ("json", lambda b: b"{not json", "key 'json'"),
    ],
)
def test_checker_names_shard_sample_and_key(tmp_path, key, change, expect):
    write_random_shards(tmp_path, n=8)
    shard = tmp_path / "bucket_8x8" / "shard-00000.tar"
    sample = _rewrite_one(shard, key, change)
    counts, problem = check_dir(tmp_path)
    assert problem is not None and expect in problem
    assert str(shard) in problem and sample in problem
    with pytest.raises(ShardError):
        read_all(tmp_path)
    # on_error=skip drops and counts the broken sample
    _, groups, skipped = read_all(tmp_path, on_error="skip")
    assert len(skipped) == 1 and sum(len(g) for g in groups.values()) == 7


def test_pickles_are_refused(tmp_path):
    w = ShardWriter(tmp_path)
    w.write(
        {
            "__key__": "a",
            "latent": np.zeros((16, 4, 4)),
            "dino": np.ones(8),
            "t5": np.ones((2, 8)),
            "txt": "x",
            "json": {"bucket": [4, 4], "id": "a"},
        }
    )
    w.close()
    shard = tmp_path / "bucket_4x4" / "shard-00000.tar"
    with tarfile.open(shard, "a") as tf:
        info = tarfile.TarInfo("a.weights.pth")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    _, problem = check_dir(tmp_path)
    assert "pickled" in problem and "a.weights.pth".split(".", 1)[1] in problem


def test_padded_t5_with_mask_is_accepted(tmp_path):
    t5 = np.random.randn(6, 8).astype(np.float16)
    mask = np.array([1, 1, 1, 0, 0, 0], np.int64)
    w = ShardWriter(tmp_path)
    w.write(
        {
            "__key__": "a",
            "latent": np.zeros((16, 4, 4)),
            "dino": np.ones(8),
            "t5": t5,
            "t5_mask": mask,
            "txt": "x",
            "json": {"bucket": [4, 4], "id": "a"},
        }
    )
    w.close()
    _, groups, _ = read_all(tmp_path)
    np.testing.assert_array_equal(groups[(4, 4)][0].t5, t5[:3])


def test_missing_manifest_is_one_line(tmp_path):
    with pytest.raises(ShardError, match="no manifest.json"):
        read_all(tmp_path)


def sem(**kw):
    base = dict(
        batch_size=4, seed=0, shuffle=True, flip=True, p_drop_both=0.1, p_drop_text=0.1, p_drop_dino=0.1
    )
    base.update(kw)
    return Semantics(**base)


def test_schedule_is_a_permutation_with_one_bucket_per_batch():
    counts = {(8, 8): 10, (6, 10): 7, (10, 6): 4}
    seen_orders = []
    for epoch in range(3):
        batches = epoch_schedule(counts, sem(), epoch)
        per_bucket = Counter()
        for bucket, idx in batches:
            assert len(idx) <= 4 and len(set(idx)) == len(idx)
            per_bucket.update((bucket, i) for i in idx)
        assert len(per_bucket) == 21 and max(per_bucket.values()) == 1  # every sample exactly once
        seen_orders.append([(b, tuple(i)) for b, i in batches])
    assert seen_orders[0] != seen_orders[1] != seen_orders[2]
    dropped = epoch_schedule(counts, sem(last_batch="drop"), 0)
    assert all(len(i) == 4 for _, i in dropped) and len(dropped) == 2 + 1 + 1
    plain = epoch_schedule(counts, sem(shuffle=False), 5)
    assert plain[0] == ((6, 10), [0, 1, 2, 3])


def test_flip_and_cfg_draws_are_stable_and_have_the_right_rates():
    ids = [f"id{i}" for i in range(20000)]
    flips = np.mean([flip_decision(i, 0, 3) for i in ids])
    assert 0.48 < flips < 0.52
    draws = Counter(cfg_decision(i, 0, 3, 0.1, 0.1, 0.1) for i in ids)
    rates = {k: v / len(ids) for k, v in draws.items()}
    assert abs(rates[(True, True)] - 0.1) < 0.01 and abs(rates[(True, False)] - 0.1) < 0.01
    assert abs(rates[(False, True)] - 0.1) < 0.01 and abs(rates[(False, False)] - 0.7) < 0.015
    assert flip_decision("x", 1, 2) == flip_decision("x", 1, 2)
    assert [flip_decision("x", 1, e) for e in range(16)] != [flip_decision("x", 1, 0)] * 16


def test_batches_pad_mask_and_flip(tmp_path):
    write_random_shards(tmp_path, n=12)
    _, groups, _ = read_all(tmp_path)
    loader = MemoryLoader(groups, sem(pad_multiple=8))
    by_id = {s.id: s for g in groups.values() for s in g}
    for _ in range(12):
        b = next(loader)
        B, L = b.t5_mask.shape
        assert L % 8 == 0 and b.t5.shape == (B, L, 48)
        lens = b.t5_mask.sum(1)
        for i, sid in enumerate(b.ids):
            s = by_id[sid]
            src = s.t5_flip if b.flipped[i] else s.t5
            lat = s.latent_flip if b.flipped[i] else s.latent
            assert lens[i] == src.shape[0] and b.t5_mask[i, : lens[i]].all()
            assert torch.equal(b.t5[i, : lens[i]], torch.from_numpy(src))
            assert torch.count_nonzero(b.t5[i, lens[i] :]) == 0  # padding is exactly zero
            assert torch.equal(b.latent[i], torch.from_numpy(lat))
            assert b.captions[i] == (s.flip_txt if b.flipped[i] else s.txt)


def test_loader_state_resumes_the_stream(tmp_path):
    write_random_shards(tmp_path, n=12)
    _, groups, _ = read_all(tmp_path)
    a = MemoryLoader(groups, sem())
    for _ in range(5):
        next(a)
    state = a.state_dict()
    expect = [next(a) for _ in range(7)]
    b = MemoryLoader(groups, sem())
    b.load_state_dict(state)
    for e in expect:
        got = next(b)
        assert got.ids == e.ids and torch.equal(got.t5, e.t5) and torch.equal(got.drop_text, e.drop_text)
