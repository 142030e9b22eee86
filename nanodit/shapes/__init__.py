"""The synthetic "shapes" world: known ground truth for every path real data takes, and the judge that reads
it back.

    manifest = make_dataset("data/shapes", samples=100, seed=0, size=64)   # Stage-2 shards, seconds
    f = read_scene(ShapesCodec().decode(latent)[0])                         # image -> factors
    score_dino_swap(img, scene_a, scene_b)["passed"]

No pretrained weights can be downloaded, so every encoder has a stand-in whose output is a known function of
the scene. Modules, from the world to the judge:
- ``world``: the vocabulary, ``Scene``/``Obj``, random scenes, the flip, captions (objects and sides, never the
  lighting; the flipped caption swaps left<->right), the aspect-ratio ``buckets``;
- ``render``: a scene -> (4, H, W) RGB + object mask, exactly mirrored by ``flip_scene``;
- ``codec``: ``ShapesCodec``, the VAE stand-in (2x2 space-to-depth and a fixed scale/shift, exact, invertible);
- ``standins``: ``DinoStandIn`` (DINOv3 CLS: the lighting only) and ``T5StandIn`` (contextual token states);
- ``dataset``: ``generate_samples`` and ``make_dataset``, the Stage-2 writer call (``nanodit.data.shards``);
- ``scorers``: ``read_scene`` (image -> ``Factors``), the lighting/objects matches, the ideal outputs of the
  DINO-swap and text-manipulation tests and their scores, ``dino_swap_pairs``.

The package builds on the data package's shard writer and caption helper only; the loaders and validation
build on it (validation imports the scorers from here, so the judge lives apart from the data it judges).
"""

from nanodit.shapes.codec import CODEC_SCALE, CODEC_SHIFT, ShapesCodec
from nanodit.shapes.dataset import generate_samples, make_dataset
from nanodit.shapes.render import MIN_IMAGE_SIDE, background, object_geometry, render, shape_mask
from nanodit.shapes.scorers import (
    CHROMA_THRESHOLD,
    Factors,
    ObjectReading,
    dino_swap_pairs,
    dino_swap_target,
    lighting_matches,
    objects_match,
    read_scene,
    score_dino_swap,
    score_text_manip,
    text_manip_target,
)
from nanodit.shapes.standins import DINO_SEED, T5_SEED, VOCAB, DinoStandIn, T5StandIn, lighting_factors
from nanodit.shapes.world import (
    BG_SATURATION,
    BRIGHTNESS,
    COLOUR_WORDS,
    LIGHT_GAIN,
    MARGIN,
    PALETTE,
    RADIUS,
    SHAPES,
    SIDES,
    SIZES,
    TEMPLATES,
    Obj,
    Scene,
    buckets,
    caption,
    flip_scene,
    random_scene,
    validate_scene,
)

__all__ = [
    "BG_SATURATION",
    "BRIGHTNESS",
    "CHROMA_THRESHOLD",
    "CODEC_SCALE",
    "CODEC_SHIFT",
    "COLOUR_WORDS",
    "DINO_SEED",
    "LIGHT_GAIN",
    "MARGIN",
    "MIN_IMAGE_SIDE",
    "PALETTE",
    "RADIUS",
    "SHAPES",
    "SIDES",
    "SIZES",
    "T5_SEED",
    "TEMPLATES",
    "VOCAB",
    "DinoStandIn",
    "Factors",
    "Obj",
    "ObjectReading",
    "Scene",
    "ShapesCodec",
    "T5StandIn",
    "background",
    "buckets",
    "caption",
    "dino_swap_pairs",
    "dino_swap_target",
    "flip_scene",
    "generate_samples",
    "lighting_factors",
    "lighting_matches",
    "make_dataset",
    "object_geometry",
    "objects_match",
    "random_scene",
    "read_scene",
    "render",
    "score_dino_swap",
    "score_text_manip",
    "shape_mask",
    "text_manip_target",
    "validate_scene",
]
