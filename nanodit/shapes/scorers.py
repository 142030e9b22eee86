"""The judge: read an image back into factors (``read_scene``) and score the validation tests objectively.

    f = read_scene(ShapesCodec().decode(latent)[0])     # image -> objects (colour, shape, side, size), lighting
    score_dino_swap(img, scene_a, scene_b)["passed"]     # lighting of B, objects of A
    score_text_manip(img, text_manip_target(scene))["passed"]

``dino_swap_target``/``text_manip_target`` are the scenes an ideal output shows; ``dino_swap_pairs`` picks the
pairs on which a DINO swap is telling. Letters: H, W image size.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from nanodit.shapes.render import MIN_IMAGE_SIDE, length_unit, pixel_grid, shape_mask
from nanodit.shapes.world import LIGHT_GAIN, PALETTE, RADIUS, Scene, flip_scene

CHROMA_THRESHOLD = 0.42  # RGB-only images: objects have chroma (max - min) >= 0.65, the background <= 0.3


@dataclass
class ObjectReading:
    """One object read from an image: nearest palette colour (and its RGB distance), best-fitting
    shape (and its IoU), side of the centroid, size class, area in pixels, centroid (centred px)."""

    colour: str
    shape: str
    side: str
    size: str
    area: int
    colour_dist: float
    iou: float
    cx: float
    cy: float


@dataclass
class Factors:
    """What an image shows. ``gradient`` is the fitted ramp strength relative to the renderer's
    (1.0 for a clean render; near 0 means no readable light direction)."""

    light_deg: float
    gradient: float
    brightness: float
    hue: float
    objects: list[ObjectReading] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_chw(img: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        img = img.detach().float().cpu().numpy()
    a = np.asarray(img, dtype=np.float32)
    if a.ndim != 3 or a.shape[0] not in (3, 4) or min(a.shape[1:]) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"read_scene: image must be (3 or 4, H, W) with H, W >= {MIN_IMAGE_SIDE}, got {a.shape}"
        )
    return a


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool (H, W) mask, each as an (N, 2) array of (row, col) in row-major order,
    ordered by their last pixel in row-major order (scipy.ndimage.label finds them)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))  # (H, W), labels 1..n
    if n == 0:
        return []
    pix = np.argwhere(lab > 0)  # (N, 2), row-major
    labels = lab[pix[:, 0], pix[:, 1]]  # (N,)
    order = np.argsort(labels, kind="stable")  # grouped by label, row-major inside each
    groups = np.split(pix[order], np.cumsum(np.bincount(labels, minlength=n + 1)[1:])[:-1])
    return sorted(groups, key=lambda g: int(g[-1, 0]) * mask.shape[1] + int(g[-1, 1]))


def _read_object(pix: np.ndarray, rgb: np.ndarray, height: int, width: int, col0: int) -> ObjectReading:
    """Measure one component (``pix`` rows/cols relative to a half image starting at column col0)."""
    rows, cols = pix[:, 0], pix[:, 1] + col0
    area = len(rows)
    cx, cy = float(np.mean(cols + 0.5 - width / 2)), float(np.mean(rows + 0.5 - height / 2))
    colour_rgb = np.median(rgb[:, rows, cols], axis=1)  # (3,): robust to blurred edges
    dists = {c: float(np.linalg.norm(colour_rgb - np.array(v))) for c, v in PALETTE.items()}
    colour = min(dists, key=dists.get)
    # shape: rasterise each hypothesis with the same area and centroid, keep the best IoU
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    pad = max(2, (r1 - r0) // 2)
    r0, c0, r1, c1 = max(r0 - pad, 0), max(c0 - pad, 0), min(r1 + pad, height), min(c1 + pad, width)
    window = np.zeros((r1 - r0, c1 - c0), dtype=bool)  # (h', w')
    window[rows - r0, cols - c0] = True
    x = np.arange(c0, c1) + 0.5 - width / 2
    y = np.arange(r0, r1) + 0.5 - height / 2
    best, best_iou, best_r = "circle", -1.0, 0.0
    for shape, r_area in (
        ("circle", math.sqrt(area / math.pi)),
        ("square", math.sqrt(area) / 2),
        ("triangle", math.sqrt(area / 2)),
    ):
        for r in r_area * np.linspace(0.85, 1.2, 8):  # pixel-centre sampling of small shapes shifts the area
            # a triangle's centroid lies r/3 below the centre of its box
            ycen = cy - r / 3 if shape == "triangle" else cy
            hyp = shape_mask(shape, x[None, :] - cx, y[:, None] - ycen, r)  # (h', w')
            iou = float((hyp & window).sum() / max((hyp | window).sum(), 1))
            if iou > best_iou:
                best, best_iou, best_r = shape, iou, float(r)
    size = "large" if best_r / length_unit(height, width) > sum(RADIUS.values()) / 2 else "small"
    return ObjectReading(
        colour, best, "left" if cx < 0 else "right", size, area, dists[colour], best_iou, cx, cy
    )


def read_scene(img: torch.Tensor | np.ndarray) -> Factors:
    """Read (4, H, W) RGB+mask or (3, H, W) RGB in [0, 1] (numpy or torch) back into factors.
    Objects: the mask channel > 0.5 (RGB only: chroma > CHROMA_THRESHOLD), cut at the centre line
    (objects never cross it), 8-connected components smaller than a quarter of the smallest object
    ignored. Lighting: a least-squares plane of brightness max(R, G, B) over the other pixels gives
    the direction and the brightness at the centre; the hue is that of their mean colour."""
    a = _as_chw(img)
    _, height, width = a.shape
    rgb = np.clip(a[:3], 0.0, 1.0)  # (3, H, W)
    fg = a[3] > 0.5 if a.shape[0] == 4 else (rgb.max(0) - rgb.min(0)) > CHROMA_THRESHOLD  # (H, W)
    bg = ~fg
    light_deg, gradient, brightness, hue = float("nan"), 0.0, float("nan"), float("nan")
    if bg.sum() >= 16:
        x, y = pixel_grid(height, width)
        s = max(height, width)
        xx, yy = np.broadcast_to(x[None, :] / s, bg.shape)[bg], np.broadcast_to(-y[:, None] / s, bg.shape)[bg]
        design = np.stack([np.ones_like(xx), xx, yy], axis=1)  # (N, 3)
        (c, gx, gy), *_ = np.linalg.lstsq(design, rgb.max(0)[bg].astype(np.float64), rcond=None)
        light_deg = math.degrees(math.atan2(gy, gx)) % 360.0
        gradient, brightness = math.hypot(gx, gy) / LIGHT_GAIN, float(c)
        hue = colorsys.rgb_to_hsv(*rgb[:, bg].mean(axis=1).tolist())[0]
    r_small = RADIUS["small"] * length_unit(height, width)
    min_area = max(4.0, 0.25 * 2 * r_small**2)  # a quarter of a small triangle's area (2 r^2)
    objects = []
    half = width // 2
    for col0, part in ((0, fg[:, :half]), (half, fg[:, half:])):
        for pix in _components(part):
            if len(pix) >= min_area:
                objects.append(_read_object(pix, rgb, height, width, col0))
    return Factors(light_deg, gradient, brightness, hue, objects)


def _angle_diff(a: float, b: float) -> float:
    """Absolute difference of two directions in degrees, in [0, 180]."""
    return abs((a - b + 180.0) % 360.0 - 180.0)


def lighting_matches(
    f: Factors,
    scene: Scene,
    alternative: Scene | None = None,
    tol_deg: float = 45.0,
    min_gradient: float = 0.3,
) -> bool:
    """The image's light direction is within ``tol_deg`` of ``scene``'s (with a readable ramp,
    ``f.gradient >= min_gradient``) and, given an ``alternative`` scene, closer to ``scene``'s."""
    if not math.isfinite(f.light_deg) or f.gradient < min_gradient:
        return False
    err = _angle_diff(f.light_deg, scene.light_deg)
    if alternative is not None and err >= _angle_diff(f.light_deg, alternative.light_deg):
        return False
    return err < tol_deg


def _object_keys(objs, check_size: bool) -> Counter:
    return Counter((o.colour, o.shape, o.side) + ((o.size,) if check_size else ()) for o in objs)


def objects_match(f: Factors, scene: Scene, check_size: bool = False) -> bool:
    """The image shows exactly the scene's multiset of (colour, shape, side) (and size, if asked)."""
    return _object_keys(f.objects, check_size) == _object_keys(scene.objects, check_size)


def dino_swap_target(scene_a: Scene, scene_b: Scene) -> Scene:
    """The ideal DINO-swap output: A's objects (its text) under B's lighting (its DINO)."""
    return dataclasses.replace(
        scene_a, light_deg=scene_b.light_deg, brightness=scene_b.brightness, hue=scene_b.hue
    )


def text_manip_target(scene: Scene) -> Scene:
    """The ideal text-manipulation output: the caption swapped left<->right (objects mirrored to the
    other side) while the lighting stays the scene's own (its DINO is unchanged).
    ``caption(text_manip_target(s)) == swap_left_right(caption(s))``."""
    return dataclasses.replace(scene, objects=flip_scene(scene).objects)


def _describe(objs) -> list[str]:
    return sorted(f"{o.size} {o.colour} {o.shape} {o.side}" for o in objs)


def score_dino_swap(
    img: torch.Tensor | np.ndarray, scene_a: Scene, scene_b: Scene, tol_deg: float = 45.0
) -> dict[str, Any]:
    """Judge one DINO-swap output (text of A, DINO of B): passed = lighting follows B (within
    ``tol_deg`` and closer to B than to A) and the objects follow A."""
    f = read_scene(img)
    lit_b = lighting_matches(f, scene_b, alternative=scene_a, tol_deg=tol_deg)
    objs_a = objects_match(f, scene_a)
    return {
        "passed": bool(lit_b and objs_a),
        "lighting_follows_b": bool(lit_b),
        "objects_follow_a": bool(objs_a),
        "light_err_b_deg": _angle_diff(f.light_deg, scene_b.light_deg),
        "light_err_a_deg": _angle_diff(f.light_deg, scene_a.light_deg),
        "hue_err_b": abs((f.hue - scene_b.hue + 0.5) % 1.0 - 0.5),
        "brightness_err_b": abs(f.brightness - scene_b.brightness),
        "gradient": f.gradient,
        "objects_read": _describe(f.objects),
        "objects_expected": _describe(scene_a.objects),
    }


def score_text_manip(
    img: torch.Tensor | np.ndarray, scene_target: Scene, tol_deg: float = 45.0
) -> dict[str, Any]:
    """Judge one text-manipulation output against ``scene_target = text_manip_target(scene_a)``:
    passed = the objects sit on the sides the swapped caption names; ``lighting_kept`` (the
    lighting still follows A's DINO) is reported, not required."""
    f = read_scene(img)
    sides = objects_match(f, scene_target)
    lit = lighting_matches(f, scene_target, tol_deg=tol_deg)
    return {
        "passed": bool(sides),
        "sides_follow_text": bool(sides),
        "lighting_kept": bool(lit),
        "light_err_deg": _angle_diff(f.light_deg, scene_target.light_deg),
        "gradient": f.gradient,
        "objects_read": _describe(f.objects),
        "objects_expected": _describe(scene_target.objects),
    }


def dino_swap_pairs(
    scenes: list[Scene], n: int, min_deg: float = 90.0, seed: int = 0
) -> list[tuple[int, int]]:
    """Up to ``n`` pairs (a, b) of distinct indices where the swap is telling: light directions at
    least ``min_deg`` apart and different object sets (so copying B's objects fails). Seeded."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, int]] = []
    for a in rng.permutation(len(scenes)):
        ok = [
            b
            for b in range(len(scenes))
            if b != a
            and _angle_diff(scenes[a].light_deg, scenes[b].light_deg) >= min_deg
            and _object_keys(scenes[a].objects, False) != _object_keys(scenes[b].objects, False)
        ]
        if ok:
            pairs.append((int(a), int(ok[rng.integers(len(ok))])))
        if len(pairs) == n:
            break
    return pairs
