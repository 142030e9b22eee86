"""Rendering a scene: (4, H, W) RGB + object mask with hard pixel-centre edges, so it is deterministic and
``render(flip_scene(s))`` is exactly the mirror image of ``render(s)``.

    img = render(scene, 2 * h, 2 * w)   # the image behind a latent of bucket (h, w)

Coordinates: pixel centres in a centred frame, x to the right, y down for rows, so a horizontal flip negates x
exactly. Letters: H, W image size.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

from nanodit.shapes.world import BG_SATURATION, LIGHT_GAIN, MARGIN, PALETTE, RADIUS, SHAPES, Obj, Scene

MIN_IMAGE_SIDE = 16  # render and read_scene refuse an image with a shorter side


def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred pixel-centre coordinates: x (W,) to the right, y (H,) down; exact half-integers, so
    column W-1-j has exactly -x[j]."""
    x = np.arange(width, dtype=np.float64) + 0.5 - width / 2  # (W,)
    y = np.arange(height, dtype=np.float64) + 0.5 - height / 2  # (H,)
    return x, y


def length_unit(height: int, width: int) -> float:
    """Length unit for object sizes: the smaller of the image height and the half width."""
    return min(height, width / 2)


def object_geometry(obj: Obj, height: int, width: int) -> tuple[float, float, float]:
    """(cx, cy, r) of ``obj`` in centred pixel units at image size (height, width): centre and half-width.
    The object keeps MARGIN*u from the centre line and the border, so its side is never ambiguous."""
    u = length_unit(height, width)
    r, m = RADIUS[obj.size] * u, MARGIN * u
    sign = -1.0 if obj.side == "left" else 1.0
    cx = sign * (m + r + obj.ax * (width / 2 - 2 * m - 2 * r))
    cy = (obj.ay - 0.5) * (height - 2 * m - 2 * r)
    return cx, cy, r


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside test for a shape of half-width r centred at dx = dy = 0 (dy down): circle, axis-aligned
    square, or an upward isosceles triangle (apex at the top, base 2r at the bottom). Even in dx."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"shape={shape!r}: not one of {list(SHAPES)}")


def background(scene: Scene, height: int, width: int) -> np.ndarray:
    """(3, H, W) float64: colour of hue ``scene.hue`` and saturation BG_SATURATION, its brightness a
    linear ramp b + LIGHT_GAIN * (p . d) / max(H, W) along the light direction d."""
    x, y = pixel_grid(height, width)
    th = math.radians(scene.light_deg)
    ramp = (x[None, :] * math.cos(th) - y[:, None] * math.sin(th)) / max(height, width)  # (H, W); y up
    value = np.clip(scene.brightness + LIGHT_GAIN * ramp, 0.0, 1.0)  # (H, W)
    tint = np.array(colorsys.hsv_to_rgb(scene.hue % 1.0, BG_SATURATION, 1.0))  # (3,)
    return tint[:, None, None] * value[None]  # (3, H, W)


def render(scene: Scene, height: int, width: int) -> np.ndarray:
    """(4, H, W) float32: RGB in [0, 1] and the object mask in {0, 1}; hard pixel-centre edges, so
    the output is deterministic and exactly mirrored by ``flip_scene``. The latent of bucket (h, w)
    comes from ``render(scene, 2h, 2w)``."""
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        raise ValueError(f"render: image size {height}x{width}: both sides must be >= {MIN_IMAGE_SIDE}")
    img = np.zeros((4, height, width), dtype=np.float64)
    img[:3] = background(scene, height, width)
    x, y = pixel_grid(height, width)
    for o in scene.objects:
        cx, cy, r = object_geometry(o, height, width)
        inside = shape_mask(o.shape, x[None, :] - cx, y[:, None] - cy, r)  # (H, W)
        img[:3, inside] = np.array(PALETTE[o.colour])[:, None]
        img[3, inside] = 1.0
    return img.astype(np.float32)
