"""Validation: it must be able to say NO, and show on every run that it can.

Fast tests use an oracle "model" whose Euler path lands exactly on a chosen target (v = (x - target) / t),
so the tests know the right answer: the intact oracle passes every test and reaches GO; an oracle that
ignores the caption fails text manipulation, one with a constant DINO fails the DINO swap; an untrained
NanoDiT fails reconstruction. An oracle routed through stand-ins of NanoDiT's two conditioning paths gives
the self-test known answers: each planted fault fails its target, and where the faults cannot reach the
paths a GO becomes INCOMPLETE. Real-data paths run on random shards with a tiny random AutoencoderKL saved
to and loaded from a tmp folder (nothing is downloaded). The trainer's validation and the CLI run on smoke
runs. The self-test's faults on a real NanoDiT make its outputs blind to the caption / the DINO.

A model trained far enough to pass the scorers needs a GPU: the GPU test (marked gpu and slow) trains the
default ``--config nano`` recipe, 5k steps (minutes on an H200), and expects GO with every fault caught.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_scores import alexnet_weights

from nanodit.config import load_config
from nanodit.data.shards import ShardWriter, read_all
from nanodit.shapes import Scene, ShapesCodec, flip_scene, make_dataset, render
from nanodit.validation import TESTS, read_val_samples, run_validation, select_cases
from nanodit.validation.cli import main
from nanodit.validation.metrics import load_lpips
from nanodit.validation.report import decision_lines
from nanodit.validation.sampling import case_noise, generate
from nanodit.validation.selftest import planted
from nanodit.validation.tools import Tools, load_decoder, load_tools


def _key(a: torch.Tensor | np.ndarray) -> bytes:
    return np.asarray(torch.as_tensor(a).detach().cpu().half().numpy()).tobytes()


class Oracle(torch.nn.Module):
    """A velocity model that knows the answer: its Euler path from any noise ends at ``target(dino, t5)``
    (the straight path x_t = (1 - t) target + t eps has v = (x_t - target) / t). Records batch sizes."""

    def __init__(self, target_fn):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.target_fn = target_fn
        self.batches: list[int] = []

    def forward(self, x, t, dino, t5, t5_mask, drop_dino=None, drop_text=None):
        self.batches.append(x.shape[0])
        targets = []
        for i in range(x.shape[0]):
            t5_i = t5[i, : int(t5_mask[i].sum())]  # (L, Dt) valid prefix
            targets.append(self.target_fn(_key(dino[i]), _key(t5_i), tuple(x.shape[1:])))
        target = torch.stack(targets).to(x)  # (B, C, h, w)
        return (x - target) / t.view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# the shapes world


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_dataset(str(root), samples=16, seed=0, size=16)
    manifest, groups, _ = read_all(root)
    return root, manifest, groups


def shapes_oracle(groups, mode: str = "intact") -> Oracle:
    """intact: lighting from the DINO, objects from the caption. const_dino: lighting of one fixed sample
    whatever the DINO. ignore_text: the DINO's own sample's objects whatever the caption."""
    light, objects, own = {}, {}, {}
    fixed = None
    codec = ShapesCodec()
    for g in groups.values():
        for s in g:
            scene = Scene.from_json(s.meta["scene"])
            fixed = fixed or scene
            for sc, dino, t5 in ((scene, s.dino, s.t5), (flip_scene(scene), s.dino_flip, s.t5_flip)):
                light[_key(dino)], objects[_key(t5)], own[_key(dino)] = sc, sc.objects, sc

    def target(dino_key, t5_key, shape):
        lit = fixed if mode == "const_dino" else light[dino_key]
        objs = own[dino_key].objects if mode == "ignore_text" else objects[t5_key]
        scene = dataclasses.replace(lit, objects=objs)
        img = render(scene, 2 * shape[1], 2 * shape[2])  # (4, H, W)
        return codec.encode(img[None])[0]  # (16, h, w)

    return Oracle(target)


def write_losses(run_dir, first: float = 2.0, last: float = 0.01, n: int = 20) -> None:
    rows = [{"step": 10 * (i + 1), "loss": first + (last - first) * i / (n - 1)} for i in range(n)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def val_cfg(*overrides: str):
    base = ["val.samples=4", "val.steps=4", "val.loss_window=3", "model.size=tiny"]
    return load_config(None, base + list(overrides))


def tools_with_lpips(manifest, tmp_path, vcfg):
    dec, info = load_decoder(manifest, vcfg, torch.device("cpu"))
    lp, linfo = load_lpips("alex", alexnet_weights(tmp_path / "alex.pth"), torch.device("cpu"))
    return Tools(dec, info, lp, linfo)


def run(model, manifest, groups, cfg, tmp_path, tools=None, step=100):
    return run_validation(model, manifest, groups, cfg, tmp_path, step, tmp_path / "out", tools=tools)


def test_case_selection_is_deterministic_and_spread(shapes) -> None:
    """n cases per test, spread over all buckets; swap pairs share a bucket and are telling pairs."""
    _, manifest, groups = shapes
    cases = select_cases(groups, 4, True, seed=1234)
    again = select_cases({b: list(reversed(g)) for b, g in groups.items()}, 4, True, seed=1234)
    assert [(c.test, c.a.id, c.b and c.b.id) for c in cases] == [
        (c.test, c.a.id, c.b and c.b.id) for c in again
    ]
    for test in TESTS:
        sel = [c for c in cases if c.test == test]
        assert len(sel) == 4 and len({c.bucket for c in sel}) == 4
    for c in cases:
        if c.test == "dino_swap":
            assert c.b.bucket == c.a.bucket and c.b.id != c.a.id
            sa, sb = Scene.from_json(c.a.meta["scene"]), Scene.from_json(c.b.meta["scene"])
            assert abs((sa.light_deg - sb.light_deg + 180) % 360 - 180) >= 90
            assert np.array_equal(c.dino, c.b.dino) and np.array_equal(c.t5, c.a.t5)
        if c.test == "text_manip":
            assert np.array_equal(c.t5, c.a.t5_flip) and c.caption == c.a.flip_txt
    noise = [case_noise(c.a, 1234) for c in cases if c.a.id == cases[0].a.id]
    assert all(torch.equal(n, noise[0]) for n in noise)  # a sample's tests share their starting noise
    assert not torch.equal(case_noise(cases[0].a, 1), noise[0])


def test_read_val_samples_reads_a_bounded_prefix_per_bucket(tmp_path) -> None:
    """Validation reads at most max(4n, 32) samples per bucket, the first ones in shard order."""
    from fakedata import write_random_shards

    write_random_shards(tmp_path, n=80)  # 40 per bucket, shards of 4
    _, full, _ = read_all(tmp_path)
    _, some = read_val_samples(tmp_path, 1)
    assert set(some) == set(full)
    for b in full:
        assert [s.id for s in some[b]] == [s.id for s in full[b][:32]]
    _, more = read_val_samples(tmp_path, 10)
    assert all(len(g) == 40 for g in more.values())


@pytest.mark.parametrize("layout", ["flat", "bucket-folders"])
def test_read_val_samples_reads_other_producers_layouts(tmp_path, layout) -> None:
    """Validation reads what the loaders read: another producer's per-bucket folders, and flat tars that mix
    buckets (each sample goes to its own bucket, never to one its tar is also listed under)."""
    from stage2_writer import write

    root = write(tmp_path / "d", layout=layout, samples=20, per_tar=3)
    _, full, _ = read_all(root)
    manifest, some = read_val_samples(root, 2)
    assert set(some) == set(full) == {(8, 8), (6, 10)}
    for b, g in some.items():
        assert all(smp.bucket == b and smp.latent.shape[1:] == b for smp in g)
        assert [smp.id for smp in g] == [smp.id for smp in full[b]]  # 10 per bucket: under the limit of 32
    assert manifest["count"] == 20


def test_intact_oracle_passes_everything_and_is_go(shapes, tmp_path) -> None:
    """The ideal model: every scorer passes, LPIPS ~ 0, falling loss -> GO; one sampler call per bucket."""
    _, manifest, groups = shapes
    cfg = val_cfg()
    write_losses(tmp_path)
    oracle = shapes_oracle(groups)
    res = run(oracle, manifest, groups, cfg, tmp_path, tools_with_lpips(manifest, tmp_path, cfg.val))
    assert res["decision"] == "GO", res["criteria"]
    assert res["failed"] == [] and res["not_computed"] == []
    n = res["numbers"]
    assert n["recon_scorer_rate"] == 1.0 and n["dino_swap_rate"] == 1.0 and n["text_manip_rate"] == 1.0
    assert n["lpips"] < 1e-3 and n["psnr"] > 40
    # 12 cases over 4 buckets: 4 sampler calls of 4 Euler steps, 3 cases each; then the condition-effect
    # probe: per bucket (1 recon case each) its 10 t values x 3 passes (both, no caption, no DINO) in one call
    assert oracle.batches[:16] == [3] * 16 and res["sampling"]["sampler_calls"] == 4
    assert oracle.batches[16:] == [30] * 4
    # the oracle never looks at the drop flags, so neither condition "moves" it: the report says so loudly
    assert res["effects"]["caption"] == [0.0] * 10 and len(res["warnings"]) == 2


def test_dual_guidance_batches_three_passes(shapes, tmp_path) -> None:
    """With guidance scales != 1 every model call carries the 3 passes of all of a bucket's cases."""
    _, manifest, groups = shapes
    cfg = val_cfg("val.guidance_dino=2.0", "val.guidance_text=3.0")
    oracle = shapes_oracle(groups)
    res = run(oracle, manifest, groups, cfg, tmp_path)
    assert oracle.batches[:16] == [9] * 16
    assert res["numbers"]["dino_swap_rate"] == 1.0  # the oracle ignores the drops: guidance changes nothing


def test_oracle_ignoring_the_caption_fails_text_manipulation(shapes, tmp_path) -> None:
    _, manifest, groups = shapes
    write_losses(tmp_path)
    cfg = val_cfg()
    res = run(
        shapes_oracle(groups, "ignore_text"),
        manifest,
        groups,
        cfg,
        tmp_path,
        tools_with_lpips(manifest, tmp_path, cfg.val),
    )
    assert res["numbers"]["text_manip_rate"] == 0.0
    assert res["numbers"]["dino_swap_objects_follow_a"] == 0.0  # objects come from B's DINO now
    assert res["numbers"]["recon_scorer_rate"] == 1.0  # reconstruction alone cannot tell
    assert res["decision"] == "NO-GO" and {"text_manip", "dino_swap"} <= set(res["failed"])


def test_oracle_with_constant_dino_fails_dino_swap(shapes, tmp_path) -> None:
    _, manifest, groups = shapes
    res = run(shapes_oracle(groups, "const_dino"), manifest, groups, val_cfg(), tmp_path)
    n = res["numbers"]
    assert n["dino_swap_lighting_follows_b"] <= 0.25 and n["dino_swap_rate"] <= 0.25
    assert n["text_manip_rate"] == 1.0  # the caption still places the objects
    assert "dino_swap" in res["failed"]


def test_untrained_model_fails_reconstruction(shapes, tmp_path) -> None:
    """A freshly initialised NanoDiT predicts v = 0: the samples stay noise and reconstruction fails."""
    from nanodit.model import build_model

    _, manifest, groups = shapes
    write_losses(tmp_path)
    cfg = val_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"]).eval()
    res = run(model, manifest, groups, cfg, tmp_path)
    c = res["criteria"]["recon_scorer"]
    assert c["computed"] and c["value"] == 0.0 and c["pass"] is False
    assert res["numbers"]["psnr"] < 15 and res["decision"] == "NO-GO"
    assert res["criteria"]["lpips"]["computed"] is False  # no backbone here: said, not guessed
    assert "val.lpips_weights" in res["criteria"]["lpips"]["how to provide"]


class PathOracle(Oracle):
    """The shapes oracle routed through stand-ins of NanoDiT's two conditioning paths, so the self-test's
    hooks act on it as on the real model: the DINO goes through ``dino_embed`` (const_dino replaces its
    input), the caption through ``blocks[0].cross`` (zero_cross zeroes its output). A caption that arrives as
    zeros leaves the objects to the DINO's own sample; an unknown DINO gives the lighting of a fixed sample.
    ``routed=False``: the same parts exist but the forward bypasses them (hooks then change nothing)."""

    def __init__(self, groups, routed: bool = True):
        super().__init__(None)
        self.dino_embed = torch.nn.Identity()
        self.blocks = torch.nn.ModuleList([torch.nn.Module()])
        self.blocks[0].cross = torch.nn.Identity()
        self.routed = routed
        self.light, self.objects, self.own, self.fixed = {}, {}, {}, None
        for g in groups.values():
            for smp in g:
                scene = Scene.from_json(smp.meta["scene"])
                self.fixed = self.fixed or scene
                for sc, dino, t5 in (
                    (scene, smp.dino, smp.t5),
                    (flip_scene(scene), smp.dino_flip, smp.t5_flip),
                ):
                    self.light[_key(dino)], self.objects[_key(t5)], self.own[_key(dino)] = sc, sc.objects, sc

    def forward(self, x, t, dino, t5, t5_mask, drop_dino=None, drop_text=None):
        self.batches.append(x.shape[0])
        d = self.dino_embed(dino) if self.routed else dino  # (B, Dd)
        y = self.blocks[0].cross(t5) if self.routed else t5  # (B, L, Dt)
        codec, targets = ShapesCodec(), []
        for i in range(x.shape[0]):
            dk, y_i = _key(d[i]), y[i, : int(t5_mask[i].sum())]
            lit = self.light.get(dk, self.fixed)
            if bool((y_i == 0).all()):  # the caption path is cut
                objs = self.own.get(dk, self.fixed).objects
            else:
                objs = self.objects[_key(y_i)]
            img = render(dataclasses.replace(lit, objects=objs), 2 * x.shape[2], 2 * x.shape[3])
            targets.append(codec.encode(img[None])[0])
        return (x - torch.stack(targets).to(x)) / t.view(-1, 1, 1, 1)


def test_self_test_catches_every_planted_fault_on_a_sound_model(shapes, tmp_path) -> None:
    """The self-test on a model whose paths the faults can reach: intact GO; cutting the caption fails text
    manipulation, a constant DINO fails the DINO swap, untrained weights fail reconstruction -> power, GO."""
    _, manifest, groups = shapes
    write_losses(tmp_path)
    res = run_validation(
        PathOracle(groups), manifest, groups, val_cfg(), tmp_path, 100, tmp_path / "out", self_test=True
    )
    assert res["decision"] == "GO", res["criteria"]
    st = res["self_test"]
    assert st["power"] is True and set(st["faults"]) == {"zero_cross", "const_dino", "untrained"}
    f = st["faults"]
    assert (
        f["zero_cross"]["target"] == "text_manip"
        and f["zero_cross"]["caught"]
        and f["zero_cross"]["intact_pass"]
    )
    assert (
        f["zero_cross"]["criteria"]["text_manip"]["value"] == 0.0
    )  # objects stay where the DINO's sample had them
    assert f["const_dino"]["target"] == "dino_swap" and f["const_dino"]["caught"]
    assert f["const_dino"]["criteria"]["text_manip"]["pass"] is True  # the caption path still works
    assert (
        f["untrained"]["target"] == "recon_scorer"
        and f["untrained"]["criteria"]["recon_scorer"]["value"] == 0.0
    )
    assert all(e["decision"] == "NO-GO" for e in f.values())
    assert f["zero_cross"]["moved"]["text_manip"] == -1.0  # 1.0 intact -> 0.0 with the fault
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["self_test"]["power"] is True
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Self-test: planted faults" in md and "| zero_cross |" in md and "3/3 planted faults" in md


def test_a_go_whose_self_test_misses_a_fault_is_incomplete(shapes, tmp_path) -> None:
    """When the faults cannot reach the paths (the model bypasses the hooked parts), zero_cross and const_dino
    leave their tests passing: the tests have shown no power on this run, so the GO becomes INCOMPLETE."""
    _, manifest, groups = shapes
    write_losses(tmp_path)
    blind = PathOracle(groups, routed=False)
    res = run_validation(blind, manifest, groups, val_cfg(), tmp_path, 100, tmp_path / "out", self_test=True)
    st = res["self_test"]
    assert st["power"] is False
    assert st["faults"]["zero_cross"]["caught"] is False and st["faults"]["const_dino"]["caught"] is False
    assert st["faults"]["untrained"]["caught"] is True
    assert res["failed"] == [] and res["decision"] == "INCOMPLETE"
    assert res["no_power"] == ["zero_cross", "const_dino"]
    lines = decision_lines(res, tmp_path / "out")
    assert lines[0].startswith("decision: INCOMPLETE") and any(
        "did not fail their target" in x for x in lines
    )


def test_condition_effect_is_zero_for_a_cut_path_and_positive_otherwise(shapes) -> None:
    """||v(D,T) - v(D,null)|| / ||v||: exactly 0 at every t when the cross-attention output is zeroed (the
    caption cannot matter), > 0 for a model whose caption path carries weights; the DINO effect is untouched."""
    from nanodit.model import build_model
    from nanodit.validation.sampling import EFFECT_T, condition_effect

    _, manifest, groups = shapes
    cfg = val_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"]).eval()
    for p in model.parameters():  # leave the zero init: every path must carry signal
        p.data.normal_(0, 0.05)
    cases = select_cases(groups, 4, True, cfg.val.seed)
    e = condition_effect(model, cases, cfg.val.seed)
    assert e["t"] == list(EFFECT_T) and e["samples"] == 4
    assert min(e["caption"]) > 0.01 and min(e["dino"]) > 0.01
    with planted(model, "zero_cross"):
        cut = condition_effect(model, cases, cfg.val.seed)
    assert cut["caption"] == [0.0] * 10
    assert cut["dino"] != [0.0] * 10
    # one t value per forward (the smallest batches) gives the same numbers as all of them in one forward
    one_t = condition_effect(model, cases, cfg.val.seed, max_rows=1)
    for key in ("caption", "dino"):
        assert np.allclose(one_t[key], e[key], rtol=1e-4, atol=1e-6), key


def test_loss_criterion_from_the_run_log(shapes, tmp_path) -> None:
    _, manifest, groups = shapes
    oracle = shapes_oracle(groups)
    res = run(oracle, manifest, groups, val_cfg(), tmp_path)
    assert res["criteria"]["loss_ratio"]["computed"] is False  # no metrics.jsonl
    write_losses(tmp_path, 2.0, 1.0)
    res = run(oracle, manifest, groups, val_cfg(), tmp_path)
    c = res["criteria"]["loss_ratio"]
    assert c["computed"] and c["pass"] is False and 0.5 < c["value"] < 0.6
    write_losses(tmp_path, 2.0, 0.05)
    c = run(oracle, manifest, groups, val_cfg(), tmp_path)["criteria"]["loss_ratio"]
    assert c["pass"] is True


# ---------------------------------------------------------------------------------------------
# real data: a tiny random VAE, random shards


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    w = ShardWriter(root / "shards", {"name": "real-test", "vae": {"scale": 0.5, "shift": 0.1}})
    for i in range(8):
        h, wd = [(8, 8), (6, 10)][i % 2]
        L = int(rng.integers(3, 7))
        w.write(
            {
                "__key__": f"r{i:03d}",
                "latent": rng.standard_normal((16, h, wd)).astype(np.float16),
                "latent_flip": rng.standard_normal((16, h, wd)).astype(np.float16),
                "dino": rng.standard_normal(24).astype(np.float16),
                "dino_flip": rng.standard_normal(24).astype(np.float16),
                "t5": rng.standard_normal((L, 32)).astype(np.float16),
                "t5_flip": rng.standard_normal((L, 32)).astype(np.float16),
                "txt": f"thing {i} on the left",
                "flip.txt": f"thing {i} on the right",
                "json": {"bucket": [h, wd], "id": f"r{i:03d}"},
            }
        )
    w.close()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(root / "vae")
    manifest, groups, _ = read_all(root / "shards")
    return root, manifest, groups, vae


def real_oracle(groups, mode: str = "intact") -> Oracle:
    """Keyed by (DINO, caption): recon -> own latent, swap (DINO of B) -> B's latent, swapped caption ->
    the flipped latent. ``copy_a``: A's latent whatever the conditioning."""
    table, own = {}, {}
    for g in groups.values():
        for a in g:
            own[_key(a.t5)] = own[_key(a.t5_flip)] = torch.from_numpy(a.latent.astype(np.float32))
            table[(_key(a.dino), _key(a.t5))] = a.latent
            table[(_key(a.dino), _key(a.t5_flip))] = a.latent_flip
            for b in g:
                if b is not a:
                    table[(_key(b.dino), _key(a.t5))] = b.latent

    def target(dk, tk, shape):
        if mode == "copy_a":
            return own[tk]
        return torch.from_numpy(table[(dk, tk)].astype(np.float32))

    return Oracle(target)


def test_vae_decoder_unscales_with_the_manifest(real) -> None:
    root, manifest, groups, vae = real
    cfg = val_cfg(f"val.vae={root / 'vae'}")
    dec, info = load_decoder(manifest, cfg.val, torch.device("cpu"))
    assert dec is not None, info
    assert info["scale"] == 0.5 and info["shift"] == 0.1 and info["scale_source"] == "manifest vae"
    z = torch.from_numpy(groups[(8, 8)][0].latent.astype(np.float32))[None]  # (1, 16, 8, 8)
    with torch.no_grad():
        want = ((vae.decode(z / 0.5 + 0.1).sample + 1) / 2).clamp(0, 1)  # (1, 3, 16, 16)
    got = dec.decode(z)
    assert got.shape == (1, 3, 16, 16)
    torch.testing.assert_close(got, want)
    bf16, _ = load_decoder(
        manifest, val_cfg(f"val.vae={root / 'vae'}", "val.vae_dtype=bf16").val, torch.device("cpu")
    )
    torch.testing.assert_close(bf16.decode(z), want, atol=0.05, rtol=0)


def test_real_data_without_vae_says_what_to_provide(real, tmp_path) -> None:
    root, manifest, groups, _ = real
    write_losses(tmp_path)
    res = run(real_oracle(groups), manifest, groups, val_cfg(), tmp_path)
    # nothing failed, but required criteria could not be computed: INCOMPLETE, saying what to provide
    assert res["decision"] == "INCOMPLETE" and res["data"] == "real" and res["failed"] == []
    for name in ("lpips", "dino_swap", "text_manip"):
        c = res["criteria"][name]
        assert c["computed"] is False and c["value"] is None and "val.vae" in c["how to provide"]
    assert "recon_scorer" not in res["criteria"]  # a shapes-only criterion
    assert res["numbers"]["latent_mse"] < 1e-6  # latent numbers need no decoder
    assert not (tmp_path / "out" / "recon.png").exists()
    assert "cannot be decoded" in (tmp_path / "out" / "report.md").read_text()


def test_real_data_scores_with_vae_lpips_and_an_embedder(real, tmp_path) -> None:
    """DINO swap: output closer (cosine of the embeddings) to B than to A; text manipulation: LPIPS closer to
    the flipped original. The oracle passes both; copying A fails both."""
    root, manifest, groups, _ = real
    write_losses(tmp_path)
    cfg = val_cfg(f"val.vae={root / 'vae'}")
    tools = tools_with_lpips(manifest, tmp_path, cfg.val)
    tools.dino, tools.dino_info = (lambda imgs: imgs.flatten(1)), {"path": "test embedder"}
    res = run(real_oracle(groups), manifest, groups, cfg, tmp_path, tools)
    n = res["numbers"]
    assert n["dino_swap_rate"] == 1.0 and n["text_manip_rate"] == 1.0 and n["lpips"] < 1e-3
    assert res["decision"] == "GO", res["criteria"]
    assert (tmp_path / "out" / "dino_swap.png").is_file()
    bad = run(real_oracle(groups, "copy_a"), manifest, groups, cfg, tmp_path, tools)
    assert bad["numbers"]["dino_swap_rate"] == 0.0 and bad["numbers"]["text_manip_rate"] == 0.0
    assert set(bad["failed"]) == {"dino_swap", "text_manip"}


def test_real_data_dino_swap_not_computed_without_dino(real, tmp_path) -> None:
    root, manifest, groups, _ = real
    for extra in ([], ["val.dino=/nonexistent/dinov3"]):
        cfg = val_cfg(f"val.vae={root / 'vae'}", *extra)
        tools = load_tools(manifest, cfg.val, torch.device("cpu"), shapes=False)
        res = run(real_oracle(groups), manifest, groups, cfg, tmp_path, tools)
        c = res["criteria"]["dino_swap"]
        assert c["computed"] is False and "val.dino" in c["how to provide"] and c["why"]


# ---------------------------------------------------------------------------------------------
# the trainer's hook and the command line, on a smoke run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from nanodit.train import train

    root = tmp_path_factory.mktemp("smoke")
    cfg = load_config(
        "smoke",
        [
            f"run.dir={root / 'run'}",
            f"data.cache_dir={root / 'cache'}",
            "data.synth_samples=8",
            "train.steps=20",
            "train.log_every=5",
            "train.ckpt_every=10",
            "val.every=10",
            "val.samples=2",
            "val.steps=3",
            "run.progress=false",
        ],
    )
    summary = train(cfg, quiet=True)
    return root / "run", summary


def test_hook_writes_step_folders_final_report_and_tensorboard(smoke_run) -> None:
    run_dir, summary = smoke_run
    assert summary["report"]["decision"] in ("GO", "NO-GO")
    assert summary["report"]["path"] == str(run_dir / "report")
    for folder, step in ((run_dir / "validation" / "step-00000010", 10), (run_dir / "report", 20)):
        s = json.loads((folder / "scores.json").read_text())
        assert s["decision"] in ("GO", "NO-GO")
        # the weights judged: the checkpoint of that step, named also while its write runs in the background
        assert s["checkpoint"] == str(run_dir / "checkpoints" / f"ckpt-{step:08d}.pt")
        for name in ("recon.png", "dino_swap.png", "text_manip.png", "loss.png", "report.md", "report.html"):
            assert (folder / name).is_file(), name
    assert "## History" in (run_dir / "report" / "report.md").read_text()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if "val/go" in r} == {10, 20}
    events = list((run_dir / "tensorboard").glob("events.*"))
    assert events and sum(e.stat().st_size for e in events) > 10_000  # images went in
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    shown = {im.step: im for im in acc.Images("val/recon")}  # the grid PNGs as written, one per validation
    assert set(shown) == {10, 20}
    png = (run_dir / "validation" / "step-00000020" / "recon.png").read_bytes()
    assert shown[20].encoded_image_string == png and shown[20].width > 0 and shown[20].height > 0


def random_model(cfg, manifest):
    """The config's model with seeded N(0, 0.02) weights (an untrained model's outputs are all zero)."""
    from nanodit.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"])
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model


def test_trainer_validates_ema_weights_and_leaves_the_model_alone(shapes, tmp_path) -> None:
    """train.validate_ema judges the EMA weights on a fresh twin: the live model (weights, train mode) is
    untouched, and the scores equal those of a model loaded with the EMA weights directly."""
    from nanodit.model import build_model
    from nanodit.optim import EMA
    from nanodit.train import validate_ema
    from nanodit.validation import Validator

    root, manifest, groups = shapes
    cfg = val_cfg()
    model = random_model(cfg, manifest)
    ema = EMA(model)  # the EMA holds these weights; the live model then moves away
    ema_model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"])
    ema.copy_to(ema_model)
    for p in model.parameters():
        p.data.add_(0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    validator = Validator(cfg, manifest, groups, torch.device("cpu"))
    out = validate_ema(validator, ema, tmp_path, 7, None)
    validator.close()  # the step folder is written by the validator's worker thread
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    want = run(ema_model.eval(), manifest, groups, cfg, tmp_path / "direct")
    assert out["scores"]["numbers"]["latent_mse"] == pytest.approx(want["numbers"]["latent_mse"], rel=1e-6)
    assert out["path"] == str(tmp_path / "validation" / "step-00000007")


def test_background_write_equals_the_foreground_one_and_the_twin_follows_the_ema(shapes, tmp_path) -> None:
    """An intermediate validation's folder written by the worker thread holds the same files and scores as one
    written in the caller's thread; the eval twin is built once and takes each validation's EMA weights."""
    from nanodit.optim import EMA
    from nanodit.train import validate_ema
    from nanodit.validation import Validator

    _, manifest, groups = shapes
    cfg = val_cfg()
    model = random_model(cfg, manifest)
    ema = EMA(model)
    validator = Validator(cfg, manifest, groups, torch.device("cpu"))
    first = validate_ema(validator, ema, tmp_path, 5, None)  # background (not final)
    twin = validator.twin
    for p in model.parameters():
        p.data.add_(0.05)
    ema.update(model, 0.0)  # decay 0: the EMA takes the moved weights
    second = validate_ema(validator, ema, tmp_path, 6, None)
    validator.close()
    assert validator.twin is twin
    assert first["scores"]["numbers"]["latent_mse"] != second["scores"]["numbers"]["latent_mse"]
    fg = tmp_path / "fg"
    fg_result = validator.run(twin, 6, fg, tmp_path)  # the same weights, written in this thread
    bg = tmp_path / "validation" / "step-00000006"
    assert sorted(p.name for p in bg.iterdir()) == sorted(p.name for p in fg.iterdir())
    bg_scores, fg_scores = (json.loads((d / "scores.json").read_text()) for d in (bg, fg))
    for key in ("decision", "numbers", "criteria"):
        assert bg_scores[key] == fg_scores[key] == json.loads(json.dumps(fg_result[key], allow_nan=True)), key
    assert validator.background_timing["report"] > 0


def test_a_failed_background_write_is_a_warning(shapes, tmp_path, caplog, monkeypatch) -> None:
    """A report the worker thread could not write is one warning at the next wait, never an exception: the
    scores are already in the caller's hands and the run goes on."""
    import nanodit.validation.report as report
    from nanodit.model import build_model
    from nanodit.validation import Validator

    _, manifest, groups = shapes
    cfg = val_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"]).eval()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report", full_disk)
    validator = Validator(cfg, manifest, groups, torch.device("cpu"))
    result = validator.run(model, 3, tmp_path / "out", tmp_path, background=True)
    assert result["decision"] in ("GO", "NO-GO", "INCOMPLETE")
    with caplog.at_level("WARNING"):
        validator.close()
    assert any(
        "report of step 3 not written" in r.message and "No space left" in r.message for r in caplog.records
    )


def test_cli_writes_the_report(smoke_run, capsys) -> None:
    run_dir, _ = smoke_run
    out = run_dir / "cli"
    assert main(["--run", str(run_dir), "--out", str(out), "val.samples=1"]) == 0
    printed = capsys.readouterr().out
    assert "decision:" in printed and "loss_ratio" in printed
    s = json.loads((out / "scores.json").read_text())
    assert s["decision"] in ("GO", "NO-GO") and s["step"] == 20 and s["numbers"]["recon_samples"] == 1
    assert s["checkpoint"].endswith("ckpt-00000020.pt")
    for name in ("recon.png", "dino_swap.png", "text_manip.png", "report.md", "report.html"):
        assert (out / name).is_file()
    assert (
        main(
            [
                "--run",
                str(run_dir),
                "--checkpoint",
                str(run_dir / "checkpoints" / "ckpt-00000010.pt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "scores.json").read_text())["step"] == 10


def test_cli_self_test_and_the_last_lines(smoke_run, capsys) -> None:
    """--self-test adds the planted faults to scores.json; the last printed lines give the decision once,
    each failed criterion's diagnosis, the self-test verdict, and that a smoke run checks only the plumbing."""
    run_dir, _ = smoke_run
    out = run_dir / "cli-self-test"
    assert main(["--run", str(run_dir), "--out", str(out), "--self-test", "val.samples=2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    s = json.loads((out / "scores.json").read_text())
    assert set(s["self_test"]["faults"]) == {"zero_cross", "const_dino", "untrained"}
    tail = printed[-(len(printed) - next(i for i, x in enumerate(printed) if x.startswith("decision:"))) :]
    assert (
        tail[0].startswith(f"decision: {s['decision']}")
        and sum(x.startswith("decision:") for x in printed) == 1
    )
    for name in s["failed"]:
        assert any(x.startswith(f"  {name}: ") for x in tail), name
    assert any(x.startswith("  self-test: ") for x in tail)
    assert tail[-1].startswith("  note: this is a smoke run")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "{tmp}/missing"], "no such folder"),
        (["--run", "{tmp}"], "no checkpoint"),
        (["--run", "{run}", "--checkpoint", "{tmp}/nope.pt"], "no such file"),
        (["--run", "{run}", "train.steps=5"], "only val.*"),
        (["--run", "{run}", "val.samples=0"], "val.samples"),
        (["--run", "{run}", "val.min_recon=2"], "val.min_recon"),
    ],
)
def test_cli_one_line_errors(smoke_run, tmp_path, capsys, args, message) -> None:
    run_dir, _ = smoke_run
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


# ---------------------------------------------------------------------------------------------
# mutations of a real NanoDiT: the caption-blind and the DINO-blind model (the self-test's planted faults)


def smoke_model(run_dir):
    from nanodit.checkpoint import latest_checkpoint
    from nanodit.config import from_dict
    from nanodit.dist_checkpoint import load_checkpoint
    from nanodit.model import build_model

    state = load_checkpoint(latest_checkpoint(run_dir))
    cfg, manifest = from_dict(state["config"]), state["manifest"]
    model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"])
    model.load_state_dict(state["ema"])
    return model.eval(), cfg, manifest


@pytest.mark.parametrize("mutation", ["zero_cross", "const_dino"])
def test_mutated_model_cannot_pass_both_reconstruction_and_its_test(smoke_run, tmp_path, mutation) -> None:
    """Each of a sample's tests starts from the same noise, so a model blind to the caption draws the same
    picture for the swapped caption as for the original one (and a DINO-blind model the same picture for
    B's DINO as for A's): per sample it cannot pass both reconstruction and text manipulation (DINO swap).
    The intact model's outputs do change with the caption and with the DINO."""
    run_dir, _ = smoke_run
    model, cfg, manifest = smoke_model(run_dir)
    _, groups, _ = read_all(Path(cfg.data.cache_dir) / "shapes-n8-s0-z16")
    cfg.val.samples, cfg.val.steps = 4, 3
    cases = select_cases(groups, 4, True, cfg.val.seed)
    test = "text_manip" if mutation == "zero_cross" else "dino_swap"
    pairs = [
        (i, j)
        for i, c in enumerate(cases)
        if c.test == test
        for j, r in enumerate(cases)
        if r.test == "recon" and r.a.id == c.a.id
    ]
    assert pairs, "the tests must share samples"
    intact = generate(model, cases, cfg.val)
    assert all(not torch.allclose(intact[i], intact[j], atol=1e-4) for i, j in pairs)
    dino_mean = np.mean([s.dino.astype(np.float32) for g in groups.values() for s in g], axis=0)
    with planted(model, mutation, dino_mean):
        blind = generate(model, cases, cfg.val)
        assert all(torch.allclose(blind[i], blind[j], atol=1e-5) for i, j in pairs)
        res = run_validation(model, manifest, groups, cfg, run_dir, 20, tmp_path / "out")
    again = generate(model, cases, cfg.val)  # the hooks are gone afterwards
    assert all(torch.equal(a, b) for a, b in zip(again, intact))
    by = {(r["test"], r["a"]): r for r in res["cases"]}
    for i, _ in pairs:
        a = cases[i].a.id
        if mutation == "zero_cross":
            assert not (by[("recon", a)]["objects_match"] and by[("text_manip", a)]["passed"])
        else:
            assert not (by[("recon", a)]["lighting_match"] and by[("dino_swap", a)]["lighting_follows_b"])


# ---------------------------------------------------------------------------------------------
# the default nano recipe, trained (GPU: its 5k steps take minutes on an H200, hours on this CPU)


@pytest.fixture(scope="module")
def nano_run(tmp_path_factory):
    """``--config nano`` as a user runs it (its recipe, steps and precision), validated once at the end with
    the self-test."""
    from nanodit.train import train

    root = tmp_path_factory.mktemp("nano")
    overrides = [
        f"run.dir={root / 'run'}",
        f"data.cache_dir={root / 'cache'}",
        "train.device=cuda",
        "val.every=0",
        "run.tensorboard=false",
        "run.progress=false",
    ]
    summary = train(load_config("nano", overrides), quiet=True)
    scores = json.loads((Path(summary["report"]["path"]) / "scores.json").read_text())
    return summary, scores


@pytest.mark.gpu
@pytest.mark.slow
def test_default_nano_recipe_is_go_and_each_planted_fault_fails_its_test(nano_run) -> None:
    """The intact architecture trained by the default recipe gets GO; the self-test's planted faults
    (cross-attention zeroed, constant DINO, untrained weights) each fail the criterion they target."""
    _, s = nano_run
    assert s["decision"] == "GO", [c.get("diagnosis") for c in s["criteria"].values()]
    assert s["self_test"]["power"] is True
    faults = s["self_test"]["faults"]
    assert {f: faults[f]["target"] for f in faults} == {
        "zero_cross": "text_manip",
        "const_dino": "dino_swap",
        "untrained": "recon_scorer",
    }
    for f in faults.values():
        assert f["caught"] is True and f["decision"] == "NO-GO", f
    assert s["warnings"] == []  # both conditions move the prediction
