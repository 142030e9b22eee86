"""A stand-in for another team's Stage-2 script: writes latent shards the way such scripts do, with tarfile and
numpy only (nothing from nanodit), so the tests see what a producer that never read our code writes.

    python tests/stage2_writer.py OUT [--layout bucket-folders|flat] [--samples 20] [--padded] [--no-manifest]
        [--rename latent=vae_latent.npy ...] [--per-tar 4] [--seed 0]

bucket-folders: OUT/bucket-<h>x<w>/part-<n>.tar and a manifest naming buckets by folder (``{"bucket-8x8": 10}``,
no top-level count, no dims, no T5 length); flat: OUT/data-<n>.tar with the buckets mixed inside each tar (the
bucket only in each sample's json). Sample keys are zero-padded numbers; T5 states are unpadded, or with
``--padded`` padded to a fixed length with ``t5_mask.npy`` / ``t5_flip_mask.npy`` (HF tokenizer style int64).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np

BUCKETS = [(8, 8), (6, 10)]
DINO, T5, PAD = 24, 40, 16


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def sample(i: int, rng: np.random.Generator, padded: bool) -> tuple[tuple[int, int], dict[str, bytes]]:
    h, w = BUCKETS[i % len(BUCKETS)]
    L, Lf = (int(n) for n in rng.integers(2, 12, size=2))
    rec = {
        "latent.npy": rng.standard_normal((16, h, w)).astype(np.float16),
        "latent_flip.npy": rng.standard_normal((16, h, w)).astype(np.float16),
        "dino.npy": rng.standard_normal(DINO).astype(np.float16),
        "dino_flip.npy": rng.standard_normal(DINO).astype(np.float16),
    }
    t5, t5f = (rng.standard_normal((n, T5)).astype(np.float16) for n in (L, Lf))
    if padded:
        rec["t5.npy"] = np.concatenate([t5, np.zeros((PAD - L, T5), np.float16)])
        rec["t5_flip.npy"] = np.concatenate([t5f, np.zeros((PAD - Lf, T5), np.float16)])
        rec["t5_mask.npy"] = (np.arange(PAD) < L).astype(np.int64)
        rec["t5_flip_mask.npy"] = (np.arange(PAD) < Lf).astype(np.int64)
    else:
        rec["t5.npy"], rec["t5_flip.npy"] = t5, t5f
    out = {k: _npy(v) for k, v in rec.items()}
    out["txt"] = f"a red square on the left, sample {i}".encode()
    out["flip.txt"] = f"a red square on the right, sample {i}".encode()
    out["json"] = json.dumps({"bucket": [h, w], "id": f"img{i:05d}", "orig_size": [8 * h, 8 * w]}).encode()
    return (h, w), out


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def write(
    out: str | Path,
    layout: str = "bucket-folders",
    samples: int = 20,
    padded: bool = False,
    manifest: bool = True,
    rename: dict[str, str] | None = None,
    per_tar: int = 4,
    seed: int = 0,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    made = []
    for i in range(samples):
        bucket, members = sample(i, rng, padded)
        members = {(rename or {}).get(k, k): v for k, v in members.items()}
        made.append((bucket, f"{i:06d}", members))
    if layout == "flat":
        for n in range(0, len(made), per_tar):
            write_tar(out / f"data-{n // per_tar:04d}.tar", [(k, m) for _, k, m in made[n : n + per_tar]])
        return out
    counts = {}
    for bucket in BUCKETS:
        folder = out / f"bucket-{bucket[0]}x{bucket[1]}"
        folder.mkdir(exist_ok=True)
        mine = [(k, m) for b, k, m in made if b == bucket]
        for n in range(0, len(mine), per_tar):
            write_tar(folder / f"part-{n // per_tar}.tar", mine[n : n + per_tar])
        counts[folder.name] = len(mine)
    if manifest:
        meta = {
            "buckets": counts,
            "vae": {"name": "flux-vae", "scale": 0.3611, "shift": 0.1159},
            "t5": "t5-v1_1-xxl",
        }
        (out / "manifest.json").write_text(json.dumps(meta, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layout", default="bucket-folders", choices=["bucket-folders", "flat"])
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--padded", action="store_true")
    ap.add_argument("--no-manifest", dest="manifest", action="store_false")
    ap.add_argument("--rename", nargs="*", default=[], help="old=new member names")
    ap.add_argument("--per-tar", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rename = dict(r.split("=", 1) for r in a.rename)
    write(a.out, a.layout, a.samples, a.padded, a.manifest, rename, a.per_tar, a.seed)


if __name__ == "__main__":
    main()
