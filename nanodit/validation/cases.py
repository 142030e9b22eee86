"""Which samples each validation test uses: the cases, deterministic in (data, number, seed).

    manifest, groups = read_val_samples(root, n)        # {bucket: [Sample]} (a bounded prefix per bucket)
    cases = select_cases(groups, n, shapes=True, seed=1234)

The three tests, each on ``n`` samples spread over the buckets (sorted ids, round robin):
- recon: a sample's own DINO and caption; compared with its own latent;
- dino_swap: caption of A + DINO of B (same bucket): lighting/composition should follow B, content A;
- text_manip: DINO of A + A's left<->right-swapped caption: the layout should follow the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanodit.data.layout import resolve
from nanodit.data.schema import Sample, parse_bucket
from nanodit.data.shards import iter_samples
from nanodit.shapes import Scene, dino_swap_pairs

SHAPES_CODEC = "shapes-s2d"
TESTS = ("recon", "dino_swap", "text_manip")
TEST_TITLES = {"recon": "Reconstruction", "dino_swap": "DINO swap", "text_manip": "Text manipulation"}


@dataclass
class Case:
    """One generation: ``test`` on sample ``a`` (and, for the DINO swap, the DINO donor ``b``)."""

    test: str
    a: Sample
    b: Sample | None = None

    @property
    def bucket(self) -> tuple[int, int]:
        return self.a.bucket

    @property
    def dino(self) -> np.ndarray:
        return (self.b if self.test == "dino_swap" else self.a).dino  # (Dd,)

    @property
    def t5(self) -> np.ndarray:
        return self.a.t5_flip if self.test == "text_manip" else self.a.t5  # (L, Dt)

    @property
    def caption(self) -> str:
        return self.a.flip_txt if self.test == "text_manip" else self.a.txt


def is_shapes(manifest: dict) -> bool:
    """The built-in shapes world (its codec is exact and its scorers know every factor)."""
    return manifest.get("codec", {}).get("name") == SHAPES_CODEC


def has_scenes(manifest: dict, groups: dict[tuple[int, int], list[Sample]]) -> bool:
    """Shapes data whose samples carry their scene (what the scorers compare with)."""
    return is_shapes(manifest) and all("scene" in s.meta for g in groups.values() for s in g)


def _sorted_groups(groups: dict[tuple[int, int], list[Sample]]) -> dict[tuple[int, int], list[Sample]]:
    return {b: sorted(g, key=lambda s: s.id) for b, g in sorted(groups.items())}


def round_robin(per_bucket: dict, n: int) -> list:
    """Up to ``n`` items taken in turn from each bucket's list (buckets sorted): spread over the buckets."""
    out, i = [], 0
    lists = [per_bucket[b] for b in sorted(per_bucket)]
    while len(out) < n and any(i < len(x) for x in lists):
        for x in lists:
            if i < len(x) and len(out) < n:
                out.append(x[i])
        i += 1
    return out


def swap_pairs(samples: list[Sample], shapes: bool, seed: int) -> list[tuple[Sample, Sample]]:
    """DINO-swap pairs (A, B) within one bucket. Shapes: telling pairs only (light directions >= 90 deg
    apart, different objects: ``nanodit.shapes.dino_swap_pairs``); real data: A = i-th, B = the sample half
    the bucket further on (sorted ids)."""
    n = len(samples)
    if n < 2:
        return []
    if shapes:
        scenes = [Scene.from_json(s.meta["scene"]) for s in samples]
        return [(samples[a], samples[b]) for a, b in dino_swap_pairs(scenes, n, seed=seed)]
    return [(samples[i], samples[(i + n // 2) % n]) for i in range(n)]


def select_cases(groups: dict[tuple[int, int], list[Sample]], n: int, shapes: bool, seed: int) -> list[Case]:
    """The test cases, deterministic in (data, n, seed): ``n`` per test, spread over the buckets.
    Text manipulation uses the reconstruction samples that carry a swapped caption (and, on real data, the
    flipped latent its score compares with)."""
    g = _sorted_groups(groups)
    cases = [Case("recon", s) for s in round_robin(g, n)]
    pairs = round_robin({b: swap_pairs(s, shapes, seed) for b, s in g.items()}, n)
    cases += [Case("dino_swap", a, b) for a, b in pairs]
    flippable = {
        b: [s for s in ss if s.t5_flip is not None and (shapes or s.latent_flip is not None)]
        for b, ss in g.items()
    }
    cases += [Case("text_manip", s) for s in round_robin(flippable, n)]
    return cases


def read_val_samples(
    root: str | Path, n: int, on_error: str = "raise"
) -> tuple[dict, dict[tuple[int, int], list[Sample]]]:
    """(manifest, {bucket: samples}) with at most max(4n, 32) samples per bucket, read in shard order from the
    start of ``data.path`` (any layout ``data.layout`` accepts; a tar may hold several buckets): enough
    candidates for ``n`` cases per test (and telling swap pairs) without reading a large data set."""
    layout = resolve(root)
    if on_error != "skip" and layout.problems:
        raise layout.problems[0]
    limit, buckets = max(4 * n, 32), set(_listed_buckets(layout))
    groups: dict[tuple[int, int], list[Sample]] = {}
    for path in layout.shards:
        if all(len(groups.get(b, [])) >= limit for b in buckets):
            break
        for s in iter_samples(path, layout.manifest, on_error, listed=layout.listed.get(path, set())):
            got = groups.setdefault(s.bucket, [])
            if len(got) < limit:
                got.append(s)
    return layout.manifest, dict(sorted(groups.items()))


def _listed_buckets(layout) -> list[tuple[int, int]]:
    """The buckets a resolved layout's manifest lists."""
    return [parse_bucket(name) for name in layout.manifest["buckets"]]
