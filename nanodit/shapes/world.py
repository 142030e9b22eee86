"""The shapes world: its vocabulary, its scenes and their captions.

    scene = random_scene(np.random.default_rng(0))   # a lit background and 1-2 objects
    caption(scene)                                    # "a large red circle on the left and ..."
    caption(flip_scene(scene))                        # the mirror image's caption: left <-> right swapped

A scene is a background lit from a direction (a linear brightness ramp, so the direction reads back), with a
brightness and a hue, and 1-2 flat-coloured objects (shape, colour, size, side). Captions name the objects and
their sides, never the lighting. Light direction is in degrees counter-clockwise from +x with y UP (0 = lit from
the right, 90 = from the top). The buckets are the latent (h, w) sizes the data set spreads its samples over.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SIDES = ("left", "right")
# saturated colours, far apart in RGB (nearest pair: purple-blue 0.52) and far from the pale background
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.85),
}
COLOUR_WORDS = {"yellow": "bright yellow"}  # so some captions hold "bright", which the flip swap must keep
RADIUS = {"small": 0.25, "large": 0.40}  # object half-width as a fraction of u = min(H, W/2)
MARGIN = 0.08  # free space (of u) between an object and the centre line / the image border
LIGHT_GAIN = 0.45  # brightness change per image side (max(H, W)) along the light direction
BRIGHTNESS = (0.40, 0.65)  # background brightness at the image centre; with the ramp stays in (0, 1)
BG_SATURATION = 0.30  # pale background: chroma <= 0.3, objects' chroma >= 0.65
TEMPLATES = 3  # caption templates, see caption()


def buckets(size: int) -> list[tuple[int, int]]:
    """The 4 latent (h, w) aspect-ratio buckets for a square side ``size``, all even (patch 2):
    1:1, two ~4:5 (tall and wide) and one ~3:5 wide, areas within ~6% of size^2.
    size 64 -> (64,64),(56,72),(72,56),(48,80); size 16 -> (16,16),(14,18),(18,14),(12,20)."""
    if not isinstance(size, int) or size < 8 or size % 2:
        raise ValueError(f"size={size!r}: the latent side must be an even int >= 8")
    d1, d2 = 2 * round(size / 16), 2 * round(size / 8)
    return [(size, size), (size - d1, size + d1), (size + d1, size - d1), (size - d2, size + d2)]


# ---------------------------------------------------------------------------------------------
# scenes and captions


@dataclass(frozen=True)
class Obj:
    """One object. Its position is relative to the room its side leaves at any image size:
    ax 0 = next to the centre line, 1 = at the outer border; ay 0 = top, 1 = bottom."""

    shape: str
    colour: str
    size: str
    side: str
    ax: float
    ay: float


@dataclass(frozen=True)
class Scene:
    """A background lit from ``light_deg`` (brightness at the centre, hue in turns) and 1-2 objects,
    on different sides when there are 2. Captions mention the objects in list order."""

    light_deg: float
    brightness: float
    hue: float
    objects: tuple[Obj, ...]
    template: int = 0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; ``Scene.from_json(s.to_json()) == s``."""
        d = dataclasses.asdict(self)
        d["objects"] = [dataclasses.asdict(o) for o in self.objects]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Scene:
        """Inverse of ``to_json``; a missing/unknown key or an out-of-vocabulary value is an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        if (
            not isinstance(d, dict)
            or set(d) - names
            or {"light_deg", "brightness", "hue", "objects"} - set(d)
        ):
            raise ValueError(f"scene json: expected keys {sorted(names)}, got {d!r}")
        objs = []
        for o in d["objects"]:
            if not isinstance(o, dict) or set(o) != {f.name for f in dataclasses.fields(Obj)}:
                raise ValueError(f"scene json: bad object {o!r}")
            objs.append(Obj(**o))
        scene = cls(**{**d, "objects": tuple(objs)})
        validate_scene(scene)
        return scene


def validate_scene(scene: Scene) -> None:
    """Raise a one-line ValueError naming the field of ``scene`` that is out of range."""
    if not 1 <= len(scene.objects) <= 2:
        raise ValueError(f"scene.objects: 1 or 2 objects, got {len(scene.objects)}")
    for o in scene.objects:
        for name, value, allowed in (
            ("shape", o.shape, SHAPES),
            ("colour", o.colour, PALETTE),
            ("size", o.size, SIZES),
            ("side", o.side, SIDES),
        ):
            if value not in allowed:
                raise ValueError(f"scene object {name}={value!r}: not one of {sorted(allowed)}")
        if not (0.0 <= o.ax <= 1.0 and 0.0 <= o.ay <= 1.0):
            raise ValueError(f"scene object ax={o.ax}, ay={o.ay}: must lie in [0, 1]")
    if len(scene.objects) == 2 and scene.objects[0].side == scene.objects[1].side:
        raise ValueError("scene.objects: two objects must be on different sides")
    if not 0 <= scene.template < TEMPLATES:
        raise ValueError(f"scene.template={scene.template}: must be in [0, {TEMPLATES})")


def random_scene(rng: np.random.Generator) -> Scene:
    """A random scene: 1 object (40%) or 2 on different sides whose (colour, shape) differ, so that a
    left<->right swap always changes the picture."""
    n = 1 if rng.random() < 0.4 else 2
    sides = list(rng.permutation(SIDES))[:n]  # also the mention order
    objs: list[Obj] = []
    for side in sides:
        while True:
            shape, colour = SHAPES[rng.integers(3)], list(PALETTE)[rng.integers(len(PALETTE))]
            if all((o.shape, o.colour) != (shape, colour) for o in objs):
                break
        objs.append(
            Obj(shape, colour, SIZES[rng.integers(2)], str(side), float(rng.random()), float(rng.random()))
        )
    return Scene(
        light_deg=float(rng.uniform(0.0, 360.0)),
        brightness=float(rng.uniform(*BRIGHTNESS)),
        hue=float(rng.random()),
        objects=tuple(objs),
        template=int(rng.integers(TEMPLATES)),
    )


def flip_scene(scene: Scene) -> Scene:
    """The horizontal mirror: objects change side (same distance from the centre line), the light
    direction mirrors (180 - angle); brightness, hue and the mention order stay."""
    objs = tuple(dataclasses.replace(o, side="right" if o.side == "left" else "left") for o in scene.objects)
    return dataclasses.replace(scene, light_deg=(180.0 - scene.light_deg) % 360.0, objects=objs)


def caption(scene: Scene) -> str:
    """The caption: objects and their sides in list order, never the lighting. Templates:
    0 "a large red circle on the left and a small blue square on the right";
    1 "on the left, a large red circle; on the right, a small blue square";
    2 "Left: a large red circle. Right: a small blue square."
    ``caption(flip_scene(s)) == swap_left_right(caption(s))``."""
    phrases = [
        (f"a {o.size} {COLOUR_WORDS.get(o.colour, o.colour)} {o.shape}", o.side) for o in scene.objects
    ]
    if scene.template == 0:
        return " and ".join(f"{p} on the {s}" for p, s in phrases)
    if scene.template == 1:
        return "; ".join(f"on the {s}, {p}" for p, s in phrases)
    return " ".join(f"{s.capitalize()}: {p}." for p, s in phrases)
