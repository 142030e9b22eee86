"""Config: defaults < file < CLI; mistakes are one-line errors naming the key."""

from __future__ import annotations

import dataclasses

import pytest

from nanodit.config import CONFIG_DIR, ConfigError, from_dict, load_config, to_dict


@pytest.mark.parametrize("name", ["nano", "smoke", "production"])
def test_bundled_configs_load(name):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.model.size == {"nano": "nano", "smoke": "small", "production": "production"}[name]


PLAN_TRAINING = {
    "steps": 5000,
    "batch_size": 16,
    "lr": 3e-4,
    "min_lr": 1e-6,
    "betas": [0.9, 0.95],
    "weight_decay": 0.03,
    "p_drop_both": 0.1,
    "p_drop_text": 0.1,
    "p_drop_dino": 0.1,
    "ema_decay": 0.9999,
    "ema_warmup_steps": 5000,
    "t_mean": 0.0,
    "t_std": 1.0,
}


def _training(cfg) -> dict:
    return {k: (list(v) if k == "betas" else v) for k in PLAN_TRAINING for v in [getattr(cfg.train, k)]}


def test_nano_plan_config_is_the_plan():
    """configs/nano-plan.yaml is the plan's Part B exactly: its optimizer, schedule, dropout, EMA, t sampling,
    fp32, validation every 1000 steps, 50 Euler steps without guidance."""
    cfg = load_config("nano-plan")
    assert _training(cfg) == PLAN_TRAINING
    assert (cfg.train.t_shift, cfg.train.precision, cfg.train.compile) == (1.0, "fp32", False)
    assert (cfg.model.size, cfg.val.every, cfg.val.steps) == ("nano", 1000, 50)
    assert (cfg.val.guidance_dino, cfg.val.guidance_text, cfg.val.sample_shift) == (1.0, 1.0, 1.0)


def test_nano_config_differs_from_the_plan_only_where_it_says():
    """configs/nano.yaml = the plan + the timestep shift (the named, measured deviation) + the fast GPU
    settings (and the T5 padding); the validation judge is the same as nano-plan's."""
    cfg, plan = load_config("nano"), load_config("nano-plan")
    assert _training(cfg) == PLAN_TRAINING
    assert cfg.train.t_shift == 7.389
    fast = ("precision", "compile", "compile_scope", "compile_mode", "step_graph")
    assert tuple(getattr(cfg.train, k) for k in fast) == ("bf16", False, "blocks", "default", True)
    # the model's math is the plan's: the Triton kernels are parity-tested fast paths of the ref ops
    assert cfg.model.kernels == "triton" and plan.model.kernels == "ref"
    assert dataclasses.replace(cfg.model, kernels="ref") == plan.model
    assert cfg.val == plan.val
    # T5 padding is a fast setting (fewer batch shapes to warm up; padded keys are masked)
    assert cfg.data.t5_pad_multiple == 32
    assert dataclasses.replace(cfg.data, t5_pad_multiple=plan.data.t5_pad_multiple) == plan.data
    same = {k: v for k, v in vars(cfg.train).items() if k not in ("t_shift", *fast)}
    assert same == {k: v for k, v in vars(plan.train).items() if k in same}


def test_cli_overrides_file():
    cfg = load_config("smoke", ["train.steps=7", "model.attention=math", "run.dir=/tmp/x"])
    assert cfg.train.steps == 7 and cfg.model.attention == "math" and cfg.run.dir == "/tmp/x"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=abc", "train.steps"),
        ("train.steps=0", "train.steps"),
        ("train.precision=fp8", "train.precision"),
        ("model.kernels=cuda", "model.kernels"),
        ("train.p_drop_both=1.5", "train.p_drop_both"),
        ("model.heads=5", "model.width"),
        ("bogus.key=1", "bogus"),
        ("data.keys.latent=", "data.keys.latent"),
        ("data.keys.dino=latent.npy", "data.keys"),
        ("data.keys.bogus=x.npy", "data.keys.bogus"),
        ("data.t5_max_len=0", "data.t5_max_len"),
        ("data.check=sometimes", "data.check"),
        ("train.on_nonfinite=ignore", "train.on_nonfinite"),
        ("data.cache_dir=\x1f", "data.cache_dir"),
        ("train.stepz\n=3", "train.stepz\\n"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("smoke", [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_missing_file_and_bad_override_form(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config("smoke", ["train.steps"])


def test_roundtrip_through_dict():
    cfg = load_config("nano", ["train.steps=11"])
    assert from_dict(to_dict(cfg)) == cfg
