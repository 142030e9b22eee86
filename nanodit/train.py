"""Train NanoDiT by flow matching.

    python -m nanodit.train                                   # nano on a GPU, smoke on a CPU, built-in shapes data
    python -m nanodit.train --config configs/nano.yaml run.dir=runs/nano train.precision=bf16
    python -m nanodit.train --config smoke run.dir=runs/smoke train.resume=auto

The story: config -> device -> run folder -> data -> model -> objective -> optimizer/EMA -> compile ->
resume -> loop (log, checkpoint, validate) -> teardown (final checkpoint, final report).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nanodit.checkpoint import (
    CheckpointError,
    list_checkpoints,
    rng_state,
    save_checkpoint,
    save_state,
    set_rng_state,
)
from nanodit.config import Config, ConfigError, load_config, to_dict, to_yaml
from nanodit.data import build_loader
from nanodit.data.schema import skip_counts
from nanodit.data.shards import ShardError
from nanodit.device import DeviceError, pick_device, set_precision
from nanodit.flow import training_loss
from nanodit.model import build_model
from nanodit.nonfinite import StepGuard, grad_norm, stop_message
from nanodit.optim import EMA, build_optimizer, ema_decay_at, lr_at
from nanodit.provenance import code_version
from nanodit.resume import check_compatible, load_into, pick_checkpoint
from nanodit.runlog import (
    LossWindow,
    MetricsLogger,
    RunDirError,
    data_line,
    first_logged_loss,
    log_row,
    prepare_run_dir,
    write_atomic,
)
from nanodit.signals import GracefulStop, Interrupted, signal_name
from nanodit.tracing import StepProfiler
from nanodit.validation import Validator, read_val_samples, write_final
from nanodit.validation.report import decision_lines


class TrainError(RuntimeError):
    """A problem a user can fix; printed as one line."""


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def train(cfg: Config, quiet: bool = False, stop_after: int | None = None) -> dict:
    """Run a training job described by ``cfg``. Returns a summary dict (also written as summary.json).

    ``stop_after`` (tests): stop after that step with a checkpoint, as if the job had been interrupted.
    SIGINT/SIGTERM stop it the same way and raise ``Interrupted`` (nanodit/signals.py).
    """
    with GracefulStop() as stop:
        return _train(cfg, quiet, stop_after, stop)


def _train(cfg: Config, quiet: bool, stop_after: int | None, stop: GracefulStop) -> dict:
    say = (lambda *a: None) if quiet else print

    # ---- device and precision ----------------------------------------------------------------
    device = pick_device(cfg.train.device)
    autocast = set_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)

    # ---- run folder ---------------------------------------------------------------------------
    run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir()
    stale = prepare_run_dir(run_dir)  # before any work: a folder that cannot be written is one line
    if stale:
        say(
            f"run folder: removed {len(stale)} temp file(s) of an interrupted write ({', '.join(p.name for p in stale)})"
        )
    if cfg.train.resume == "none" and list_checkpoints(run_dir):
        raise TrainError(
            f"run.dir={run_dir} already holds checkpoints; pass train.resume=auto to continue it or pick a new run.dir"
        )
    resume_from, state = pick_checkpoint(run_dir, cfg.train.resume, device, say)
    if state is not None:
        check_compatible(state, cfg)  # the model's shape, before the data is read
    write_atomic(run_dir / "config.yaml", to_yaml(cfg))

    # ---- data ---------------------------------------------------------------------------------
    manifest, loader = build_loader(cfg, device, progress=cfg.run.progress and not quiet)
    say(data_line(loader))
    for problem in loader.problems:  # data-set problems kept going under data.on_error=skip
        say(f"warning: {problem}")

    # ---- model and objective ------------------------------------------------------------------
    model = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"model: {cfg.model.size} {n_params / 1e6:.1f}M params, kernels={cfg.model.kernels}, "
        f"attention={cfg.model.attention}, precision={cfg.train.precision}, compile={cfg.train.compile}, device={device}"
    )
    flow_loss = model.ops.flow_loss
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)

    # ---- optimizer and EMA --------------------------------------------------------------------
    optim = build_optimizer(model, cfg.train, device)
    ema = EMA(model)
    guard = StepGuard(optim)  # a non-finite step is masked on the device (nanodit/nonfinite.py)

    # ---- validation: the run's judge, built once from its config, manifest and samples -------
    validator = None
    if cfg.val.every or cfg.val.at_end:
        _, val_groups = read_val_samples(loader.root, cfg.val.samples, cfg.data.on_error)
        validator = Validator(cfg, manifest, val_groups, device)

    # ---- compile (checkpoints always hold the uncompiled module) ------------------------------
    fwd = model
    cudagraphs = cfg.train.compile and cfg.train.compile_mode == "reduce-overhead" and device.type == "cuda"
    if cfg.train.compile:
        # one graph per bucket shape (and per last-batch size and caption length, until dynamo marks those
        # dims dynamic): raise dynamo's default limit of 8 so that no bucket silently falls back to eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
        if cfg.train.compile_scope == "blocks":
            # regional compilation: every block runs the same compiled code (dynamo lifts the parameters to
            # inputs), so the cold start compiles one block per shape instead of the whole network; the rest
            # of the forward (embedders, final layer) stays eager. In place: state_dict keys are unchanged.
            for block in model.blocks:
                block.compile(mode=mode)
        else:
            fwd = torch.compile(model, mode=mode)

    # ---- resume -------------------------------------------------------------------------------
    step, book = 0, {}
    if state is not None:
        for warning in check_compatible(state, cfg, manifest):
            say(warning)
        load_into(state, model, ema, optim, resume_from)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"], generator)
        step = int(state["step"])
        book = state.get("log", {})  # the loss window and the run's first loss (runlog.py)
        say(f"resume: {resume_from} (step {step})")
        del state

    # ---- loop ---------------------------------------------------------------------------------
    metrics = MetricsLogger(run_dir, cfg.run.tensorboard, step)  # rows after the resumed step go
    t = cfg.train
    bar = None
    if cfg.run.progress and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=step, desc="train", dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    window = LossWindow(device, t.loss_bins)
    if "window" in book:
        window.load_state_dict(book["window"])
    first_loss = book.get("first_loss", first_logged_loss(run_dir / "metrics.jsonl") if step else None)
    last_loss, nonfinite_total, saved, rows_logged = None, int(book.get("nonfinite_steps", 0)), {}, 0
    skipped = skip_counts(loader.skipped)

    def state_now(at: int) -> dict:
        return {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optim": optim.state_dict(),
            "step": at,
            "rng": rng_state(generator),
            "loader": loader.state_dict(),
            "config": to_dict(cfg),
            "manifest": manifest,
            "log": {
                "window": window.state_dict(),
                "first_loss": first_loss,
                "nonfinite_steps": nonfinite_total,
            },
        }

    def checkpoint(at: int) -> Path:
        if at not in saved:  # a stop right after a periodic save reuses it
            saved[at] = save_checkpoint(run_dir, at, state_now(at), keep=t.keep_checkpoints)
        return saved[at]

    def close_all() -> None:
        if bar is not None:
            bar.close()
        metrics.close()
        loader.close()

    prof = StepProfiler(run_dir / "profile", t.profile_start, t.profile_steps, device)
    stop.arm()  # from here a signal stops the run after the current step, with a checkpoint
    while step < t.steps:
        prof.at(step)
        t_wait = time.perf_counter()
        with prof.region("data"):
            batch = next(loader)
        window.wait += time.perf_counter() - t_wait  # host time in the loader (async copies excluded)
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.steps)
        for g in optim.param_groups:
            g["lr"] = lr
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs may be reused
        with prof.region("forward+loss"):
            loss, stats = training_loss(
                fwd, batch, flow_loss, generator, t.t_mean, t.t_std, t.loss_bins, autocast, t.t_shift
            )
        with prof.region("backward"):
            optim.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0 else None
            )
        with prof.region("optimizer"):
            ok = guard.check(loss, gnorm if gnorm is not None else grad_norm(model.parameters()))
            guard.step(ok, step + 1, batch["ids"])  # masked on the device where not ok: no host sync
        with prof.region("ema"):
            ema.update(model, ema_decay_at(step, t.ema_decay, t.ema_warmup_steps))
        step += 1
        window.add(loss, stats, ok, batch["latent"].shape[0])

        if step % t.log_every == 0 or step == t.steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            bad = guard.read()  # the window's finite flags, in one transfer
            nonfinite_total += len(bad)
            row = log_row(window, bad, lr, gnorm, loader.state_dict()["epoch"], t.loss_bins)
            if skipped and not rows_logged:
                row["data_skipped"] = skipped  # samples skipped by reason, in this process's first row
            rows_logged += 1
            mean_loss = row["loss"]
            if mean_loss is not None:
                first_loss = mean_loss if first_loss is None else first_loss
                last_loss = mean_loss
            metrics.log(step, row)
            if bar is not None and mean_loss is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", sps=f"{row['samples_per_s']:.0f}")
            window.reset()
            if bad and t.on_nonfinite == "stop":
                kept = save_state(
                    run_dir / "nonfinite" / f"ckpt-{step:08d}.pt", {**state_now(step), "nonfinite": bad}
                )
                close_all()
                raise TrainError(stop_message(bad, step, kept))
            if bad:
                say(
                    f"step {step}: skipped {len(bad)} non-finite step(s) ({', '.join(str(s) for s, _ in bad[:5])})"
                )
        if bar is not None:
            bar.update(1)
        if step % t.ckpt_every == 0 and step < t.steps:
            checkpoint(step)
        if stop_after is not None and step >= stop_after:
            checkpoint(step)
            close_all()
            return {"run_dir": str(run_dir), "steps": step, "interrupted": True}
        if stop.requested is not None:  # SIGINT / SIGTERM: this step is done; save it and go
            path = checkpoint(step)
            close_all()
            raise Interrupted(
                stop.requested,
                f"interrupted by {signal_name(stop.requested)} after step {step}: checkpoint {path} "
                "(continue with train.resume=auto)",
            )
        if validator is not None and cfg.val.every and step % cfg.val.every == 0 and step < t.steps:
            validate_ema(validator, ema, run_dir, step, metrics, say)
            window.t0 = time.perf_counter()

    # ---- teardown -----------------------------------------------------------------------------
    if bar is not None:
        bar.close()
    prof.close(step)
    final = checkpoint(step)
    summary = {
        "run_dir": str(run_dir),
        "steps": step,
        "first_logged_loss": first_loss,
        "last_logged_loss": last_loss,
        "checkpoint": str(final),
        "data": {"samples": sum(loader.counts.values()), "skipped": skipped, "checked": loader.checked},
        "nonfinite_steps": nonfinite_total,
        "params": n_params,
        "code": code_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if prof.summary is not None:
        summary["profile"] = prof.summary
        say(f"profile: {run_dir / 'profile'} (trace.json, summary.txt)")
    report = None
    if validator is not None and cfg.val.at_end:
        report = validate_ema(validator, ema, run_dir, step, metrics, say, final=True)
        if report is not None:  # the scores themselves are in the report folder's scores.json
            summary["report"] = {"path": report["path"], "decision": report["decision"]}
    metrics.close()
    loader.close()
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    say(f"done: {step} steps, loss {first_loss} -> {last_loss}")
    say(f"run folder: {run_dir} (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)")
    if report is not None:
        for line in decision_lines(report["scores"], report["path"]):
            say(line)
    return summary


def validate_ema(validator: Validator, ema: EMA, run_dir: Path, step: int, metrics, say, final: bool = False):
    """Judge the EMA weights at ``step`` into ``run_dir/validation/step-<step>/`` (with ``final`` also
    ``run_dir/report/``, and the self-test when ``val.self_test``). The live model is not touched: a fresh eager
    twin gets the EMA weights (the live blocks may be compiled, and validation shapes would only add compiles).
    A failure here is reported and logged but never ends training or loses a checkpoint (re-validate later).
    Returns {"path", "decision", "scores"} or None."""
    cfg, manifest = validator.cfg, validator.manifest
    step_dir = run_dir / "validation" / f"step-{step:08d}"
    try:
        vmodel = build_model(cfg.model, manifest["dino_dim"], manifest["t5_dim"]).to(validator.device)
        ema.copy_to(vmodel)
        vmodel.eval().requires_grad_(False)
        ckpt = run_dir / "checkpoints" / f"ckpt-{step:08d}.pt"  # the weights judged, when saved at this step
        extra = {"checkpoint": str(ckpt)} if ckpt.is_file() else None
        result = validator.run(
            vmodel, step, step_dir, run_dir, metrics, self_test=final and cfg.val.self_test, extra=extra
        )
        del vmodel
        path = write_final(run_dir, step_dir, result) if final else step_dir
    except Exception as e:  # validation must not kill a long run: the checkpoint can be re-validated later
        msg = f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        say(f"validation failed at step {step}: {msg} (re-run: python -m nanodit.validate --run {run_dir})")
        metrics.log(step, {"validation_error": msg})
        return None
    if not final:
        say(f"validation step {step}: {result['decision']}  ({step_dir})")
    return {"path": str(path), "decision": result["decision"], "scores": result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m nanodit.train", description="Train NanoDiT by flow matching."
    )
    ap.add_argument(
        "--config",
        help="a YAML file or a bundled name (nano, smoke, production); "
        "default: nano on a GPU, smoke on a CPU",
    )
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200 run.dir=runs/x")
    args = ap.parse_args(argv)
    try:
        name = args.config
        if name is None:
            name = "nano" if torch.cuda.is_available() else "smoke"
            if name == "smoke":
                print("no GPU found: running the smoke config (a minute on a CPU); pass --config to choose")
        cfg = load_config(name, args.overrides)
        train(cfg)
    except Interrupted as e:
        print(f"{e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, TrainError, ShardError, CheckpointError, DeviceError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
