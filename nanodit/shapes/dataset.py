"""The shapes data set: random scenes rendered, encoded and captioned into Stage-2 samples, written as shards.

    manifest = make_dataset("data/shapes", samples=100, seed=0, size=64)   # seconds

Every sample carries its flipped variant (mirrored image, mirrored DINO, left<->right-swapped caption) and its
scene in the json, so validation can read back what a generated image should show. The writer is
``nanodit.data.shards.ShardWriter``, the same one any Stage-2 script may use.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nanodit.data.shards import ShardWriter
from nanodit.data.text import swap_left_right
from nanodit.shapes.codec import ShapesCodec
from nanodit.shapes.render import render
from nanodit.shapes.standins import DinoStandIn, T5StandIn
from nanodit.shapes.world import buckets, caption, flip_scene, random_scene


def generate_samples(samples: int = 100, seed: int = 0, size: int = 64) -> Iterator[dict[str, Any]]:
    """The Stage-2 samples of ``make_dataset``, in order, spread over ``buckets(size)`` round-robin.
    Same arguments -> identical arrays."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r}: must be a positive int")
    rng = np.random.default_rng(seed)
    codec, dino, t5 = ShapesCodec(), DinoStandIn(), T5StandIn()
    bks = buckets(size)
    for i in range(samples):
        h, w = bks[i % len(bks)]
        scene = random_scene(rng)
        flipped = flip_scene(scene)
        imgs = np.stack([render(scene, 2 * h, 2 * w), render(flipped, 2 * h, 2 * w)])  # (2, 4, 2h, 2w)
        lat = codec.encode(imgs).numpy().astype(np.float16)  # (2, 16, h, w)
        txt = caption(scene)
        yield {
            "__key__": f"shapes-{i:05d}",
            "latent": lat[0],
            "latent_flip": lat[1],
            "dino": dino(scene).astype(np.float16),
            "dino_flip": dino(flipped).astype(np.float16),
            "t5": t5(txt).astype(np.float16),
            "t5_flip": t5(swap_left_right(txt)).astype(np.float16),
            "txt": txt,
            "flip.txt": swap_left_right(txt),
            "json": {
                "bucket": [h, w],
                "id": f"shapes-{i:05d}",
                "scene": scene.to_json(),
                "size": [2 * h, 2 * w],
            },
        }


def make_dataset(out_dir: str | Path, samples: int = 100, seed: int = 0, size: int = 64) -> dict[str, Any]:
    """Write the shapes set as Stage-2 shards into ``out_dir``; returns the manifest. The manifest's
    ``codec``/``dino``/``t5`` entries rebuild the stand-ins (``ShapesCodec.from_manifest``)."""
    extra = {
        "name": "shapes",
        "codec": ShapesCodec().manifest(),
        "dino": DinoStandIn().manifest(),
        "t5": T5StandIn().manifest(),
        "seed": seed,
        "size": size,
    }
    writer = ShardWriter(out_dir, extra)
    for sample in generate_samples(samples, seed, size):
        writer.write(sample)
    return writer.close()
