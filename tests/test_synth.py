"""The synthetic shapes set: exact codec, consistent flips, stand-in encoders, and scorers that both
recognise the right picture and reject a wrong one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanodit.data.text import swap_left_right
from nanodit.shapes import (
    CODEC_SCALE,
    PALETTE,
    SHAPES,
    VOCAB,
    DinoStandIn,
    Obj,
    Scene,
    ShapesCodec,
    T5StandIn,
    buckets,
    caption,
    dino_swap_pairs,
    dino_swap_target,
    flip_scene,
    generate_samples,
    lighting_matches,
    make_dataset,
    objects_match,
    random_scene,
    read_scene,
    render,
    score_dino_swap,
    score_text_manip,
    text_manip_target,
)


def scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


def keys(scene: Scene) -> list[tuple[str, str, str]]:
    return sorted((o.colour, o.shape, o.side) for o in scene.objects)


# ---------------------------------------------------------------------------------------------
# buckets, scenes, captions


def test_buckets() -> None:
    assert buckets(64) == [(64, 64), (56, 72), (72, 56), (48, 80)]
    assert buckets(16) == [(16, 16), (14, 18), (18, 14), (12, 20)]
    for size in (16, 24, 32, 64, 128):
        for h, w in buckets(size):
            assert h % 2 == 0 and w % 2 == 0 and abs(h * w / size**2 - 1) < 0.07
    with pytest.raises(ValueError, match="size="):
        buckets(15)


def test_scene_json_roundtrip_and_errors() -> None:
    for s in scenes(20):
        assert Scene.from_json(s.to_json()) == s
    bad = scenes(1)[0].to_json()
    bad["objects"][0]["colour"] = "mauve"
    with pytest.raises(ValueError, match="colour='mauve'"):
        Scene.from_json(bad)
    with pytest.raises(ValueError, match="expected keys"):
        Scene.from_json({**scenes(1)[0].to_json(), "extra": 1})


def test_scene_distribution() -> None:
    """Both object counts, every shape/colour/side; two objects sit on different sides and differ."""
    ss = scenes(300)
    assert {len(s.objects) for s in ss} == {1, 2}
    objs = [o for s in ss for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES) and {o.colour for o in objs} == set(PALETTE)
    for s in ss:
        if len(s.objects) == 2:
            a, b = s.objects
            assert a.side != b.side and (a.colour, a.shape) != (b.colour, b.shape)


def test_caption_flip_is_the_swap() -> None:
    """The flipped scene's caption is the left<->right swap; "bright" occurs and survives the swap."""
    n_bright = 0
    for s in scenes(200):
        txt = caption(s)
        assert caption(flip_scene(s)) == swap_left_right(txt) != txt
        assert caption(text_manip_target(s)) == swap_left_right(txt)
        back = flip_scene(flip_scene(s))
        assert back.objects == s.objects and back.light_deg == pytest.approx(s.light_deg % 360.0, abs=1e-9)
        n_bright += "bright" in txt
        assert txt.count("bright") == swap_left_right(txt).count("bright")
        for o in s.objects:  # the caption names each object and its side
            assert o.shape in txt and o.size in txt and o.side in txt.lower()
    assert 20 < n_bright < 180


# ---------------------------------------------------------------------------------------------
# rendering and codec


def test_render_contract_and_mirror() -> None:
    """(4, H, W) float32, RGB in [0, 1], binary mask; deterministic; render(flip(s)) is the mirror."""
    for s, (h, w) in zip(scenes(12), buckets(16) * 3):
        img = render(s, 2 * h, 2 * w)
        assert img.shape == (4, 2 * h, 2 * w) and img.dtype == np.float32
        assert img.min() >= 0 and img.max() <= 1 and set(np.unique(img[3])) == {0.0, 1.0}
        assert np.array_equal(img, render(s, 2 * h, 2 * w))
        np.testing.assert_allclose(render(flip_scene(s), 2 * h, 2 * w), img[:, :, ::-1], atol=1e-6, rtol=0)
        assert not np.allclose(img, img[:, :, ::-1], atol=1e-3)  # and the mirror is a different picture
        # every object is at least a few pixels wide at the smoke size
        assert img[3].sum() >= 20 * len(s.objects)
    with pytest.raises(ValueError, match="must be >= 16"):
        render(s, 8, 8)


def test_codec_exact_and_layout() -> None:
    """decode(encode(x)) == x in float32; through fp16 storage the error is fp16 rounding only and the
    mask survives exactly; latent channel 4c+2i+j holds image channel c at offset (i, j)."""
    codec = ShapesCodec()
    imgs = torch.from_numpy(np.stack([render(s, 36, 28) for s in scenes(4)]))  # (B, 4, 36, 28)
    imgs[:, :3] = torch.rand_like(imgs[:, :3])  # arbitrary values too, not only rendered ones
    lat = codec.encode(imgs)
    assert lat.shape == (4, 16, 18, 14) and lat.dtype == torch.float32
    torch.testing.assert_close(codec.decode(lat), imgs, atol=1e-6, rtol=0)
    c, i, j = 2, 1, 0
    torch.testing.assert_close(
        lat[:, 4 * c + 2 * i + j], (imgs[:, c, i::2, j::2] - codec.shift) * codec.scale
    )
    # fp16 storage: |latent| <= 2.5, fp16 spacing there <= 2^-9, so the image error <= 2^-10 / scale
    back = codec.decode(lat.half())
    err = (back - imgs).abs().max().item()
    assert 0 < err <= 2**-10 / CODEC_SCALE + 1e-7
    assert torch.equal(back[:, 3], imgs[:, 3])
    # any float dtype in, float32 out, clamped
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        out = codec.decode(lat.to(dt) * 3)
        assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="latent must be"):
        codec.decode(lat[0])
    with pytest.raises(ValueError, match="image must be"):
        codec.encode(imgs[:, :3])


@pytest.mark.gpu
def test_codec_on_gpu_matches_cpu() -> None:
    codec = ShapesCodec()
    lat = codec.encode(torch.from_numpy(np.stack([render(s, 64, 48) for s in scenes(3)])))  # (3, 16, 32, 24)
    for dt in (torch.float32, torch.bfloat16):
        out = codec.decode(lat.to("cuda", dt))
        assert out.is_cuda and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), codec.decode(lat.to(dt)), atol=0, rtol=0)


def test_codec_latents_are_normalised() -> None:
    lat = np.stack(
        [s["latent"] for s in generate_samples(16, seed=3, size=16) if s["latent"].shape == (16, 16, 16)]
    )
    assert abs(lat.mean()) < 0.3 and 0.7 < lat.std() < 1.4


# ---------------------------------------------------------------------------------------------
# stand-in encoders


def test_dino_standin() -> None:
    """RMS ~1, deterministic, lighting only (objects don't move it), flip == DINO of the flipped scene."""
    dino = DinoStandIn()
    ss = scenes(20)
    embs = np.stack([dino(s) for s in ss])  # (20, Dd)
    assert embs.shape == (20, 1024) and embs.dtype == np.float32
    np.testing.assert_allclose(np.sqrt((embs**2).mean(1)), 1.0, rtol=1e-4)
    assert np.array_equal(embs[0], DinoStandIn()(ss[0]))
    assert not np.allclose(embs[0], DinoStandIn(seed=7)(ss[0]))
    s = ss[0]
    other_objects = dataclasses.replace(s, objects=ss[1].objects)
    assert np.array_equal(dino(other_objects), embs[0])
    for change in ({"light_deg": s.light_deg + 30}, {"hue": s.hue + 0.2}, {"brightness": s.brightness + 0.1}):
        assert np.abs(dino(dataclasses.replace(s, **change)) - embs[0]).max() > 0.05
    # a flip changes the embedding unless the light is vertical
    assert np.abs(dino(flip_scene(s)) - embs[0]).max() > 0.05
    np.testing.assert_allclose(
        dino(flip_scene(dataclasses.replace(s, light_deg=90.0))),
        dino(dataclasses.replace(s, light_deg=90.0)),
        atol=1e-6,
    )
    # the shard's dino_flip is the DINO of the flipped scene
    for sample in generate_samples(4, seed=1, size=16):
        scene = Scene.from_json(sample["json"]["scene"])
        assert np.array_equal(sample["dino_flip"], dino(flip_scene(scene)).astype(np.float16))
        assert np.array_equal(sample["dino"], dino(scene).astype(np.float16))


def test_t5_standin() -> None:
    """(tokens + 1, 4096), RMS ~1, case-insensitive, word order and side words matter, unknown words fail."""
    t5 = T5StandIn()
    txt = "a large red circle on the left and a small blue square on the right"
    e = t5(txt)
    assert e.shape == (len(txt.split()) + 1, 4096) and e.dtype == np.float32
    assert 0.8 < np.sqrt((e**2).mean()) < 1.2
    assert np.array_equal(e, T5StandIn()(txt)) and np.array_equal(t5(txt.upper()), e)
    reordered = t5("a red large circle on the left and a small blue square on the right")
    assert np.abs(reordered - e).max() > 0.1
    # same bag of words, different order: the sequences differ row by row and as sets
    swapped = t5(swap_left_right(txt))
    assert np.abs(swapped - e).max() > 0.1 and not np.allclose(np.sort(swapped, 0), np.sort(e, 0), atol=0.1)
    # clause context: the state of "left" depends on which object it places
    other = t5("a small blue square on the left and a large red circle on the right")
    assert np.abs(other[6] - e[6]).max() > 0.1
    for s in scenes(100):
        t5(caption(s))  # the vocabulary covers every caption
    with pytest.raises(ValueError, match="unknown word 'pentagon'") as info:
        t5("a red pentagon on the left")
    assert "\n" not in str(info.value)
    assert set(VOCAB) >= {"left", "right", "bright", "yellow"}


# ---------------------------------------------------------------------------------------------
# samples and shards


def test_generate_samples_deterministic_and_consistent() -> None:
    """Same seed -> identical bytes; a different seed differs. Each sample is self-consistent: latents
    decode to the scene's render and its mirror, flip texts and T5 states match the swap."""
    a, b = list(generate_samples(8, seed=5, size=16)), list(generate_samples(8, seed=5, size=16))
    c = list(generate_samples(8, seed=6, size=16))
    arrays = ("latent", "latent_flip", "dino", "dino_flip", "t5", "t5_flip")
    for x, y in zip(a, b):
        assert x["json"] == y["json"] and x["txt"] == y["txt"]
        for k in arrays:
            assert x[k].dtype == np.float16 and x[k].tobytes() == y[k].tobytes()
    assert any(x["latent"].tobytes() != z["latent"].tobytes() for x, z in zip(a, c))
    codec, t5 = ShapesCodec(), T5StandIn()
    for i, s in enumerate(a):
        h, w = buckets(16)[i % 4]
        assert s["json"]["bucket"] == [h, w] and s["json"]["size"] == [2 * h, 2 * w]
        assert s["json"]["id"] == s["__key__"] == f"shapes-{i:05d}"
        scene = Scene.from_json(s["json"]["scene"])
        img = torch.from_numpy(render(scene, 2 * h, 2 * w))
        dec = codec.decode(torch.from_numpy(np.stack([s["latent"], s["latent_flip"]])))  # (2, 4, 2h, 2w)
        torch.testing.assert_close(dec[0], img, atol=2**-10 / CODEC_SCALE + 1e-6, rtol=0)
        torch.testing.assert_close(dec[1], img.flip(-1), atol=2**-10 / CODEC_SCALE + 1e-6, rtol=0)
        assert s["txt"] == caption(scene) and s["flip.txt"] == swap_left_right(s["txt"])
        assert np.array_equal(s["t5_flip"], t5(s["flip.txt"]).astype(np.float16))


def test_make_dataset_writes_buckets(tmp_path) -> None:
    """10 samples over 4 buckets -> 3, 3, 2, 2; the shards pass the checker and read back to the same scenes."""
    from nanodit.data.shards import check_dir, read_all

    manifest = make_dataset(tmp_path / "shapes", samples=10, seed=0, size=16)
    counts = {k: v["count"] for k, v in manifest["buckets"].items()}
    assert counts == {"16x16": 3, "14x18": 3, "18x14": 2, "12x20": 2}
    assert manifest["name"] == "shapes" and manifest["codec"] == ShapesCodec().manifest()
    assert manifest["dino"]["dim"] == manifest["dino_dim"] == 1024 and manifest["t5_dim"] == 4096
    assert manifest["seed"] == 0 and manifest["size"] == 16
    assert check_dir(tmp_path / "shapes") == (counts, None)
    _, groups, _ = read_all(tmp_path / "shapes")
    codec = ShapesCodec.from_manifest(manifest)
    for samples in groups.values():
        for s in samples:
            scene = Scene.from_json(s.meta["scene"])
            f = read_scene(codec.decode(torch.from_numpy(s.latent)[None])[0])
            assert objects_match(f, scene, check_size=True) and lighting_matches(f, scene, tol_deg=1.0)


# ---------------------------------------------------------------------------------------------
# scorers


@pytest.mark.parametrize("side", [32, 128])
def test_read_scene_recovers_every_factor(side: int) -> None:
    """60 random scenes at side x side, with and without the mask channel: every object (colour,
    shape, side, size) and the lighting (direction within 1 degree, brightness, hue) read back."""
    for s in scenes(60, seed=side):
        img = render(s, side, side)
        for im in (img, img[:3], torch.from_numpy(img)):
            f = read_scene(im)
            assert objects_match(f, s, check_size=True), (s, f)
            assert lighting_matches(f, s, tol_deg=1.0)
            assert abs(f.brightness - s.brightness) < 1e-3 and abs((f.hue - s.hue + 0.5) % 1 - 0.5) < 1e-3


def test_read_scene_all_buckets_smoke_size() -> None:
    for i, s in enumerate(scenes(60, seed=9)):
        h, w = buckets(16)[i % 4]
        f = read_scene(render(s, 2 * h, 2 * w))
        assert objects_match(f, s, check_size=True) and lighting_matches(f, s, tol_deg=1.0)


def blur(img: np.ndarray, sigma: float) -> torch.Tensor:
    """Gaussian blur of (C, H, W), edges replicated: a stand-in for a generated image's softness."""
    r = int(3 * sigma) + 1
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    x = torch.from_numpy(img)[:, None]  # (C, 1, H, W)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x[:, 0]  # (C, H, W)


def test_read_scene_robust_to_blur_noise_and_specks() -> None:
    """Blur (2 px at 128), noise and stray mask specks do not change the reading."""
    gen = torch.Generator().manual_seed(0)
    for s in scenes(30, seed=4):
        img = blur(render(s, 128, 128), 2.0) + 0.03 * torch.randn(4, 128, 128, generator=gen)
        img[3, torch.randint(0, 128, (20,), generator=gen), torch.randint(0, 128, (20,), generator=gen)] = 1.0
        f = read_scene(img)
        assert objects_match(f, s) and lighting_matches(f, s, tol_deg=10.0)


def test_scorers_say_no() -> None:
    """A render of another scene fails: any single changed object factor breaks objects_match, a light
    direction 90 degrees off breaks lighting_matches, and unrelated scenes mostly fail both."""
    ss = scenes(60, seed=11)
    for s in ss[:20]:
        f = read_scene(render(s, 64, 64))
        o = s.objects[0]
        others = {
            "colour": dataclasses.replace(o, colour=next(c for c in PALETTE if c != o.colour)),
            "shape": dataclasses.replace(o, shape=next(x for x in SHAPES if x != o.shape)),
            "side": dataclasses.replace(o, side="right" if o.side == "left" else "left"),
        }
        for wrong in others.values():
            changed = dataclasses.replace(s, objects=(wrong,) + s.objects[1:])
            if keys(changed) != keys(s):
                assert not objects_match(f, changed)
        assert not objects_match(
            f, dataclasses.replace(s, objects=s.objects[:1] if len(s.objects) == 2 else s.objects * 2)
        )
        assert not lighting_matches(f, dataclasses.replace(s, light_deg=s.light_deg + 90.0))
    wrong_obj = wrong_light = total = 0
    for a, b in zip(ss, ss[1:]):
        f = read_scene(render(b, 64, 64))
        total += 1
        wrong_obj += keys(a) != keys(b) and not objects_match(f, a)
        wrong_light += not lighting_matches(f, a)
        assert objects_match(f, a) == (keys(a) == keys(b))
    assert wrong_obj > 0.8 * total and wrong_light > 0.6 * total
    flat = render(ss[0], 64, 64)
    flat[:3] = 0.5  # no light ramp: the direction is unreadable, so no lighting claim passes
    assert not lighting_matches(read_scene(flat), ss[0])


def test_dino_swap_scorer() -> None:
    """The ideal swap (A's objects, B's lighting) passes; a copy of A or of B fails."""
    ss = scenes(40, seed=12)
    pairs = dino_swap_pairs(ss, n=15)
    assert len(pairs) == 15 and all(a != b for a, b in pairs)
    for a, b in pairs:
        A, B = ss[a], ss[b]
        good = score_dino_swap(render(dino_swap_target(A, B), 64, 64), A, B)
        assert good["passed"] and good["lighting_follows_b"] and good["objects_follow_a"], good
        copy_a = score_dino_swap(render(A, 64, 64), A, B)
        assert not copy_a["passed"] and not copy_a["lighting_follows_b"] and copy_a["objects_follow_a"]
        copy_b = score_dino_swap(render(B, 64, 64), A, B)
        assert not copy_b["passed"] and copy_b["lighting_follows_b"] and not copy_b["objects_follow_a"]


def test_text_manip_scorer() -> None:
    """The ideal manipulation (sides swapped, A's lighting) passes; the unmanipulated A fails."""
    for s in scenes(30, seed=13):
        target = text_manip_target(s)
        assert target.light_deg == s.light_deg and keys(target) != keys(s)
        good = score_text_manip(render(target, 64, 64), target)
        assert good["passed"] and good["sides_follow_text"] and good["lighting_kept"], good
        bad = score_text_manip(render(s, 64, 64), target)
        assert not bad["passed"] and not bad["sides_follow_text"] and bad["lighting_kept"]
        # a mirror image has the right sides but mirrored lighting: reported, not required
        mirror = score_text_manip(render(flip_scene(s), 64, 64), target)
        assert mirror["sides_follow_text"]


def test_read_scene_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="read_scene: image must be"):
        read_scene(np.zeros((5, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="read_scene: image must be"):
        read_scene(np.zeros((32, 32, 3), dtype=np.float32))


def test_obj_geometry_separates_sides() -> None:
    """At every bucket of both sizes, two large objects never touch each other or the centre line."""
    for size in (16, 64):
        for h, w in buckets(size):
            for ax in (0.0, 1.0):
                s = Scene(
                    0.0,
                    0.5,
                    0.0,
                    (
                        Obj("square", "red", "large", "left", ax, 0.0),
                        Obj("square", "blue", "large", "right", ax, 1.0),
                    ),
                )
                img = render(s, 2 * h, 2 * w)
                assert (
                    img[3, :, w - 1 : w + 1].sum() == 0
                    and img[3, :, 0].sum() == 0
                    and img[3, :, -1].sum() == 0
                )
                assert objects_match(read_scene(img), s, check_size=True)


def test_components_are_the_8_connected_components_in_row_major_order() -> None:
    """The scorer's connected components against a flood fill written out plainly, on seeded random masks
    (empty, speckled and dense): the same components, each pixel list in row-major order, components ordered
    by their largest pixel index (the label the propagation leaves)."""
    from nanodit.shapes.scorers import _components

    def flood(mask: np.ndarray) -> list[np.ndarray]:
        h, w = mask.shape
        seen = np.zeros_like(mask)
        comps = []
        for r0, c0 in zip(*np.nonzero(mask)):
            if seen[r0, c0]:
                continue
            stack, pix = [(r0, c0)], []
            seen[r0, c0] = True
            while stack:
                r, c = stack.pop()
                pix.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            stack.append((rr, cc))
            comps.append(np.array(sorted(pix)).reshape(-1, 2))
        return sorted(comps, key=lambda p: p[-1, 0] * w + p[-1, 1])

    rng = np.random.default_rng(0)
    for trial in range(60):
        h, w = rng.integers(3, 30, size=2)
        mask = rng.random((h, w)) < [0.0, 0.1, 0.5, 0.9][trial % 4]
        got, want = _components(mask), flood(mask)
        assert len(got) == len(want), trial
        assert all(np.array_equal(g, x) for g, x in zip(got, want)), trial
