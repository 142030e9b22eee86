"""The synthetic "shapes" dataset: known ground truth for every path real data takes.

    manifest = make_dataset("data/shapes", samples=100, seed=0, size=64)   # Stage-2 shards, seconds
    f = read_scene(ShapesCodec().decode(latent)[0])                         # image -> factors
    score_dino_swap(img, scene_a, scene_b)["passed"]

No pretrained weights can be downloaded, so every encoder has a stand-in whose output is a known
function of the scene:
- scene: a lit background (light direction, brightness, hue: a linear brightness ramp along the light
  direction, so the direction reads back) and 1-2 flat-coloured objects (shape, colour, size, side);
- caption: names the objects and their sides, never the lighting; flipped caption = left<->right swap;
- ``ShapesCodec`` (the VAE): RGB + object-mask image (4, 2h, 2w) <-> latent (16, h, w) by a 2x2
  space-to-depth and a fixed scale/shift, exact and invertible;
- ``DinoStandIn`` (DINOv3 CLS): a seeded nonlinear projection of the LIGHTING factors only, so in a
  DINO swap the lighting must follow the DINO and the objects the text;
- ``T5StandIn`` (T5 hidden states): a seeded token table + sinusoidal positions + a clause context
  term (real T5 states are contextual), so word order matters and each side word carries its objects;
- scorers read an image back into factors (``read_scene``) and judge the DINO-swap and
  text-manipulation tests objectively.

Coordinates: pixel centres in a centred frame, x to the right, y down for rows, so a horizontal flip
negates x exactly and ``render(flip_scene(s))`` is the mirror image of ``render(s)``. Light direction
is in degrees counter-clockwise from +x with y UP (0 = lit from the right, 90 = from the top).
Letters: B batch, H, W image size, h, w latent size (H = 2h), Dd DINO width, L T5 tokens.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nanodit.data.text import swap_left_right

# ---------------------------------------------------------------------------------------------
# the world: its vocabulary and its constants

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

# codec: latent = (space_to_depth(img) - SHIFT) * SCALE. Over generated images (RGB + a mostly-zero
# mask) the pixel mean is 0.36 and the std 0.26, so this gives ~zero mean, unit variance; both
# constants are exact binary fractions, so encode/decode add no rounding beyond float32's own
CODEC_SHIFT = 0.375
CODEC_SCALE = 4.0
DINO_SEED = 1  # stand-in weights are fixed, independent of the dataset seed
T5_SEED = 2
MIN_IMAGE_SIDE = 16


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


# ---------------------------------------------------------------------------------------------
# rendering


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred pixel-centre coordinates: x (W,) to the right, y (H,) down; exact half-integers, so
    column W-1-j has exactly -x[j]."""
    x = np.arange(width, dtype=np.float64) + 0.5 - width / 2  # (W,)
    y = np.arange(height, dtype=np.float64) + 0.5 - height / 2  # (H,)
    return x, y


def _unit(height: int, width: int) -> float:
    """Length unit for object sizes: the smaller of the image height and the half width."""
    return min(height, width / 2)


def object_geometry(obj: Obj, height: int, width: int) -> tuple[float, float, float]:
    """(cx, cy, r) of ``obj`` in centred pixel units at image size (height, width): centre and half-width.
    The object keeps MARGIN*u from the centre line and the border, so its side is never ambiguous."""
    u = _unit(height, width)
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
    x, y = _grid(height, width)
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
    x, y = _grid(height, width)
    for o in scene.objects:
        cx, cy, r = object_geometry(o, height, width)
        inside = shape_mask(o.shape, x[None, :] - cx, y[:, None] - cy, r)  # (H, W)
        img[:3, inside] = np.array(PALETTE[o.colour])[:, None]
        img[3, inside] = 1.0
    return img.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# codec: the VAE stand-in


class ShapesCodec:
    """Exact, invertible VAE stand-in. ``encode``: image (B, 4, 2h, 2w) in [0, 1] -> latent
    (B, 16, h, w) = (pixel_unshuffle(img, 2) - shift) * scale; ``decode`` inverts it, takes any float
    dtype on any device, returns float32 clamped to [0, 1]. Latent channel 4c + 2i + j holds image
    channel c at pixel offset (i, j) of each 2x2 cell."""

    name = "shapes-s2d"
    channels = 16
    factor = 2

    def __init__(self, scale: float = CODEC_SCALE, shift: float = CODEC_SHIFT):
        self.scale, self.shift = float(scale), float(shift)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ShapesCodec:
        """The codec a shapes manifest names (``manifest["codec"]``)."""
        c = manifest.get("codec", {})
        if c.get("name") != cls.name:
            raise ValueError(f"manifest codec.name={c.get('name')!r}: expected {cls.name!r}")
        return cls(scale=c["scale"], shift=c["shift"])

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "shift": self.shift}

    def encode(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:
        img = torch.as_tensor(img)
        if img.ndim != 4 or img.shape[1] != 4 or img.shape[2] % 2 or img.shape[3] % 2:
            raise ValueError(f"ShapesCodec.encode: image must be (B, 4, 2h, 2w), got {tuple(img.shape)}")
        z = F.pixel_unshuffle(img.float(), 2)  # (B, 16, h, w)
        return (z - self.shift) * self.scale

    def decode(self, latent: torch.Tensor | np.ndarray) -> torch.Tensor:
        latent = torch.as_tensor(latent)
        if latent.ndim != 4 or latent.shape[1] != 16:
            raise ValueError(f"ShapesCodec.decode: latent must be (B, 16, h, w), got {tuple(latent.shape)}")
        z = latent.float() / self.scale + self.shift  # (B, 16, h, w)
        return F.pixel_shuffle(z, 2).clamp_(0.0, 1.0)  # (B, 4, 2h, 2w)


# ---------------------------------------------------------------------------------------------
# conditioning stand-ins


def lighting_factors(scene: Scene) -> np.ndarray:
    """(5,) the scene's lighting, each of order 1: cos/sin of the light direction, centred brightness,
    cos/sin of the hue. A flip negates the first."""
    th, hue = math.radians(scene.light_deg), 2 * math.pi * scene.hue
    b = (scene.brightness - sum(BRIGHTNESS) / 2) / ((BRIGHTNESS[1] - BRIGHTNESS[0]) / 2)
    return np.array([math.cos(th), math.sin(th), b, math.cos(hue), math.sin(hue)])


class DinoStandIn:
    """DINOv3 CLS stand-in: a fixed seeded 2-layer projection of ``lighting_factors`` (no object
    colour, shape or position enters), RMS-normalised to 1. ``dino(flip_scene(s))`` is the flipped
    embedding, as DINO of a mirrored image would be."""

    name = "shapes-dino-standin"

    def __init__(self, dim: int = 1024, seed: int = DINO_SEED, hidden: int = 64):
        rng = np.random.default_rng(seed)
        self.dim, self.seed = dim, seed
        self.w1 = 0.6 * rng.standard_normal((hidden, 5))  # pre-activations of order 1: tanh not saturated
        self.b1 = rng.uniform(-1.0, 1.0, hidden)
        self.w2 = rng.standard_normal((dim, hidden))

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "seed": self.seed}

    def __call__(self, scene: Scene) -> np.ndarray:
        """(Dd,) float32 embedding of the scene's lighting."""
        h = np.tanh(self.w1 @ lighting_factors(scene) + self.b1)  # (hidden,)
        y = self.w2 @ h  # (Dd,)
        return (y / np.sqrt(np.mean(y * y))).astype(np.float32)


_TOKEN = re.compile(r"\w+|[^\w\s]")
VOCAB = tuple(
    sorted(
        {"a", "on", "the", "and", "left", "right", ",", ";", ":", "."}
        | set(SHAPES)
        | set(SIZES)
        | {w for c in PALETTE for w in COLOUR_WORDS.get(c, c).split()}
    )
)
_CLAUSE_END = {"and", ";", "."}


class T5StandIn:
    """T5 stand-in: (L, Dt) float32 hidden states of a caption from the fixed vocabulary ``VOCAB``
    (case-insensitive; an unknown word is a one-line error naming it), L = tokens + 1 end token.
    State = token embedding + sinusoidal position + a clause context term (the sum of a second
    embedding over the tokens of its clause, clauses ending at "and", ";", "."): like T5's
    contextual states, "left" then carries the object it places, so cross-attention can bind them.
    Values have RMS ~ 1."""

    name = "shapes-t5-standin"

    def __init__(self, dim: int = 4096, seed: int = T5_SEED, vocab: tuple[str, ...] = VOCAB):
        if dim % 2:
            raise ValueError(f"T5StandIn: dim={dim} must be even (sin|cos positions)")
        rng = np.random.default_rng(seed)
        self.dim, self.seed, self.vocab = dim, seed, vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.eos = len(vocab)  # like T5's </s>
        self.tok = rng.standard_normal((len(vocab) + 1, dim))
        self.ctx = rng.standard_normal((len(vocab) + 1, dim))
        self._pos = np.zeros((0, dim))

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "seed": self.seed}

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in _TOKEN.findall(text.lower()):
            if word not in self.index:
                raise ValueError(
                    f"T5StandIn: unknown word {word!r} in caption {text!r} (vocabulary: {' '.join(self.vocab)})"
                )
            ids.append(self.index[word])
        return ids + [self.eos]

    def positions(self, n: int) -> np.ndarray:
        """(n, Dt) [sin | cos] of position / 10000^(2i/Dt); computed once for the longest caption seen."""
        if self._pos.shape[0] < n:
            omega = 1.0 / 10000 ** (np.arange(self.dim // 2) / (self.dim // 2))  # (Dt/2,)
            ang = np.arange(max(n, 64))[:, None] * omega[None]  # (n', Dt/2)
            self._pos = np.concatenate([np.sin(ang), np.cos(ang)], axis=1)  # (n', Dt)
        return self._pos[:n]

    def __call__(self, text: str) -> np.ndarray:
        """(L, Dt) float32 hidden states, unpadded."""
        ids = self.tokenize(text)
        ctx = np.zeros((len(ids), self.dim))  # (L, Dt)
        start = 0
        for i, t in enumerate(ids):
            if t == self.eos or self.vocab[t] in _CLAUSE_END:  # tokens start..i-1 form a clause
                if i > start:
                    ctx[start:i] = self.ctx[ids[start:i]].sum(0) / math.sqrt(i - start)
                start = i + 1
        h = self.tok[ids] + self.positions(len(ids)) + ctx  # (L, Dt)
        return (h / math.sqrt(2.5)).astype(np.float32)  # variances 1 + 0.5 + 1


# ---------------------------------------------------------------------------------------------
# the dataset


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
    from nanodit.data.shards import ShardWriter  # here, not at the top: shards may import this module

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


# ---------------------------------------------------------------------------------------------
# scorers: image -> factors -> pass/fail

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
    """8-connected components of a bool (H, W) mask, each as an (N, 2) array of (row, col); found by
    propagating the largest pixel id over neighbours until nothing changes (objects are small)."""
    h, w = mask.shape
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)  # (H, W)
    while True:
        p = np.pad(lab, 1)  # (H+2, W+2)
        nb = np.max([p[i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0)  # (H, W)
        new = np.where(mask, nb, 0)
        if np.array_equal(new, lab):
            break
        lab = new
    return [np.argwhere(lab == v) for v in np.unique(lab[lab > 0])]


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
    size = "large" if best_r / _unit(height, width) > sum(RADIUS.values()) / 2 else "small"
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
        x, y = _grid(height, width)
        s = max(height, width)
        xx, yy = np.broadcast_to(x[None, :] / s, bg.shape)[bg], np.broadcast_to(-y[:, None] / s, bg.shape)[bg]
        design = np.stack([np.ones_like(xx), xx, yy], axis=1)  # (N, 3)
        (c, gx, gy), *_ = np.linalg.lstsq(design, rgb.max(0)[bg].astype(np.float64), rcond=None)
        light_deg = math.degrees(math.atan2(gy, gx)) % 360.0
        gradient, brightness = math.hypot(gx, gy) / LIGHT_GAIN, float(c)
        hue = colorsys.rgb_to_hsv(*rgb[:, bg].mean(axis=1).tolist())[0]
    min_area = max(4.0, 0.25 * 2 * (RADIUS["small"] * _unit(height, width)) ** 2)  # small triangle: 2r^2
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
