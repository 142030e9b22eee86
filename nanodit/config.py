"""Typed configuration: dataclass defaults < a YAML file < command-line ``key=value`` overrides.

    cfg = load_config("configs/nano.yaml", ["train.steps=200", "run.dir=runs/x"])

Unknown keys, wrong types and out-of-range values fail with a one-line ``ConfigError`` naming the
key. The resolved config is a plain ``Config`` dataclass (``OmegaConf.to_object``), saved as YAML in
the run folder and as a dict in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config mistake; the message is one line and names the key."""


@dataclass
class ModelConfig:
    size: str = "nano"  # a key of nanodit.model.SIZES; depth/width/heads below override it
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    patch: int = 2
    mlp_ratio: float = 4.0
    in_channels: int = 16
    dino_dim: int | None = None  # None: taken from the data manifest
    t5_dim: int | None = None  # None: taken from the data manifest
    null_text_tokens: int = 4  # length of the learned null caption (>= 1 valid key)
    kernels: str = "ref"  # ref | triton
    attention: str = "auto"  # auto | flash | cudnn | sdpa | flex | math
    # recompute each block's activations in the backward instead of keeping them (only each block's input is kept):
    # less activation memory for one more forward of the blocks per step (by arithmetic ~1/3 more compute; the
    # memory on a GPU is bench/bench_memory.py's, not yet measured); the same weights and losses
    activation_checkpointing: bool = False


@dataclass
class KeysConfig:
    """The tar member extension of each sample key (nanodit/data/schema.py): shards whose members are named
    otherwise are read without rewriting, e.g. ``data.keys.latent=vae_latent.npy data.keys.txt=caption.txt``."""

    latent: str = "latent.npy"
    latent_flip: str = "latent_flip.npy"
    dino: str = "dino.npy"
    dino_flip: str = "dino_flip.npy"
    t5: str = "t5.npy"
    t5_flip: str = "t5_flip.npy"
    t5_mask: str = "t5_mask.npy"
    t5_flip_mask: str = "t5_flip_mask.npy"
    txt: str = "txt"
    flip_txt: str = "flip.txt"
    json: str = "json"


@dataclass
class DataConfig:
    # shards: a folder (this project's manifest, another producer's, one folder per bucket, or flat), a glob
    # ("data/*.tar"), a brace pattern ("shard-{0000..0099}.tar") or a comma-separated list of tars (the
    # layouts: nanodit/data/layout.py); None: the built-in synthetic "shapes" set in cache_dir
    path: str | None = None
    cache_dir: str = ".cache/nanodit"
    synth_samples: int = 100
    synth_seed: int = 0
    synth_size: int = 64  # latent side of the square bucket (64: the nano shape; images are 2x the latent)
    loader: str = "auto"  # auto | gpu-cache | dali | webdataset
    gpu_cache_fraction: float = 0.5  # auto picks gpu-cache when the data fits this share of free memory
    flip: bool = True  # horizontal flip with left<->right caption swap, p = 0.5
    shuffle: bool = True
    last_batch: str = "partial"  # partial | drop: what happens to a bucket's remainder each epoch
    t5_pad_multiple: int = 8  # pad T5 to the batch's longest caption rounded up to this
    t5_max_len: int | None = None  # None: the manifest's, else 512 (T5's own); longer captions are an error
    on_error: str = "raise"  # raise | skip: a sample that breaks the schema (skips are counted by reason)
    # auto: every sample's arrays are read at start (NaN/Inf) unless a stamp written by
    # `python -m nanodit.data check` vouches for exactly these files; full: always read them
    check: str = "auto"
    keys: KeysConfig = field(default_factory=KeysConfig)
    num_workers: int = 2  # webdataset loader workers; DALI threads per bucket pipeline
    prefetch: int = 4  # batches read ahead per webdataset worker / per DALI pipeline
    rank: int | None = None  # this process's share of the data; None: torch.distributed's rank, else 0
    world_size: int | None = None  # processes sharing the data; None: torch.distributed's world size, else 1


@dataclass
class TrainConfig:
    steps: int = 5000
    batch_size: int = 16
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_steps: int = 250
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.03
    grad_clip: float = 1.0  # 0 disables
    ema_decay: float = 0.9999
    ema_warmup_steps: int = 5000  # decay ramps 0 -> ema_decay over these steps
    t_mean: float = 0.0  # logit-normal t
    t_std: float = 1.0
    # timestep shift s (SD3 / Flux): logit(t) += ln s, i.e. t' = s t / (1 + (s - 1) t); 1 = the plan's t
    t_shift: float = 1.0
    p_drop_both: float = 0.1
    p_drop_text: float = 0.1
    p_drop_dino: float = 0.1
    precision: str = "fp32"  # fp32 | tf32 | bf16
    compile: bool = False
    # torch.compile mode: default | reduce-overhead (Inductor's CUDA graphs: at the nano size the compiled
    # step is bound by host launch time, see bench/results) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # what torch.compile wraps: model (one graph for the whole forward) | blocks (each DiT block, the same
    # compiled code for all of them: ~1/depth of the cold-start compile time, which at the nano size on the
    # H200 machine's CPU was 80-100 s per shape for the whole model, see bench/results/h200-2026-11-27-s2)
    compile_scope: str = "model"
    # torch.compile's dynamic: null (torch's default: a dim that changes between calls recompiles once, as
    # dynamic) | true (every dim dynamic from the first compile) | false (one compile per shape)
    compile_dynamic: bool | None = None
    # the whole step (forward, loss, backward, clipping, AdamW, EMA) as one CUDA graph per batch shape, replayed
    # (nanodit/step_graph.py): one launch instead of hundreds. CUDA, one process, grad_accum 1; not with
    # compile_mode=reduce-overhead (that is Inductor's own CUDA graphs, around the compiled parts only)
    step_graph: bool = False
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: auto or cuda, each process takes cuda:LOCAL_RANK)
    # how the processes torchrun starts share the work (nanodit/distributed.py): none (one process) | ddp
    # (replicas, gradients all-reduced) | fsdp (FSDP2: weights, gradients, AdamW moments and EMA sharded; bf16
    # all-gathers under train.precision=bf16, fp32 master weights). auto: none on one process; on several, ddp
    # for a model under 250M parameters (nano), fsdp from 250M on (production)
    strategy: str = "auto"
    # micro-batches per optimizer step on each process: train.batch_size is the global batch of one step, so each
    # of W processes takes batch_size / W samples in grad_accum forward/backward passes (batch_size must be
    # divisible by W x grad_accum); 1 = no accumulation
    grad_accum: int = 1
    log_every: int = 10
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    # one process: a checkpoint is copied to host memory at its step (no host sync) and written to disk by a
    # background thread while training goes on (nanodit/checkpoint.py CheckpointWriter); false: written in the loop
    checkpoint_async: bool = True
    resume: str = "none"  # none | auto | PATH of a checkpoint (what may change on resume: nanodit/resume.py)
    # a step whose loss or gradient norm is not finite is never applied (nanodit/nonfinite.py); at the next
    # log step, stop: end the run (the state kept in <run>/nonfinite/, apart from the checkpoints) | skip: go on
    on_nonfinite: str = "stop"
    loss_bins: int = 10  # per-t-bin losses for logging
    # torch.profiler over steps [profile_start, profile_start + profile_steps) -> <run>/profile/ (trace.json,
    # summary.txt: wall vs GPU-busy ms per step, host ms per loop region, top kernels); 0 = off
    profile_steps: int = 0
    profile_start: int = 50


@dataclass
class ValConfig:
    every: int = 1000  # 0: only at the end
    at_end: bool = True
    samples: int = 32  # per test (5/5 has a 95% Wilson interval of 0.57-1: it cannot show a rate > 0.6)
    steps: int = 50  # Euler steps
    guidance_dino: float = 1.0  # s_d
    guidance_text: float = 1.0  # s_t
    sample_shift: float = 1.0  # timestep shift of the Euler schedule (flow.shift_t); 1 = uniform steps
    # on CUDA, the sampler's velocity replayed as a CUDA graph (the same numbers, without the launch cost)
    cuda_graph: bool = True
    seed: int = 1234
    vae: str | None = None  # local path of a diffusers AutoencoderKL (Flux VAE) for real latents
    vae_dtype: str = "fp32"  # fp32 | bf16
    dino: str | None = None  # local path of a DINOv3 model for re-embedding outputs (real data)
    lpips_net: str = "alex"  # alex | vgg | squeeze
    lpips_weights: str | None = None  # local path of the LPIPS backbone weights
    loss_window: int = 5  # logged points averaged at each end for the loss criterion (5 x log_every steps)
    max_loss_ratio: float = 0.1  # GO needs final/initial smoothed loss below this
    max_lpips: float = 0.2
    min_dino_swap: float = 0.6  # pass-rate thresholds
    min_text_manip: float = 0.6
    min_recon: float = 0.6  # shapes data: scorer-read reconstruction pass rate (objects + lighting)
    # shapes data: mean reconstruction PSNR. 18 dB is an RMS error of 1/8 of the pixel range; the plan
    # recipe's failed reconstructions (objects missing or smeared) measured 12-16 dB
    min_psnr: float = 18.0
    self_test: bool = (
        True  # at the end of training: the tests again with planted faults (validation.selftest)
    )
    plumbing_only: bool = False  # smoke runs: the decision checks the plumbing, not the architecture


@dataclass
class RunConfig:
    dir: str | None = None  # output folder; None: runs/<timestamp>
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {
    "train.compile_scope": ("model", "blocks"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "model.kernels": ("ref", "triton"),
    "model.attention": ("auto", "flash", "cudnn", "sdpa", "flex", "math"),
    "data.loader": ("auto", "gpu-cache", "dali", "webdataset"),
    "data.last_batch": ("partial", "drop"),
    "data.on_error": ("raise", "skip"),
    "data.check": ("auto", "full"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.strategy": ("auto", "none", "ddp", "fsdp"),
    "train.precision": ("fp32", "tf32", "bf16"),
    "val.vae_dtype": ("fp32", "bf16"),
    "val.lpips_net": ("alex", "vgg", "squeeze"),
}
POSITIVE = [
    "model.patch",
    "model.in_channels",
    "model.null_text_tokens",
    "data.synth_samples",
    "data.synth_size",
    "data.t5_pad_multiple",
    "train.steps",
    "train.batch_size",
    "train.grad_accum",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.loss_bins",
    "val.samples",
    "val.steps",
    "val.loss_window",
    "train.t_std",
    "train.t_shift",
    "val.sample_shift",
]
NON_NEGATIVE = [
    "train.lr",
    "train.min_lr",
    "train.warmup_steps",
    "train.weight_decay",
    "train.grad_clip",
    "train.ema_warmup_steps",
    "train.profile_steps",
    "train.profile_start",
    "val.every",
    "data.num_workers",
]
UNIT_INTERVAL = [
    "train.ema_decay",
    "train.p_drop_both",
    "train.p_drop_text",
    "train.p_drop_dino",
    "data.gpu_cache_fraction",
    "val.max_loss_ratio",
    "val.min_dino_swap",
    "val.min_text_manip",
]


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check(cfg: Config) -> Config:
    """Range and choice checks the type system cannot express. Raises ConfigError."""
    from nanodit.model import SIZES  # late import: the model module imports torch

    _check_ranges(cfg, SIZES)
    _check_train(cfg.train)
    _check_model(cfg, SIZES)
    _check_data(cfg.data)
    return cfg


def _check_ranges(cfg: Config, sizes: dict) -> None:
    """The choices, the model size (one of ``sizes``) and the numeric ranges of the keys listed above."""
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"config: {key}={_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    if cfg.model.size not in sizes:
        raise ConfigError(f"config: model.size={cfg.model.size!r} is not one of {', '.join(sizes)}")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"config: {key}={_get(cfg, key)} must be > 0")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"config: {key}={_get(cfg, key)} must be >= 0")
    for key in UNIT_INTERVAL:
        if not 0.0 <= _get(cfg, key) <= 1.0:
            raise ConfigError(f"config: {key}={_get(cfg, key)} must be in [0, 1]")


def _check_train(t: TrainConfig) -> None:
    if t.p_drop_both + t.p_drop_text + t.p_drop_dino > 1.0:
        raise ConfigError("config: train.p_drop_both + p_drop_text + p_drop_dino must be <= 1")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"config: train.betas={list(t.betas)} must be two numbers in [0, 1)")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"config: train.grad_accum={t.grad_accum} does not divide train.batch_size={t.batch_size} "
            "(the batch of one step is cut into grad_accum equal micro-batches)"
        )
    if t.step_graph and t.compile and t.compile_mode == "reduce-overhead":
        raise ConfigError(
            "config: train.step_graph=true captures the whole step in a CUDA graph; with "
            "train.compile_mode=reduce-overhead Inductor would record its own inside it: use compile_mode=default"
        )
    if t.min_lr > t.lr:
        raise ConfigError(f"config: train.min_lr={t.min_lr} must be <= train.lr={t.lr}")
    resume = Path(t.resume)
    if t.resume not in ("none", "auto") and not (
        resume.is_file() or resume.suffix == ".dcp" and resume.is_dir()
    ):
        raise ConfigError(
            f"config: train.resume={t.resume!r} is neither none, auto, a checkpoint file nor a .dcp checkpoint folder"
        )


def _check_model(cfg: Config, sizes: dict) -> None:
    m = cfg.model
    for key in ("depth", "width", "heads"):
        v = getattr(m, key)
        if v is not None and v <= 0:
            raise ConfigError(f"config: model.{key}={v} must be > 0")
    width = m.width or sizes[m.size]["width"]
    heads = m.heads or sizes[m.size]["heads"]
    if width % heads:
        raise ConfigError(f"config: model.width={width} is not divisible by model.heads={heads}")
    if cfg.data.synth_size % (2 * m.patch) or cfg.data.synth_size < 16:
        raise ConfigError(
            f"config: data.synth_size={cfg.data.synth_size} must be >= 16 and a multiple of 2*model.patch"
        )


def _check_data(d: DataConfig) -> None:
    if d.t5_max_len is not None and d.t5_max_len <= 0:
        raise ConfigError(f"config: data.t5_max_len={d.t5_max_len} must be > 0 (or null: the manifest's)")
    names = dataclasses.asdict(d.keys)
    for key, ext in names.items():
        if not ext or any(c.isspace() or c == "/" for c in ext) or ext.startswith("."):
            raise ConfigError(
                f"config: data.keys.{key}={ext!r} must be a tar member extension like 'latent.npy'"
            )
    dup = [e for e in set(names.values()) if list(names.values()).count(e) > 1]
    if dup:
        raise ConfigError(
            f"config: data.keys: {dup[0]!r} is given for two keys ({', '.join(k for k, e in names.items() if e == dup[0])})"
        )


def _printable(text: str) -> str:
    """Control characters (a newline in a key, say) escaped: an error stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _field_comments(cls) -> dict[str, str]:
    """The comment on (or above) each field of a config dataclass in its source: the field's description."""
    comments, above = {}, []
    lines = iter(inspect.getsource(cls).splitlines()[1:])
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+)\s*:[^#]*(?:#\s*(.*))?$", stripped)
        if m:
            tail = m.group(2) or ""
            # a default the formatter wrapped: its comment is inside the parentheses
            if stripped.endswith("= ("):
                for inner in lines:
                    if inner.strip() == ")":
                        break
                    tail = inner.partition("#")[2].strip() or tail
            comments[m.group(1)] = " ".join([*above, tail]).strip()
        above = []
    return comments


def describe(cfg: Config) -> str:
    """Every config key: ``section.key = value  (type)  description``, one per line (``nanodit config``)."""
    lines = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        notes = _field_comments(type(obj))
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):  # a nested group, e.g. data.keys
                for g in dataclasses.fields(value):
                    lines.append(f"  {section.name}.{f.name}.{g.name} = {getattr(value, g.name)!r}")
                continue
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            note = notes.get(f.name, "")
            lines.append(f"  {section.name}.{f.name} = {value!r}  ({kind})" + (f"  {note}" if note else ""))
    return "\n".join(lines)


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    # OmegaConf appends "\n    full_key: ...\n    object_type=..."; the key itself may hold a newline
    msg = re.split(r"\n\s+full_key:", str(err))[0].strip()
    return _printable(f"config: {key}: {msg}" if key else f"config: {msg}")


def resolve_config_path(name: str) -> Path:
    """A file path, or the name of a bundled config (nano, nano-plan, smoke, production)."""
    p = Path(name)
    if p.is_file():
        return p
    bundled = CONFIG_DIR / f"{name}.yaml"
    if bundled.is_file():
        return bundled
    raise ConfigError(
        f"config: --config {name!r}: no such file (bundled: nano, nano-plan, smoke, production)"
    )


def _load_file(p: Path):
    try:
        layer = OmegaConf.load(p)
    except Exception as e:  # yaml errors are multi-line
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise ConfigError(_printable(f"config: {p}: not valid YAML ({msg})")) from None
    if not isinstance(layer, DictConfig):  # a list or a scalar at the top
        raise ConfigError(
            f"config: {p}: the top level must be a mapping of sections (model:, data:, train:, ...)"
        )
    return layer


def _load_override(o: str):
    """One ``key=value`` as its own layer (layers merge in order, as one dotlist would), so that a bad one is
    named: the value is parsed as YAML and the key as an OmegaConf key path, both of which can fail oddly."""
    if "=" not in o:
        raise ConfigError(_printable(f"config: override {o!r} is not of the form key=value"))
    try:
        return OmegaConf.from_dotlist([o])
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    except (yaml.YAMLError, IndexError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise ConfigError(_printable(f"config: override {o!r}: not a valid key=value ({msg})")) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file < ``key=value`` overrides, type-checked and range-checked."""
    layers = [OmegaConf.structured(Config)]
    if path is not None:
        layers.append(_load_file(resolve_config_path(str(path))))
    layers += [_load_override(o) for o in overrides or []]
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    except TypeError as e:  # OmegaConf: a list or a scalar where the schema has a section
        raise ConfigError(
            _printable(f"config: {str(e).splitlines()[0]} (a value where a section belongs?)")
        ) from None
    return check(cfg)


def from_dict(d: dict) -> Config:
    """Rebuild a Config saved in a checkpoint (strict: unknown keys fail)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
