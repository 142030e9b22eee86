"""The Validator: the part of a run that judges weights. Built once from the run's config, manifest and
validation samples (the trainer hands them over), it generates every case, scores it, measures how much each
condition moves the prediction, decides GO / NO-GO / INCOMPLETE, runs the self-test and writes the report.

    v = Validator(cfg, manifest, groups, device)
    result = v.run(model, step, out_dir, run_dir, self_test=True)    # model holds the weights to judge (eval)
    result["decision"], result["criteria"], result["self_test"]

Sampling: ``val.samples`` cases per test, fixed noise per sample, ``val.steps`` Euler steps spaced by
``val.sample_shift``, dual guidance (``val.guidance_dino`` / ``val.guidance_text``), in the run's precision.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import nanodit.validation.report as report
from nanodit.config import Config, ConfigError, ValConfig
from nanodit.data.shards import Sample
from nanodit.device import autocast_for, device_name
from nanodit.model import build_model
from nanodit.provenance import code_version
from nanodit.runlog import timed
from nanodit.validation.cases import has_scenes, select_cases
from nanodit.validation.criteria import build_criteria, decide, warnings_for
from nanodit.validation.metrics import import_heavy, loss_ratio, read_loss_bins, read_loss_log
from nanodit.validation.sampling import condition_effect, generate
from nanodit.validation.scoring import score_cases
from nanodit.validation.selftest import FAULTS, planted, summarize
from nanodit.validation.tools import Tools, load_tools

log = logging.getLogger(__name__)


class ValidateError(RuntimeError):
    """A problem a user can fix (missing run, checkpoint, bad option); printed as one line."""


def check_val(vcfg: ValConfig) -> None:
    """Range checks for the options only validation reads (config.check covers the rest)."""
    if not 0.0 <= vcfg.min_recon <= 1.0:
        raise ConfigError(f"config: val.min_recon={vcfg.min_recon} must be in [0, 1]")


def recipe(cfg: Config) -> dict:
    """The settings that make a run what it is, for the report's identity block."""
    t, v = cfg.train, cfg.val
    return {
        "model": cfg.model.size,
        "kernels": cfg.model.kernels,
        "steps": t.steps,
        "batch_size": t.batch_size,
        "lr": t.lr,
        "t_mean": t.t_mean,
        "t_std": t.t_std,
        "t_shift": t.t_shift,
        "ema_warmup_steps": t.ema_warmup_steps,
        "precision": t.precision,
        "seed": t.seed,
        "sample_steps": v.steps,
        "sample_shift": v.sample_shift,
        "guidance_dino": v.guidance_dino,
        "guidance_text": v.guidance_text,
        "samples_per_test": v.samples,
    }


class Validator:
    """Judges weights on a fixed set of cases; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        manifest: dict,
        groups: dict[tuple[int, int], list[Sample]],
        device: torch.device,
        tools: Tools | None = None,
    ):
        check_val(cfg.val)
        self.cfg, self.vcfg, self.manifest, self.device = cfg, cfg.val, manifest, torch.device(device)
        self.shapes = has_scenes(manifest, groups)
        self.tools = tools if tools is not None else load_tools(manifest, cfg.val, self.device, self.shapes)
        self.cases = select_cases(groups, cfg.val.samples, self.shapes, cfg.val.seed)
        self.autocast = autocast_for(cfg.train.precision, self.device)
        dinos = [s.dino.astype(np.float32) for g in groups.values() for s in g]
        self.dino_mean = np.mean(dinos, axis=0) if dinos else None  # (Dd,) the const_dino fault's constant
        # host seconds by part of the last ``run`` (sample, score, effects, self_test.sample, ..., report, log)
        self.timing: dict[str, float] = {}
        self._prefix = ""
        # the trainer's eval model, its EMA weights copied in at each validation
        self.twin: torch.nn.Module | None = None
        self.background_timing: dict[str, float] = {}  # seconds the worker thread spent writing (all runs)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future] | None = None  # (step, its background write)
        # the background import of metrics and plots (start_imports)
        self.imports: threading.Thread | None = None

    def start_imports(self) -> None:
        """Import the metrics' and plots' modules (``import_heavy``) in a daemon thread, once: the trainer calls
        this when its steps run at speed, so the first validation does not wait for them."""
        if self.imports is None:
            self.imports = threading.Thread(target=import_heavy, name="nanodit-imports", daemon=True)
            self.imports.start()

    def _timed(self, part: str) -> contextlib.AbstractContextManager[None]:
        return timed(self.timing, self._prefix + part)

    # -- one judgement -------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, run_dir: str | Path, effects: bool = True) -> dict:
        """Generate, score and decide for ``model`` as it is (no files written)."""
        t0 = time.perf_counter()
        with self._timed("sample"):
            outs = generate(model, self.cases, self.vcfg, self.autocast)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        t_sample = time.perf_counter() - t0
        with self._timed("score"):
            scored = score_cases(self.cases, outs, self.shapes, self.tools)
        with self._timed("effects"):
            eff = condition_effect(model, self.cases, self.vcfg.seed, self.autocast) if effects else None
        log = Path(run_dir) / "metrics.jsonl"
        loss = loss_ratio([v for _, v in read_loss_log(log)], self.vcfg.loss_window)
        bins = read_loss_bins(log)
        crit = build_criteria(scored["numbers"], self.vcfg, loss, self.shapes, self.tools, eff, bins)
        return {
            **decide(crit),
            "criteria": {c["name"]: c for c in crit},
            "numbers": scored["numbers"],
            "cases": scored["cases"],
            "images": scored["images"],
            "effects": eff,
            "loss_bins": bins,
            "sample_seconds": t_sample,
        }

    # -- the self-test -------------------------------------------------------------------------
    def self_test(self, model: torch.nn.Module, intact: dict, run_dir: str | Path) -> dict:
        """Every planted fault on the same cases; ``power`` says whether each failed its target (shapes
        data; None on real data, where the report shows how far the faults move the scores)."""
        entries = {}
        for name in FAULTS:
            if name == "untrained":
                with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
                    torch.manual_seed(self.cfg.train.seed)
                    m = build_model(self.cfg.model, self.manifest["dino_dim"], self.manifest["t5_dim"])
                res = self.evaluate(m.to(self.device).eval().requires_grad_(False), run_dir, effects=False)
                del m
            else:
                with planted(model, name, self.dino_mean):
                    res = self.evaluate(model, run_dir, effects=False)
            entries[name] = summarize(name, self.shapes, intact, res)
        caught = [e["caught"] for e in entries.values()]
        power = all(c is True for c in caught) if self.shapes else None
        return {"faults": entries, "power": power}

    # -- the whole validation, written ---------------------------------------------------------
    def run(
        self,
        model: torch.nn.Module,
        step: int,
        out_dir: str | Path,
        run_dir: str | Path,
        metrics=None,
        self_test: bool = False,
        extra: dict | None = None,
        background: bool = False,
    ) -> dict:
        """Validate ``model`` (already holding the weights to judge, in eval mode) and write ``out_dir``
        (``background``: in a worker thread, done by the next ``run``, ``wait`` or ``close``).

        Returns the scores dict (also ``out_dir/scores.json``). ``metrics`` (the trainer's MetricsLogger) gets
        the scores and grids for TensorBoard; ``extra`` entries (e.g. the checkpoint path) are added."""
        self.wait()  # one validation's files at a time, in step order
        t0 = time.perf_counter()
        self.timing = {}
        ev = self.evaluate(model, run_dir)
        result = self._result(ev, step, run_dir)
        if self_test:
            self._add_self_test(result, model, ev, run_dir)
        result.update(extra or {})
        result["seconds"] = time.perf_counter() - t0
        if metrics is not None:
            report.log_scores(metrics, step, result)  # metrics.jsonl is the training thread's to write
        if background:  # the files and TensorBoard's images while training goes on (CPU work: PNG, plots)
            args = (out_dir, result, ev["images"], metrics, self.background_timing)
            self._pending = (step, self._executor().submit(self._write, *args))
        else:
            self._write(out_dir, result, ev["images"], metrics, self.timing)
        return result

    def _result(self, ev: dict, step: int, run_dir: str | Path) -> dict:
        """The scores dict of an evaluation: its criteria and numbers, what was judged and how it was sampled."""
        result = {k: v for k, v in ev.items() if k not in ("images", "sample_seconds")}
        result.update(step=step, data="shapes" if self.shapes else "real", decoder=self.tools.decoder_info)
        result["lpips"] = self.tools.lpips_info
        result["warnings"] = warnings_for(ev["effects"])
        result["plumbing_only"] = self.vcfg.plumbing_only
        result["identity"] = {
            **code_version(),
            "run_dir": str(run_dir),
            "config": str(Path(run_dir) / "config.yaml"),
            **recipe(self.cfg),
        }
        result["sampling"] = {
            "steps": self.vcfg.steps,
            "shift": self.vcfg.sample_shift,
            "guidance_dino": self.vcfg.guidance_dino,
            "guidance_text": self.vcfg.guidance_text,
            "seed": self.vcfg.seed,
            "samples_per_test": self.vcfg.samples,
            "sampler_calls": len({c.bucket for c in self.cases}),
            "precision": self.cfg.train.precision,
            "device": device_name(self.device),
            "seconds": ev["sample_seconds"],
        }
        result["loss_curve"] = [[s, v] for s, v in read_loss_log(Path(run_dir) / "metrics.jsonl")]
        return result

    def _add_self_test(self, result: dict, model: torch.nn.Module, ev: dict, run_dir: str | Path) -> None:
        """The planted faults into ``result["self_test"]``; a GO whose self-test missed a fault is INCOMPLETE."""
        self._prefix = "self_test."
        try:
            with self._timed("other"):  # model builds, planting; sample and score are counted apart
                st = self.self_test(model, ev, run_dir)
        finally:
            self._prefix = ""
        inner = sum(
            v for k, v in self.timing.items() if k.startswith("self_test.") and k != "self_test.other"
        )
        self.timing["self_test.other"] -= inner
        result["self_test"] = st
        if st["power"] is False and result["decision"] == "GO":
            missed = [e["fault"] for e in st["faults"].values() if e["caught"] is not True]
            result["decision"] = "INCOMPLETE"
            result["no_power"] = missed

    @staticmethod
    def _write(out_dir: str | Path, result: dict, images: dict, metrics, timing: dict[str, float]) -> None:
        """The validation folder (report.md/html, grids, plots, scores.json) and TensorBoard's images; their
        seconds are added to ``timing``."""
        with timed(timing, "report"):
            report.write_report(out_dir, result, images)
        if metrics is not None:
            with timed(timing, "log"):
                report.log_media(metrics, result["step"], result, Path(out_dir))

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanodit-report")
        return self._pool

    def wait(self) -> None:
        """Finish the last background write (``run(background=True)``). Its failure is a warning: the scores
        are in metrics.jsonl and the checkpoint can be re-validated; a run never ends for a report."""
        if self._pending is None:
            return
        (step, future), self._pending = self._pending, None
        try:
            future.result()
        except Exception as e:
            msg = f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning(f"validation report of step {step} not written: {msg}")

    def close(self) -> None:
        """Wait for the last background write and stop its thread."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def run_validation(
    model: torch.nn.Module,
    manifest: dict,
    groups: dict[tuple[int, int], list[Sample]],
    cfg: Config,
    run_dir: str | Path,
    step: int,
    out_dir: str | Path,
    metrics=None,
    tools: Tools | None = None,
    extra: dict | None = None,
    self_test: bool = False,
) -> dict:
    """One-off validation of ``model`` (a Validator built for this call)."""
    device = next(model.parameters()).device
    v = Validator(cfg, manifest, groups, device, tools)
    return v.run(model, step, out_dir, run_dir, metrics, self_test=self_test, extra=extra)


def write_final(run_dir: str | Path, step_dir: str | Path, result: dict) -> Path:
    """The final report ``run_dir/report/``: the last validation's files plus the history of every step."""
    run_dir = Path(run_dir)
    final = run_dir / "report"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(step_dir, final)
    hist = report.history(run_dir / "validation")
    report.write_report(final, result, None, history=hist, final=True)
    return final
