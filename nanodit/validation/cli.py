"""``python -m nanodit.validate``: judge a run's checkpoint again (other sampler settings, encoders given later,
the self-test) and write its report.

    python -m nanodit.validate --run runs/nano                       # latest checkpoint of the run
    python -m nanodit.validate --run runs/nano --self-test           # plus the planted faults
    python -m nanodit.validate --run runs/nano --checkpoint runs/nano/checkpoints/ckpt-00003000.pt
    python -m nanodit.validate --run runs/real val.vae=/models/flux-vae val.lpips_weights=/models/alexnet.pth

Only ``val.*`` and the data/device keys below may be overridden: the weights fix everything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from nanodit.checkpoint import CheckpointError, latest_checkpoint
from nanodit.config import Config, ConfigError, check, describe, from_dict
from nanodit.data.prepare import prepare
from nanodit.data.shards import ShardError
from nanodit.device import DeviceError, pick_device, set_precision
from nanodit.dist_checkpoint import load_checkpoint
from nanodit.logs import add_verbosity, command_logging, verbosity
from nanodit.model import build_model
from nanodit.validation.cases import read_val_samples
from nanodit.validation.report import decision_lines
from nanodit.validation.validator import ValidateError, Validator, check_val, write_final

CLI_KEYS = ("val.", "data.path=", "data.cache_dir=", "train.device=", "train.precision=")


def load_run(run: str, checkpoint: str | None, overrides: list[str]) -> tuple[Config, dict, Path]:
    """(cfg, state, checkpoint path) of a run folder; one-line errors for a missing run, checkpoint or bad key."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise ValidateError(f"--run {run}: no such folder")
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise ValidateError(f"--checkpoint {checkpoint}: no such file")
    else:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ValidateError(f"--run {run}: no checkpoint in {run_dir / 'checkpoints'} (train it first)")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"config: override {o!r} is not of the form key=value")
        if not o.startswith(CLI_KEYS):
            raise ConfigError(
                f"config: override {o!r}: only val.*, data.path, data.cache_dir, train.device, train.precision can be changed here"
            )
    state = load_checkpoint(ckpt)
    merged = OmegaConf.merge(OmegaConf.create(state["config"]), OmegaConf.from_dotlist(list(overrides)))
    cfg = from_dict(OmegaConf.to_container(merged))
    cfg.train.resume = "none"  # the training run's resume path is irrelevant here
    check(cfg)
    check_val(cfg.val)
    return cfg, state, ckpt


def validate_checkpoint(
    run: str,
    checkpoint: str | None = None,
    overrides: list[str] | None = None,
    out: str | None = None,
    final: bool = False,
    self_test: bool = False,
) -> dict:
    """What ``python -m nanodit.validate`` does; returns {"path", "decision", "scores"}."""
    cfg, state, ckpt = load_run(run, checkpoint, overrides or [])
    device = pick_device(cfg.train.device)
    set_precision(cfg.train.precision, device)
    manifest_data, groups = read_val_samples(prepare(cfg), cfg.val.samples, cfg.data.on_error)
    manifest = state.get("manifest") or manifest_data
    model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"])
    model.load_state_dict(state["ema"])
    model.to(device).eval().requires_grad_(False)
    step = int(state["step"])
    run_dir = Path(run)
    step_dir = Path(out) if out else run_dir / "validation" / f"step-{step:08d}"
    validator = Validator(cfg, manifest, groups, device)
    result = validator.run(
        model, step, step_dir, run_dir, self_test=self_test, extra={"checkpoint": str(ckpt)}
    )
    path = write_final(run_dir, step_dir, result) if final else step_dir
    return {"path": str(path), "decision": result["decision"], "scores": result}


def overridable_keys() -> str:
    """The ``describe`` lines of the keys this command takes (``CLI_KEYS``), with their defaults."""
    lines = []
    for line in describe(Config()).splitlines():
        key = line.strip().split(" = ")[0]
        if any(key.startswith(k) if k.endswith(".") else key == k[:-1] for k in CLI_KEYS):
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="nanodit validate",
        description="Validate a run's EMA weights (reconstruction, DINO swap, text manipulation) and write the "
        "GO / NO-GO / INCOMPLETE report (= python -m nanodit.validate).",
        epilog="config keys it takes (key=value; the values shown are the defaults, a run's own come from its "
        "checkpoint; every other key is fixed by the weights):\n" + overridable_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--run", required=True, help="the run folder (config and checkpoints come from it)")
    ap.add_argument("--checkpoint", help="a checkpoint file (default: the run's latest)")
    ap.add_argument("--out", help="report folder (default: RUN/validation/step-<step>)")
    ap.add_argument("--final", action="store_true", help="also write the final report RUN/report/")
    ap.add_argument(
        "--self-test",
        action="store_true",
        help="repeat the tests with planted faults (cross-attention zeroed, constant DINO, untrained weights)",
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of val.* (and data.path, data.cache_dir, train.device, train.precision)",
    )
    add_verbosity(ap)
    args = ap.parse_args(argv)
    with command_logging(verbosity(args)):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        res = validate_checkpoint(
            args.run, args.checkpoint, args.overrides, args.out, args.final, args.self_test
        )
    except (ValidateError, ConfigError, ShardError, CheckpointError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = res["scores"]
    for c in s["criteria"].values():
        val = (
            "not computed"
            if not c["computed"]
            else f"{c['value']:.4g} {c['op']} {c['threshold']:g}: {'pass' if c['pass'] else 'FAIL'}"
        )
        print(f"  {c['name']:<13} {val}" + ("" if c["computed"] else f" ({c['why']})"))
    for line in decision_lines(s, res["path"]):
        print(line)
    return 0
