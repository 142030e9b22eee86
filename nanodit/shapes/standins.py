"""The encoder stand-ins: no pretrained weights can be downloaded, so the DINOv3 and T5 encoders are fixed,
seeded functions of the scene and its caption.

    dino = DinoStandIn()(scene)     # (Dd,) float32: the scene's LIGHTING only
    t5 = T5StandIn()(caption)       # (L, Dt) float32, unpadded

- ``DinoStandIn`` (DINOv3 CLS): a seeded nonlinear projection of the lighting factors only, so in a DINO swap
  the lighting must follow the DINO and the objects the text;
- ``T5StandIn`` (T5 hidden states): a seeded token table + sinusoidal positions + a clause context term (real
  T5 states are contextual), so word order matters and each side word carries its objects.
Letters: Dd DINO width, L T5 tokens, Dt T5 width.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from nanodit.shapes.world import BRIGHTNESS, COLOUR_WORDS, PALETTE, SHAPES, SIZES, Scene

DINO_SEED = 1  # stand-in weights are fixed, independent of the dataset seed
T5_SEED = 2


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
