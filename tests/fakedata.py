"""Tiny random shard sets for tests that need shards but not the shapes world."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nanodit.data.shards import ShardWriter

BUCKETS = [(8, 8), (6, 10)]


def write_random_shards(
    out: Path,
    n: int = 12,
    dino_dim: int = 32,
    t5_dim: int = 48,
    seed: int = 0,
    buckets=BUCKETS,
    flip: bool = True,
    max_len: int = 9,
) -> dict:
    rng = np.random.default_rng(seed)
    w = ShardWriter(out, {"name": "random"}, samples_per_shard=4)
    for i in range(n):
        h, wd = buckets[i % len(buckets)]
        L, Lf = rng.integers(1, max_len + 1, size=2)
        s = {
            "__key__": f"s{i:04d}",
            "latent": rng.standard_normal((16, h, wd)).astype(np.float16),
            "dino": rng.standard_normal(dino_dim).astype(np.float16),
            "t5": rng.standard_normal((L, t5_dim)).astype(np.float16),
            "txt": f"caption {i} on the left",
            "json": {"bucket": [h, wd], "id": f"s{i:04d}"},
        }
        if flip:
            s.update(
                {
                    "latent_flip": rng.standard_normal((16, h, wd)).astype(np.float16),
                    "dino_flip": rng.standard_normal(dino_dim).astype(np.float16),
                    "t5_flip": rng.standard_normal((Lf, t5_dim)).astype(np.float16),
                    "flip.txt": f"caption {i} on the right",
                }
            )
        w.write(s)
    return w.close()
