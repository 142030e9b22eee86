"""Shard discovery: every layout the design accepts (this project's manifest, another producer's manifest,
one folder per bucket, a flat folder, a glob, a brace pattern, a list of tars; unpadded T5 or padded + mask;
a key map) resolves to the same samples, in both readers, and trains without any edit to the data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import stage2_writer

from nanodit.config import load_config
from nanodit.data import build_loader
from nanodit.data.__main__ import main as data_main
from nanodit.data.index import build_index, read_samples
from nanodit.data.layout import resolve
from nanodit.data.schema import Keys, ShardError
from nanodit.data.shards import ShardWriter, load_manifest, read_all, shard_paths
from nanodit.train import main as train_main

WRITER = Path(__file__).with_name("stage2_writer.py")


def canon(groups: dict) -> dict:
    """Samples by id: bucket, every array's bytes and dtype, captions (what a loader would feed)."""
    out = {}
    for b, samples in groups.items():
        for s in samples:
            arrays = (s.latent, s.dino, s.t5, s.latent_flip, s.dino_flip, s.t5_flip)
            out[s.id] = (b, [(a.dtype.str, a.shape, a.tobytes()) for a in arrays], s.txt, s.flip_txt)
    return out


def ids_in_order(groups: dict) -> dict:
    return {b: [s.id for s in g] for b, g in groups.items()}


def run_cfg(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "smoke",
        f"data.path={data}",
        f"run.dir={run}",
        "model.size=tiny",
        "train.steps=4",
        "train.log_every=2",
        "train.batch_size=4",
        "val.at_end=false",
        "val.every=0",
        "run.tensorboard=false",
        "run.progress=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def producer(tmp_path_factory):
    """The same 20 samples written by the independent script in several layouts (run as a separate process:
    nothing of nanodit in it)."""
    root = tmp_path_factory.mktemp("producer")
    made = {}
    for name, args in {
        "folders": [],
        "folders-no-manifest": ["--no-manifest"],
        "flat": ["--layout", "flat", "--per-tar", "3"],
        "padded": ["--padded"],
    }.items():
        subprocess.run([sys.executable, str(WRITER), str(root / name), *args], check=True)
        made[name] = root / name
    return made


def test_independent_per_bucket_folders_check_and_train_without_edits(producer, tmp_path, capsys):
    """The done-when case: shards from another producer's script (folders 'bucket-8x8', a manifest naming
    buckets by folder, no count / dims / T5 length) pass `data check` and train as they are."""
    data = producer["folders"]
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["buckets"] == {"bucket-8x8": 10, "bucket-6x10": 10} and "count" not in manifest
    assert data_main(["check", f"data.path={data}", "--no-progress", "--no-stamp"]) == 0
    out = capsys.readouterr().out
    assert "8x8: 10" in out and "6x10: 10" in out and "total: 20 samples passed" in out and "ok:" in out
    assert train_main(run_cfg(data, tmp_path / "run")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["data"]["samples"] == 20 and summary["data"]["skipped"] == {}
    m = load_manifest(data)  # the canonical manifest: what the checkpoint and validation see
    assert m["count"] == 20 and (m["dino_dim"], m["t5_dim"], m["latent_channels"]) == (24, 40, 16)
    assert m["vae"]["scale"] == 0.3611 and m["layout"]["kind"] == "manifest"
    assert m["t5_limit"]["value"] == 512 and "default" in m["t5_limit"]["source"]


@pytest.mark.parametrize("layout", ["folders-no-manifest", "flat", "glob", "brace", "list", "padded"])
def test_every_layout_gives_the_same_samples(producer, layout):
    """Per-bucket folders without a manifest, a flat folder whose tars mix buckets, a glob, a brace pattern,
    a comma-separated list, padded T5 + masks: the same samples as the producer's own layout, bitwise, by
    the decode path and by the index (what the loaders read); the index positions follow read_all."""
    ref = canon(read_all(producer["folders"])[1])
    flat = producer["flat"]
    spec = {
        "glob": str(flat / "data-*.tar"),
        "brace": str(flat / "data-{0000..0006}.tar"),
        "list": ",".join(str(p) for p in sorted(flat.glob("*.tar"))),
    }.get(layout, str(producer.get(layout)))
    manifest, groups, skipped = read_all(spec)
    assert not skipped and manifest["count"] == 20
    assert canon(groups) == ref
    index = build_index(spec, values=True)
    assert ids_in_order(read_samples(index)) == ids_in_order(groups)
    assert canon(read_samples(index)) == ref
    if layout == "flat":  # tars of mixed buckets are listed under each bucket they hold
        assert resolve(spec).kind == "flat" and len(resolve(spec).listed[sorted(flat.glob("*.tar"))[0]]) == 2
        assert set(shard_paths(spec, manifest)) == {(8, 8), (6, 10)}


def test_folder_without_hxw_takes_the_bucket_from_the_samples(producer, tmp_path):
    """A bucket folder named 'landscape' (no HxW): each sample's json bucket, or without json its latent."""
    data = tmp_path / "d"
    shutil.copytree(producer["folders-no-manifest"], data)
    (data / "bucket-6x10").rename(data / "landscape")
    for tar in (data / "landscape").glob("*.tar"):  # drop the json: the bucket must come from the latent
        members = stage2_writer_members(tar)
        stage2_writer.write_tar(tar, [(k, {e: v for e, v in m.items() if e != "json"}) for k, m in members])
    _, groups, _ = read_all(data)
    assert sorted(groups) == [(6, 10), (8, 8)] and len(groups[(6, 10)]) == 10
    assert all(s.id.isdigit() for s in groups[(6, 10)])  # without json the id is the tar key


def stage2_writer_members(tar: Path) -> list[tuple[str, dict[str, bytes]]]:
    import tarfile

    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return list(out.items())


def test_key_map_reads_shards_named_otherwise(tmp_path, capsys):
    """Members named by another convention: without a map, one line naming the key that is missing and the
    members there are; with data.keys.* the check passes, training runs, and validation's reader (given only
    the path) reads it the same way."""
    rename = {"latent.npy": "vae.npy", "t5.npy": "t5_emb.npy", "txt": "caption.txt"}
    data = stage2_writer.write(tmp_path / "d", samples=12, rename=rename)
    assert data_main(["check", f"data.path={data}", "--no-progress"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("problem: ") and "missing key" in x)
    assert "missing key 'latent.npy'" in line and "vae.npy" in line and "data.keys" in line
    keys = ["data.keys.latent=vae.npy", "data.keys.t5=t5_emb.npy", "data.keys.txt=caption.txt"]
    assert data_main(["check", f"data.path={data}", "--no-progress", *keys]) == 0
    assert train_main(run_cfg(data, tmp_path / "run", *keys)) == 0
    # the trainer registered the map for this path: a reader given only the path (validation) reads it too
    manifest = load_manifest(data)
    assert manifest["keys"] == {"latent": "vae.npy", "t5": "t5_emb.npy", "txt": "caption.txt"}
    _, groups, _ = read_all(resolve(data, Keys.from_fields(manifest["keys"])))
    assert sum(map(len, groups.values())) == 12 and groups[(8, 8)][0].txt.startswith("a red square")


@pytest.mark.parametrize("bad", [1, "vae.npy", ["latent"], {"latent": 3}, {"nope": "x.npy"}])
def test_a_malformed_key_map_in_the_manifest_is_one_line(tmp_path, bad):
    """The manifest's own "keys" record, malformed (found by the fuzzer: ``{"keys": 1}`` was a traceback):
    one line naming the manifest file and the key."""
    data = stage2_writer.write(tmp_path / "d", samples=4)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "keys": bad}))
    with pytest.raises(ShardError) as e:
        build_index(resolve(data, Keys()), "skip")
    msg = str(e.value)
    assert "\n" not in msg and str(data / "manifest.json") in msg and msg.split(": ")[1].startswith("keys")


def test_the_manifest_key_map_applies_when_the_config_names_none(tmp_path):
    """A manifest that records its key map reads without data.keys.*; a map in the config wins over it."""
    rename = {"latent.npy": "vae.npy"}
    data = stage2_writer.write(tmp_path / "d", samples=8, rename=rename)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "keys": {"latent": "vae.npy"}}))
    index = build_index(resolve(data, Keys()), "raise")
    assert sum(index.counts.values()) == 8
    with pytest.raises(ShardError, match="missing key 'lat.npy'"):
        build_index(resolve(data, Keys.from_fields({"latent": "lat.npy"})), "raise")


def test_project_manifest_still_reads_as_before(tmp_path):
    """This project's own layout: manifest shard lists, bucket_<h>x<w> folders, and its counts kept."""
    w = ShardWriter(tmp_path, samples_per_shard=2)
    rng = np.random.default_rng(0)
    for i in range(5):
        w.write(
            {
                "__key__": f"k{i}",
                "latent": rng.standard_normal((16, 4, 4)),
                "dino": rng.standard_normal(8),
                "t5": rng.standard_normal((3, 8)),
                "txt": "x",
                "json": {"bucket": [4, 4], "id": f"k{i}"},
            }
        )
    written = w.close()
    m = load_manifest(tmp_path)
    assert m["buckets"]["4x4"] == written["buckets"]["4x4"] and m["count"] == 5 and m["t5_max_len"] == 3
    assert resolve(tmp_path).kind == "manifest"


def test_manifest_count_that_differs_is_one_line_for_check_and_train(producer, tmp_path, capsys):
    data = tmp_path / "d"
    shutil.copytree(producer["folders"], data)
    m = json.loads((data / "manifest.json").read_text())
    m["buckets"]["bucket-8x8"] = 11
    (data / "manifest.json").write_text(json.dumps(m))
    assert data_main(["check", f"data.path={data}", "--no-progress"]) == 1
    problem = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("problem: "))
    assert "bucket 'bucket-8x8': manifest says 11 samples, shards hold 10" in problem
    assert train_main(run_cfg(data, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {problem.removeprefix('problem: ')}"
    # under data.on_error=skip it is a warning, and the run goes on with what the shards hold
    assert train_main(run_cfg(data, tmp_path / "run2", "data.on_error=skip")) == 0
    assert "warning: " in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec, expect",
    [
        ("missing-folder", "no such folder or file"),
        ("empty", "no manifest.json and no .tar shards"),
        ("nothing-*.tar", "matches no file"),
    ],
)
def test_data_paths_that_name_nothing_are_one_line(tmp_path, capsys, spec, expect):
    (tmp_path / "empty").mkdir()
    path = tmp_path / spec
    assert train_main(run_cfg(path, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err and err.startswith("error: ")


def test_folder_bucket_that_disagrees_with_the_latent_is_one_line(producer, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(producer["folders-no-manifest"], data)
    (data / "bucket-8x8").rename(data / "bucket-64x64")  # named by the image size, say
    with pytest.raises(ShardError) as e:
        build_index(data)
    msg = str(e.value)
    assert "bucket-64x64" in msg and "json bucket [8, 8] but shard is in (64, 64)" in msg and "\n" not in msg


def test_build_loader_feeds_every_layout_the_same_batches(producer):
    """Through build_loader (what the trainer calls), per-bucket folders and the flat mixed-bucket layout
    give the same batches: the schedule depends only on the samples, not on how they were laid out."""
    import torch

    batches = {}
    for name in ("folders", "flat"):
        cfg = load_config(
            "smoke",
            [
                f"data.path={producer[name]}",
                "train.batch_size=4",
                "data.loader=webdataset",
                "data.num_workers=0",
            ],
        )
        _, loader = build_loader(cfg, torch.device("cpu"))
        batches[name] = [next(loader) for _ in range(2 * loader.batches_per_epoch)]
        loader.close()
    for a, b in zip(batches["folders"], batches["flat"]):
        assert a.ids == b.ids and torch.equal(a.latent, b.latent) and torch.equal(a.t5, b.t5)


@pytest.mark.parametrize(
    "kind",
    [
        "webdataset",
        pytest.param(
            "dali",
            marks=pytest.mark.skipif(
                not __import__("nanodit.data.dali_loader", fromlist=["x"]).dali_available(),
                reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130 to run the DALI CPU pipeline)",
            ),
        ),
    ],
)
def test_every_backend_reads_another_producers_shards_alike(tmp_path, kind):
    """Padded T5 + masks, a latent member named vae.npy (data.keys.latent), buckets by folder: the streaming
    backends give the in-memory backend's batches bit for bit."""
    import torch

    data = stage2_writer.write(tmp_path / "d", samples=20, padded=True, rename={"latent.npy": "vae.npy"})
    got = {}
    for backend in ("gpu-cache", kind):
        cfg = load_config(
            "smoke",
            [f"data.path={data}", "train.batch_size=4", f"data.loader={backend}", "data.num_workers=1"]
            + ["data.keys.latent=vae.npy"],
        )
        _, loader = build_loader(cfg, torch.device("cpu"))
        try:
            got[backend] = [next(loader) for _ in range(2 * loader.batches_per_epoch)]
        finally:
            loader.close()
    for a, b in zip(got[kind], got["gpu-cache"]):
        assert a.ids == b.ids and a.captions == b.captions
        for k in ("latent", "dino", "t5", "t5_mask", "flipped", "drop_text"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
