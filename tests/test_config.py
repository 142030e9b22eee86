"""Config: defaults < file < CLI; mistakes are one-line errors naming the key."""

from __future__ import annotations

import pytest

from nanodit.config import CONFIG_DIR, ConfigError, from_dict, load_config, to_dict


@pytest.mark.parametrize("name", ["nano", "smoke", "production"])
def test_bundled_configs_load(name):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.model.size == {"nano": "nano", "smoke": "small", "production": "production"}[name]


def test_nano_config_is_the_plan():
    cfg = load_config("nano")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.precision, cfg.val.every) == (
        5000,
        16,
        "fp32",
        1000,
    )
    assert (cfg.train.lr, cfg.train.min_lr, list(cfg.train.betas), cfg.train.weight_decay) == (
        3e-4,
        1e-6,
        [0.9, 0.95],
        0.03,
    )
    assert (cfg.train.p_drop_both, cfg.train.p_drop_text, cfg.train.p_drop_dino) == (0.1, 0.1, 0.1)
    assert cfg.train.ema_decay == 0.9999 and cfg.train.ema_warmup_steps == 5000


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
