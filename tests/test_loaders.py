"""Loader backends: every backend yields MemoryLoader's batches bit for bit, in every rank, across epochs and
resumes; the sample index agrees with the reader; schema errors surface with shard, sample and key.

Backends under test on CPU: gpu-cache (CPU tensors), webdataset (DataLoader with 2 workers), dali (the CPU
pipeline, ``device_id=None``; skipped with a reason when DALI is not installed).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from fakedata import write_random_shards

from nanodit.data import build_loader
from nanodit.data.batch import Batch, make_batch
from nanodit.data.dali_loader import DaliLoader, dali_available
from nanodit.data.gpu_cache import GpuCacheLoader, cache_bytes
from nanodit.data.index import build_index, group_members, index_path, read_wds_index, scan_tar
from nanodit.data.loader import MemoryLoader, Semantics, epoch_schedule, pad_packed
from nanodit.data.shards import ShardError, ShardWriter, read_all
from nanodit.data.wds_loader import SlotRing, WebDatasetLoader, finite, max_batch_rows

NO_DALI = "NVIDIA DALI is not installed (pip install nvidia-dali-cuda130 to run the DALI CPU pipeline)"
BATCH_FIELDS = [f.name for f in dataclasses.fields(Batch)]
BACKENDS = [
    "gpu-cache",
    "webdataset",
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason=NO_DALI)),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """22 samples in 2 buckets (11 each, 3 shards per bucket: reads cross shards inside batches)."""
    root = tmp_path_factory.mktemp("shards")
    write_random_shards(root, n=22, max_len=13)
    _, groups, _ = read_all(root)
    return root, groups, build_index(root)


def sem(**kw) -> Semantics:
    base = dict(batch_size=4, seed=7, shuffle=True, flip=True, pad_multiple=8)
    base.update(kw)
    return Semantics(**base)


def make(kind: str, shards, s: Semantics, device: str = "cpu"):
    _, groups, index = shards
    if kind == "memory":
        return MemoryLoader(groups, s, device)
    if kind == "gpu-cache":
        return GpuCacheLoader(groups, s, device)
    if kind == "webdataset":
        return WebDatasetLoader(index, s, device, num_workers=2, prefetch=2)
    return DaliLoader(index, s, device, threads=2, chunk_samples=10)  # small chunks: rebuilt every epoch


def assert_same_batch(got: Batch, want: Batch, where: str) -> None:
    assert type(got) is type(want) is Batch, where
    for k in BATCH_FIELDS:
        a, b = getattr(got, k), getattr(want, k)
        if torch.is_tensor(b):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {k} {a.dtype}{tuple(a.shape)}"
            assert torch.equal(a, b), f"{where}: {k} differs"
            if b.is_floating_point():  # bitwise: also the sign of zeros
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{where}: {k} bits differ"
        else:
            assert a == b, f"{where}: {k}: {a} != {b}"


def test_make_batch_reads_the_flag_rows_and_to_moves_only_tensors():
    """make_batch takes (3, B) flags, bool or 0/1 integers, as the rows flipped, drop_text, drop_dino;
    Batch.to moves every tensor and keeps ids, captions and the epoch."""
    half = dict(dtype=torch.float16)
    flags = torch.tensor([[1, 0], [0, 1], [1, 1]])  # (3, B) int64, as gpu-cache and dali upload them
    b = make_batch(
        torch.zeros(2, 16, 4, 4, **half),
        torch.zeros(2, 8, **half),
        torch.zeros(2, 8, 4, **half),
        torch.ones(2, 8, dtype=torch.bool),
        flags,
        ["a", "b"],
        ["x", "y"],
        3,
    )
    assert [b.flipped.tolist(), b.drop_text.tolist(), b.drop_dino.tolist()] == flags.bool().tolist()
    assert b.flipped.dtype == b.drop_text.dtype == b.drop_dino.dtype == torch.bool
    moved = b.to(torch.device("meta"))
    tensors = [k for k in BATCH_FIELDS if torch.is_tensor(getattr(b, k))]
    assert len(tensors) == 7 and all(getattr(moved, k).is_meta for k in tensors) and not b.latent.is_meta
    assert (moved.ids, moved.captions, moved.epoch) == (["a", "b"], ["x", "y"], 3)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_batch_equals_the_memory_loader(shards, kind, world, shuffle):
    """2 epochs, every rank: every field of every batch is bitwise MemoryLoader's."""
    for rank in range(world):
        s = sem(shuffle=shuffle, rank=rank, world_size=world)
        ref, loader = make("memory", shards, s), make(kind, shards, s)
        assert loader.batches_per_epoch == ref.batches_per_epoch
        try:
            for step in range(2 * ref.batches_per_epoch):
                assert_same_batch(next(loader), next(ref), f"{kind} rank {rank}/{world} step {step}")
            assert loader.state_dict() == ref.state_dict() == {"epoch": 1, "index": ref.batches_per_epoch}
        finally:
            loader.close()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("world", [1, 2])
def test_cuda_batches_equal_the_memory_loader(shards, kind, world):
    """On the GPU: the device-resident cache, webdataset through pinned memory and padding on the device, DALI's
    GPU pipeline (.gpu() then fn.pad): every field of every batch is MemoryLoader's, on the device."""
    for rank in range(world):
        s = sem(rank=rank, world_size=world)
        ref, loader = make("memory", shards, s, "cuda"), make(kind, shards, s, "cuda")
        try:
            for step in range(2 * ref.batches_per_epoch):
                got, want = next(loader), next(ref)
                assert all(getattr(got, k).is_cuda for k in BATCH_FIELDS if torch.is_tensor(getattr(got, k)))
                assert_same_batch(got, want, f"cuda {kind} rank {rank}/{world} step {step}")
        finally:
            loader.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_last_batch_drop_and_no_flips(tmp_path, kind):
    """Other semantics switches go through every backend too: dropped remainders, a set without flips."""
    write_random_shards(tmp_path, n=13, flip=False, max_len=20)
    _, groups, _ = read_all(tmp_path)
    data = (tmp_path, groups, build_index(tmp_path))
    s = sem(last_batch="drop", batch_size=3, pad_multiple=4)
    ref, loader = make("memory", data, s), make(kind, data, s)
    try:
        for step in range(2 * ref.batches_per_epoch):
            b = next(ref)
            assert len(b.ids) == 3 and not b.flipped.any()
            assert_same_batch(next(loader), b, f"{kind} step {step}")
    finally:
        loader.close()


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("world", [1, 2])
def test_shuffled_stream_properties(shards, kind, world):
    """Shuffled, per epoch: one bucket per batch, no sample twice (within a rank or across ranks), the order
    changes between epochs, equal steps and the same bucket at every step on every rank, padding exactly zero."""
    root, groups, _ = shards
    bucket_of = {s.id: b for b, g in groups.items() for s in g}
    streams = []
    for rank in range(world):
        loader = make(kind, shards, sem(rank=rank, world_size=world))
        try:
            streams.append([next(loader) for _ in range(2 * loader.batches_per_epoch)])
        finally:
            loader.close()
    assert len({len(st) for st in streams}) == 1  # equal steps per rank
    for step in range(len(streams[0])):
        buckets = {tuple(st[step].latent.shape[2:]) for st in streams}
        assert len(buckets) == 1  # the same bucket on every rank at every step
    per_epoch = len(streams[0]) // 2
    orders = []
    for epoch in range(2):
        seen = Counter()
        for st in streams:
            for b in st[epoch * per_epoch : (epoch + 1) * per_epoch]:
                assert b.epoch == epoch
                assert len({bucket_of[i] for i in b.ids}) == 1  # no bucket mixing
                assert tuple(b.latent.shape[2:]) == bucket_of[b.ids[0]]
                seen.update(b.ids)
                B, L = b.t5_mask.shape
                lens = b.t5_mask.sum(1)
                assert L % 8 == 0 and L - 8 < int(lens.max()) <= L
                for i in range(B):
                    assert b.t5_mask[i, : lens[i]].all()
                    assert torch.count_nonzero(b.t5[i, lens[i] :]) == 0  # padding exactly zero
                    assert not (b.t5[i, lens[i] :].view(torch.int16)).any()  # not even -0.0
        assert max(seen.values()) == 1  # no repeat within an epoch, across all ranks
        if world == 1:
            assert len(seen) == len(bucket_of)  # partial last batches: every sample, every epoch
        orders.append([tuple(b.ids) for b in streams[0][epoch * per_epoch : (epoch + 1) * per_epoch]])
    assert orders[0] != orders[1]  # the order changes across epochs


@pytest.mark.parametrize("kind", BACKENDS)
def test_resume_mid_epoch_reproduces_the_stream(shards, kind):
    """Stop mid-epoch, save the state, load it into a fresh loader: the next batches (into the next epoch)
    are the uninterrupted run's; a state from another backend works the same."""
    s = sem()
    a = make(kind, shards, s)
    try:
        for _ in range(3):
            next(a)
        state = a.state_dict()
        assert state == {"epoch": 0, "index": 3}
        expect = [next(a) for _ in range(a.batches_per_epoch)]  # crosses into epoch 1
    finally:
        a.close()
    for target in (kind, "memory"):  # the state means the same to every backend
        b = make(target, shards, s)
        try:
            next(b)  # a loader that already read ahead must drop what it read
            b.load_state_dict(state)
            for step, e in enumerate(expect):
                assert_same_batch(next(b), e, f"{target} resumed from {kind}, step {step}")
        finally:
            b.close()


def test_schedule_with_ranks_splits_buckets_into_blocks():
    """Rank r owns the block [r*n/W, (r+1)*n/W) of each bucket; all ranks keep the smallest block's batch count."""
    counts = {(8, 8): 11, (6, 10): 5, (4, 4): 1}
    for epoch in range(3):
        per_rank = [epoch_schedule(counts, sem(rank=r, world_size=3), epoch) for r in range(3)]
        assert len({len(b) for b in per_rank}) == 1
        assert len({tuple(b for b, _ in batches) for batches in per_rank}) == 1  # same buckets, same order
        for r, batches in enumerate(per_rank):
            for bucket, idx in batches:
                n = counts[bucket]
                assert all(r * n // 3 <= i < (r + 1) * n // 3 for i in idx)
        assert all(b != (4, 4) for b, _ in per_rank[0])  # a bucket smaller than the world is skipped by all
    one = epoch_schedule(counts, sem(), 2)
    assert one == epoch_schedule(counts, sem(rank=0, world_size=1), 2)


def test_pad_packed_matches_padding_on_the_host():
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([3, 1, 7, 5])
    rows = [torch.randn(int(n), 6, generator=g).half() for n in lens]
    t5, mask = pad_packed(torch.cat(rows), lens, 8)
    assert t5.shape == (4, 8, 6) and mask.shape == (4, 8)
    for i, r in enumerate(rows):
        assert torch.equal(t5[i, : len(r)], r) and not t5[i, len(r) :].any()
        assert mask[i].tolist() == [j < len(r) for j in range(8)]


def test_writer_index_files_are_dali_format_and_match_the_tar(shards):
    root, groups, index = shards
    tars = sorted(root.glob("bucket_*/shard-*.tar"))
    assert tars and all(index_path(t).is_file() for t in tars)
    for t in tars:
        assert read_wds_index(index_path(t)) == group_members(scan_tar(t))
        head = index_path(t).read_text().splitlines()[0].split()
        assert head[0] == "v1.2" and int(head[1]) == len(read_wds_index(index_path(t)))
    assert index.counts == {b: len(g) for b, g in groups.items()}
    for b, g in groups.items():
        assert index.buckets[b].ids == [s.id for s in g]  # same positions as read_all
        lens = index.buckets[b].t5_len
        assert lens[:, 0].tolist() == [s.t5.shape[0] for s in g]
        assert lens[:, 1].tolist() == [s.t5_flip.shape[0] for s in g]


def test_stale_index_file_is_ignored(tmp_path):
    write_random_shards(tmp_path, n=8)
    tar = tmp_path / "bucket_8x8" / "shard-00000.tar"
    index_path(tar).write_text("v1.2 1\nlatent.npy 512 3 junk\n")
    os.utime(index_path(tar), ns=(1, 1))  # older than the tar: a scan of the tar is used instead
    _, groups, _ = read_all(tmp_path)
    assert build_index(tmp_path).buckets[(8, 8)].ids == [s.id for s in groups[(8, 8)]]


def test_padded_t5_with_mask_streams_like_the_reference(tmp_path):
    """Shards with padded T5 + mask: streaming backends cut to the valid prefix and zero the rest, as read_all."""
    rng = np.random.default_rng(0)
    w = ShardWriter(tmp_path, samples_per_shard=3)
    for i in range(7):
        n = int(rng.integers(1, 10))
        mask = np.arange(12) < n
        w.write(
            {
                "__key__": f"k{i}",
                "latent": rng.standard_normal((16, 4, 4)).astype(np.float16),
                "dino": rng.standard_normal(8).astype(np.float16),
                "t5": rng.standard_normal((12, 8)).astype(np.float16),
                "t5_mask": mask.astype(np.int64),
                "latent_flip": rng.standard_normal((16, 4, 4)).astype(np.float16),
                "dino_flip": rng.standard_normal(8).astype(np.float16),
                "t5_flip": rng.standard_normal((12, 8)).astype(np.float16),
                "flip.txt": "b",
                "txt": "a",
                "json": {"bucket": [4, 4], "id": f"k{i}"},
            }
        )
    w.close()
    _, groups, _ = read_all(tmp_path)
    index = build_index(tmp_path)
    assert index.padded_t5 and index.buckets[(4, 4)].t5_rows.max() == 12
    data = (tmp_path, groups, index)
    s = sem(batch_size=3, pad_multiple=4)
    kinds = ["gpu-cache", "webdataset"] + (["dali"] if dali_available() else [])
    for kind in kinds:
        ref, loader = make("memory", data, s), make(kind, data, s)
        try:
            for step in range(2 * ref.batches_per_epoch):
                assert_same_batch(next(loader), next(ref), f"{kind} step {step}")
        finally:
            loader.close()


def _rewrite_member(tar, suffix: str, data: bytes | None):
    """Replace (or with None remove) the first member ending in ``suffix``; the index file goes stale."""
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    done = False
    with tarfile.open(tar, "w") as tf:
        for m, raw in members:
            if not done and m.name.endswith(suffix):
                done = True
                if data is None:
                    continue
                raw, m.size = data, len(data)
            tf.addfile(m, io.BytesIO(raw))
    index_path(tar).unlink()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize(
    "suffix, data, expect",
    [
        (".latent.npy", None, "missing key 'latent.npy'"),
        (".dino.npy", _npy(np.zeros(32, np.float32)), "dtype float32; the streaming loaders"),
        (".t5.npy", _npy(np.zeros((3, 47), np.float16)), "expected (L, 48)"),
        (".latent.npy", b"\x80\x04junk-pickle", "not a readable .npy"),
        (
            ".json",
            json.dumps({"bucket": [6, 10], "id": "x"}).encode(),
            "json bucket [6, 10] but shard is in (8, 8)",
        ),
    ],
)
def test_index_names_shard_sample_and_key(tmp_path, suffix, data, expect):
    write_random_shards(tmp_path, n=8)
    tar = tmp_path / "bucket_8x8" / "shard-00000.tar"
    _rewrite_member(tar, suffix, data)
    with pytest.raises(ShardError) as err:
        build_index(tmp_path)
    assert expect in str(err.value) and str(tar) in str(err.value) and "\n" not in str(err.value)
    index = build_index(tmp_path, on_error="skip")  # skipped and counted; the rest stays
    assert len(index.skipped) == 1 and sum(index.counts.values()) == 7


def test_finite_bit_test_agrees_with_isfinite_on_every_fp16_value():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # all 65,536 bit patterns
    ok = np.isfinite(every)
    base = torch.ones(5, dtype=torch.float16)
    for bits in np.flatnonzero(~ok)[::7].tolist() + np.flatnonzero(ok)[::997].tolist():
        t = base.clone()
        t[3] = torch.from_numpy(every[bits : bits + 1])[0]
        assert finite(t) == bool(ok[bits]), hex(bits)
    assert finite(torch.from_numpy(every[ok])) and not finite(torch.from_numpy(every))
    assert finite(torch.empty(0, dtype=torch.float16))


def test_webdataset_reader_reports_nan_with_shard_sample_key(tmp_path):
    write_random_shards(tmp_path, n=4, buckets=[(8, 8)], flip=False)
    tar = tmp_path / "bucket_8x8" / "shard-00000.tar"
    bad = np.zeros(32, np.float16)
    bad[3] = np.nan
    _rewrite_member(tar, ".dino.npy", _npy(bad))
    loader = WebDatasetLoader(build_index(tmp_path), sem(shuffle=False), num_workers=0)
    with pytest.raises(ShardError, match=r"shard-00000.tar: sample s0000: key 'dino.npy': contains NaN"):
        next(loader)


def test_build_loader_picks_and_configures_backends(tmp_path, monkeypatch):
    from nanodit.config import ConfigError, load_config

    write_random_shards(tmp_path, n=10)

    def cfg(*over):
        return load_config("smoke", [f"data.path={tmp_path}", "train.batch_size=4", *over])

    manifest, loader = build_loader(cfg(), torch.device("cpu"))
    assert loader.name == "gpu-cache" and "cpu" in loader.reason and loader.root == tmp_path
    assert cache_bytes(manifest, sem()) >= loader.nbytes
    _, loader = build_loader(cfg("data.loader=webdataset", "data.num_workers=0"), torch.device("cpu"))
    assert loader.name == "webdataset" and next(loader).t5.dtype == torch.float16
    _, loader = build_loader(cfg("data.rank=1", "data.world_size=2"), torch.device("cpu"))
    assert loader.sem.rank == 1 and loader.sem.world_size == 2
    with pytest.raises(ConfigError, match=r"data.rank=2 must be in \[0, data.world_size=2\)"):
        build_loader(cfg("data.rank=2", "data.world_size=2"), torch.device("cpu"))
    monkeypatch.setattr("nanodit.data.dali_loader.dali_available", lambda: False)
    with pytest.raises(ShardError, match=r"data.loader=dali: NVIDIA DALI is not installed") as err:
        build_loader(cfg("data.loader=dali"), torch.device("cpu"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "workers, prefetch, slots",
    [(2, 2, 0), (2, 2, 5), (2, 1, 3), (0, 1, 2), (0, 1, None), (1, 3, None)],
    ids=["per-batch-shm", "tight-ring", "minimal-ring", "no-workers-minimal", "no-workers", "one-worker"],
)
def test_webdataset_slot_ring_batches_equal_the_memory_loader(shards, workers, prefetch, slots):
    """The slot ring (smallest legal rings: every slot reused many times) and the per-batch path (slots=0) yield
    MemoryLoader's batches; batches are kept until the end, so a slot reused under a yielded batch would show."""
    for world in (1, 2):
        for rank in range(world):
            s = sem(rank=rank, world_size=world)
            _, groups, index = shards
            ref = MemoryLoader(groups, s)
            loader = WebDatasetLoader(index, s, num_workers=workers, prefetch=prefetch, slots=slots)
            try:
                got = [next(loader) for _ in range(3 * ref.batches_per_epoch)]
                assert (loader._ring is None) == (slots == 0)
            finally:
                loader.close()
            for step, b in enumerate(got):
                assert_same_batch(b, next(ref), f"slots={slots} rank {rank}/{world} step {step}")


def test_webdataset_slot_ring_resumes_and_restarts(shards):
    """load_state_dict stops the workers and frees every slot; the same ring serves the restarted workers."""
    s = sem()
    ref = MemoryLoader(shards[1], s)
    loader = WebDatasetLoader(shards[2], s, num_workers=2, prefetch=1, slots=3)
    try:
        for _ in range(2):
            next(loader)
        ring = loader._ring
        for state in ({"epoch": 1, "index": 2}, {"epoch": 0, "index": 5}, {"epoch": 0, "index": 5}):
            loader.load_state_dict(state)
            ref.load_state_dict(state)
            assert not any(ring.busy)
            for step in range(4):
                assert_same_batch(next(loader), next(ref), f"resumed at {state}, step {step}")
            assert loader._ring is ring  # allocated once
    finally:
        loader.close()


def test_webdataset_slot_options_and_flow_control(shards):
    _, groups, index = shards
    with pytest.raises(
        ValueError, match=r"slots=4 must be 0 .* or >= num_workers \* prefetch \+ 1 = 5"
    ) as err:
        WebDatasetLoader(index, sem(), num_workers=2, prefetch=2, slots=4)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"num_workers=-1 must be >= 0"):
        WebDatasetLoader(index, sem(), num_workers=-1)
    ring = SlotRing(index, 4, 2)
    assert ring.acquire(0) == 0 and ring.acquire(1) == 1
    with pytest.raises(RuntimeError, match="slot 0 is still held by an unconsumed batch"):
        ring.acquire(2)  # never overwrite a batch that was not copied out
    ring.release(0)
    assert ring.acquire(2) == 0
    # every batch of every epoch fits a slot: the bound is the B longest captions of a bucket
    most = max(
        int(index.buckets[b].t5_len[i, :].max(1).sum()) for b, i in epoch_schedule(index.counts, sem(), 0)
    )
    assert most <= max_batch_rows(index, 4) == ring.max_rows


@pytest.mark.parametrize(
    "kind",
    ["webdataset", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason=NO_DALI))],
)
def test_training_through_each_backend_gives_the_same_losses(tmp_path, kind):
    """End to end through the trainer (smoke config, 6 steps, shuffled, flips and CFG dropout on): every
    backend feeds the same batches, so the loss curve is bitwise the one of the gpu-cache backend."""
    import json as _json

    from nanodit.config import load_config
    from nanodit.train import train

    def curve(loader: str) -> list[float]:
        run = tmp_path / loader
        cfg = load_config(
            "smoke",
            [f"run.dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "run.progress=false", "val.every=0",
             "val.at_end=false", "run.tensorboard=false", "train.steps=6", "train.log_every=1",
             f"data.loader={loader}"],
        )  # fmt: skip
        train(cfg, quiet=True)
        return [_json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]

    want = curve("gpu-cache")
    assert len(want) == 6 and curve(kind) == want
