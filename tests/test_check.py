"""Bad input: every case is one line naming the file, the sample, the key and what is wrong; `data check` and
every loader (what `train` runs) report the same line; `data.on_error=skip` skips the sample and counts it by
reason (log, metrics.jsonl, summary.json); a stamp written by a clean check is trusted only for the same
files. Every data set is written at test time."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import write_random_shards

from nanodit.config import load_config
from nanodit.data import build_loader
from nanodit.data.__main__ import main as data_main
from nanodit.data.check import STAMP
from nanodit.data.schema import ShardError
from nanodit.data.tars import write_wds_index
from nanodit.train import main as train_main

SHARD = Path("bucket_8x8") / "shard-00000.tar"


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def with_nan(shape, dtype=np.float16, at=0, value=np.nan):
    a = np.ones(shape, dtype)
    a.reshape(-1)[at] = value
    return npy(a)


def rewrite(tar: Path, key: str, edit: dict) -> None:
    """Set (bytes) or remove (None) members of sample ``key`` (new ones go right after its others: a sample's
    members are consecutive in a tar); the DALI index file is rewritten too."""
    with tarfile.open(tar) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    out, have = [], set()
    for i, (name, data) in enumerate(members):
        k, ext = name.split(".", 1)
        if k == key:
            have.add(ext)
            if ext in edit:
                data = edit[ext]
        if data is not None:
            out.append((name, data))
        if k == key and (i + 1 == len(members) or members[i + 1][0].split(".", 1)[0] != key):
            out += [(f"{key}.{e}", d) for e, d in edit.items() if e not in have and d is not None]
    with tarfile.open(tar, "w") as tf:
        for name, data in out:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    write_wds_index(tar)


def no_t5_max_len(root: Path) -> None:
    m = json.loads((root / "manifest.json").read_text())
    del m["t5_max_len"]  # a producer that names no maximum length
    (root / "manifest.json").write_text(json.dumps(m))


# (id, {member: new bytes or None}, text the message must hold, reason, extra data change)
CASES = [
    ("nan-latent", {"latent.npy": with_nan((16, 8, 8))}, "key 'latent.npy': contains NaN or Inf", "nan_inf", None),
    ("inf-dino", {"dino.npy": with_nan(32, value=np.inf, at=5)}, "key 'dino.npy': contains NaN or Inf", "nan_inf", None),
    ("nan-t5-flip", {"t5_flip.npy": with_nan((2, 48), at=50)}, "key 't5_flip.npy': contains NaN or Inf", "nan_inf", None),
    ("txt-not-utf8", {"txt": b"caf\xe9 on the left"}, "key 'txt': not UTF-8 (byte 0xe9 at position 3)", "not_utf8", None),
    ("flip-txt-not-utf8", {"flip.txt": b"\xff\xfe"}, "key 'flip.txt': not UTF-8 (byte 0xff at position 0)", "not_utf8", None),
    (
        "t5-3000-no-manifest-max",
        {"t5.npy": npy(np.ones((3000, 48), np.float16))},
        "key 't5.npy': 3000 T5 tokens > the default t5_max_len=512",
        "t5_too_long",
        no_t5_max_len,
    ),
    (
        "t5-over-manifest-max",
        {"t5.npy": npy(np.ones((12, 48), np.float16))},
        "key 't5.npy': 12 T5 tokens > the manifest's t5_max_len=9",
        "t5_too_long",
        None,
    ),
    ("dtype", {"dino.npy": npy(np.zeros(32, np.int32))}, "key 'dino.npy': dtype int32, expected float16 (32,)", "dtype", None),
    ("shape", {"latent.npy": npy(np.zeros((16, 8, 9), np.float16))}, "shape (16, 8, 9), expected (16, 8, 8)", "shape", None),
    ("missing", {"dino.npy": None}, "missing key 'dino.npy'", "missing_key", None),
    ("json", {"json": b"{not json"}, "key 'json': JSONDecodeError", "bad_json", None),
    ("pickle", {"extra.pth": b"\x80\x04junk"}, "key 'extra.pth': pickled tensors are not allowed", "pickle", None),
    ("npy-unreadable", {"dino.npy": b"\x93NUMPY junk"}, "key 'dino.npy': not a readable .npy", "unreadable", None),
    (
        "mask-not-prefix",
        {"t5_mask.npy": npy(np.array([0, 1], np.int64)), "t5.npy": npy(np.ones((2, 48), np.float16)),
         "t5_flip.npy": npy(np.ones((2, 48), np.float16))},
        "key 't5_mask.npy': valid tokens must be a non-empty prefix",
        "mask",
        None,
    ),  # fmt: skip
    ("duplicate-id", {"json": json.dumps({"bucket": [8, 8], "id": "s0002"}).encode()}, "sample s0002: duplicate id", "duplicate_id", None),
]  # fmt: skip


@pytest.fixture
def bad_data(tmp_path, request):
    """8 clean samples in 2 buckets, then one sample (s0000 in bucket_8x8) broken as the case says."""
    _, edit, _, _, change = request.param
    root = tmp_path / "data"
    write_random_shards(root, n=8)
    rewrite(root / SHARD, "s0000", edit)
    if change is not None:
        change(root)
    return root, request.param


def loader_for(root: Path, backend: str, *over: str):
    cfg = load_config(
        "smoke",
        [f"data.path={root}", "train.batch_size=2", f"data.loader={backend}", "data.num_workers=0", *over],
    )
    return build_loader(cfg, torch.device("cpu"))


@pytest.mark.parametrize("bad_data", CASES, ids=[c[0] for c in CASES], indirect=True)
def test_check_and_every_loader_report_the_same_one_line(bad_data, capsys):
    root, (case, _, expect, reason, _) = bad_data
    assert data_main(["check", f"data.path={root}", "--no-progress"]) == 1
    out = capsys.readouterr().out
    problems = [line.removeprefix("problem: ") for line in out.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1, out  # one broken sample, one problem
    msg = problems[0]
    assert expect in msg and "\n" not in msg
    assert str(root / SHARD) in msg and ("s0000" in msg or case == "duplicate-id")
    assert f"problems: 1 ({reason}: 1)" in out
    for backend in ("gpu-cache", "webdataset"):  # what train runs: the same check, the same line
        with pytest.raises(ShardError) as e:
            loader_for(root, backend)
        assert str(e.value) == msg, backend
        manifest, loader = loader_for(root, backend, "data.on_error=skip")
        try:
            assert [(e.reason, str(e)) for e in loader.skipped] == [(reason, msg)]
            assert sum(loader.counts.values()) == 7 and manifest["count"] == 8  # the tars hold 8
            batch = next(loader)
            assert torch.isfinite(batch.latent.float()).all()
        finally:
            loader.close()


def smoke(root: Path, run: Path, *over: str) -> list[str]:
    return [
        "--config", "smoke", f"data.path={root}", f"run.dir={run}", "model.size=tiny", "train.steps=5",
        "train.log_every=1", "train.batch_size=2", "val.at_end=false", "val.every=0", "run.tensorboard=false",
        "run.progress=false", *over,
    ]  # fmt: skip


def test_webdataset_run_stops_before_step_one_on_a_nan_it_would_draw_later(tmp_path, capsys):
    """A NaN latent in the last sample of the schedule: the webdataset loader used to find it only when drawn
    (a 5-step run exited 0); now the start-up check names it and the run exits 2 before any step."""
    root = tmp_path / "data"
    write_random_shards(root, n=12, buckets=[(8, 8)])
    tar = root / "bucket_8x8" / "shard-00002.tar"
    rewrite(tar, "s0011", {"latent.npy": with_nan((16, 8, 8), at=1000)})
    assert train_main(smoke(root, tmp_path / "run", "data.loader=webdataset", "data.num_workers=0")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tar}: sample s0011: key 'latent.npy': contains NaN or Inf"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken


def test_skip_counts_by_reason_in_the_log_metrics_and_summary(tmp_path, capsys):
    """Two broken samples under data.on_error=skip: the trainer prints the samples it really has and what it
    skipped by reason; metrics.jsonl's first row and summary.json carry the counts."""
    root = tmp_path / "data"
    write_random_shards(root, n=10)
    rewrite(root / SHARD, "s0000", {"txt": b"\xc3\x28"})
    rewrite(root / "bucket_6x10" / "shard-00000.tar", "s0001", {"latent.npy": with_nan((16, 6, 10))})
    run = tmp_path / "run"
    assert (
        train_main(smoke(root, run, "data.on_error=skip", "data.loader=webdataset", "data.num_workers=0"))
        == 0
    )
    out = capsys.readouterr().out
    data_line = next(line for line in out.splitlines() if line.startswith("data: "))
    assert "(8 samples" in data_line and "skipped 2 of 10 samples (nan_inf: 1, not_utf8: 1)" in data_line
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["data_skipped"] == {"nan_inf": 1, "not_utf8": 1}
    assert all("data_skipped" not in r for r in rows[1:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"] == {"samples": 8, "skipped": {"nan_inf": 1, "not_utf8": 1}, "checked": "full"}


def test_float32_arrays_pass_the_check_and_gpu_cache_but_not_the_streaming_loaders(tmp_path, capsys):
    root = tmp_path / "data"
    write_random_shards(root, n=8)
    rewrite(root / SHARD, "s0000", {"dino.npy": npy(np.ones(32, np.float32))})
    assert data_main(["check", f"data.path={root}", "--no-progress"]) == 0
    assert "note: 1 samples store float32 arrays" in capsys.readouterr().out
    _, loader = loader_for(root, "gpu-cache")
    assert sum(loader.counts.values()) == 8
    with pytest.raises(
        ShardError, match=r"sample s0000: key 'dino.npy': dtype float32; the streaming loaders"
    ):
        loader_for(root, "webdataset")


def test_check_prints_a_progress_bar(tmp_path, capsys):
    write_random_shards(tmp_path, n=6)
    assert data_main(["check", f"data.path={tmp_path}", "--no-stamp"]) == 0
    err = capsys.readouterr().err
    assert "data check" in err and "6/6" in err


def test_stamp_is_trusted_only_for_the_files_it_checked(tmp_path, capsys):
    """A clean check writes the stamp; a loader then reads only headers (data.check=auto). To show that it
    really trusts the stamp, a NaN is planted keeping the tar's size and mtime: auto does not see it, full
    does. Touching the file (a new mtime) voids the stamp: auto reads every array again and finds it."""
    write_random_shards(tmp_path, n=8)
    assert data_main(["check", f"data.path={tmp_path}", "--no-progress"]) == 0
    assert "stamp " in capsys.readouterr().out and (tmp_path / STAMP).is_file()
    _, loader = loader_for(tmp_path, "gpu-cache")
    assert loader.checked == "stamp"
    tar = tmp_path / SHARD
    st = tar.stat()
    raw = bytearray(tar.read_bytes())
    with tarfile.open(tar) as tf:
        m = tf.getmember("s0000.latent.npy")
    start = m.offset_data + 128  # np.save's header is 128 bytes for these arrays
    raw[start : start + 2] = np.array([np.nan], np.float16).tobytes()
    tar.write_bytes(bytes(raw))
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    _, loader = loader_for(tmp_path, "gpu-cache")
    assert loader.checked == "stamp"  # trusted: the stamp vouches for this size and mtime
    with pytest.raises(ShardError, match="sample s0000: key 'latent.npy': contains NaN or Inf"):
        loader_for(tmp_path, "gpu-cache", "data.check=full")
    os.utime(tar)  # the file changed, as far as anyone can tell
    with pytest.raises(ShardError, match="sample s0000: key 'latent.npy': contains NaN or Inf"):
        loader_for(tmp_path, "gpu-cache")
