"""The training loop end to end on CPU: run folder contents, falling loss, exact resume, memorization."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import nanodit.train as train_mod
from nanodit.config import load_config
from nanodit.train import GIL_SWITCH_S, TrainError, main, train


def smoke_cfg(tmp_path, *overrides):
    return load_config(
        "smoke",
        [
            f"run.dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "run.progress=false",
            "val.at_end=false",
            "run.tensorboard=false",
            *overrides,
        ],
    )


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


def test_smoke_run_writes_the_run_folder_and_loss_falls(tmp_path):
    cfg = smoke_cfg(tmp_path, "train.steps=120", "train.ckpt_every=50", "run.tensorboard=true")
    summary = train(cfg, quiet=True)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and "steps: 120" in (run / "config.yaml").read_text()
    assert (run / "summary.json").is_file() and summary["steps"] == 120
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.pt")) == [
        "ckpt-00000050.pt",
        "ckpt-00000100.pt",
        "ckpt-00000120.pt",
    ]
    assert (run / "checkpoints" / "ema.safetensors").is_file() and (
        run / "checkpoints" / "model.safetensors"
    ).is_file()
    assert any((run / "tensorboard").iterdir())
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert {"loss", "lr", "samples_per_s", "ms_per_step"} <= set(rows[0])
    assert any(k.startswith("loss_t") for k in rows[0])
    ls = losses(run)
    assert sum(ls[-3:]) / 3 < 0.8 * sum(ls[:3]) / 3
    state = torch.load(run / "checkpoints" / "ckpt-00000120.pt", weights_only=False)
    assert {"model", "ema", "optim", "step", "rng", "loader", "config"} <= set(state)
    assert state["config"]["train"]["steps"] == 120


@pytest.mark.parametrize("steps", [6, 3])
def test_profile_window_writes_a_summary_and_a_trace(tmp_path, steps):
    """train.profile_steps: the window [start, start + n) is profiled; every loop region shows up with host
    time; a window that the run's end cuts short is still written, over the steps it saw; the training
    itself is unchanged (same losses as without the profiler)."""
    common = ["train.steps=6", "train.log_every=1"]
    cfg = smoke_cfg(tmp_path, *common, "train.profile_start=2", f"train.profile_steps={steps}")
    summary = train(cfg, quiet=True)
    prof = tmp_path / "run" / "profile"
    data = json.loads((prof / "summary.json").read_text())
    assert data == summary["profile"]
    assert data["steps"] == min(steps, 6 - 2) and data["first_step"] == 3
    assert set(data["host_ms_per_step"]) == {"data", "forward+loss", "backward", "optimizer", "ema"}
    assert all(v > 0 for v in data["host_ms_per_step"].values())
    assert data["wall_ms_per_step"] >= data["host_ms_per_step"]["forward+loss"]
    assert json.loads((prof / "trace.json").read_text())["traceEvents"]
    plain = smoke_cfg(tmp_path / "plain", *common)
    train(plain, quiet=True)
    assert losses(tmp_path / "run") == losses(tmp_path / "plain" / "run")
    assert not (tmp_path / "plain" / "run" / "profile").exists()


def test_resume_is_bitwise_exact(tmp_path):
    """20 steps straight == 10 steps, interruption, resume, 10 more (weights, EMA and optimizer state)."""
    a = smoke_cfg(tmp_path / "a", "train.steps=20", "train.log_every=5")
    train(a, quiet=True)
    b = smoke_cfg(tmp_path / "b", "train.steps=20", "train.log_every=5")
    train(b, quiet=True, stop_after=10)
    assert (tmp_path / "b" / "run" / "checkpoints" / "ckpt-00000010.pt").is_file()
    b_resume = smoke_cfg(tmp_path / "b", "train.steps=20", "train.log_every=5", "train.resume=auto")
    train(b_resume, quiet=True)
    sa = torch.load(tmp_path / "a" / "run" / "checkpoints" / "ckpt-00000020.pt", weights_only=False)
    sb = torch.load(tmp_path / "b" / "run" / "checkpoints" / "ckpt-00000020.pt", weights_only=False)
    for key in ("model", "ema"):
        assert sa[key].keys() == sb[key].keys()
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), (key, k)
    for pa, pb in zip(sa["optim"]["state"].values(), sb["optim"]["state"].values()):
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    assert sa["loader"] == sb["loader"]
    assert losses(tmp_path / "a" / "run")[2:] == losses(tmp_path / "b" / "run")[2:]


def test_existing_checkpoints_are_never_overwritten(tmp_path):
    cfg = smoke_cfg(tmp_path, "train.steps=4", "train.log_every=2")
    train(cfg, quiet=True)
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(cfg, quiet=True)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--config", "smoke", "train.stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config: train.stepz") and "\n" not in err
    assert main(["--config", "smoke", f"data.path={tmp_path / 'missing'}", f"run.dir={tmp_path / 'r'}"]) == 2
    assert "data.path" in capsys.readouterr().err


@pytest.mark.slow
def test_memorizes_a_handful_of_samples(tmp_path):
    """4 tiny shapes samples, no CFG dropout or flip: the loss ends below 10% of the loss at init.

    Initial = the first logged loss (mean of steps 1-10, the model still near its zero output);
    final = the mean of the last 5 logged losses (steps 751-800).
    """
    cfg = smoke_cfg(
        tmp_path,
        "data.synth_samples=4",
        "train.batch_size=4",
        "data.flip=false",
        "train.p_drop_both=0",
        "train.p_drop_text=0",
        "train.p_drop_dino=0",
        "model.size=small",
        "train.steps=800",
        "train.lr=2e-3",
        "train.warmup_steps=20",
        "train.ckpt_every=1000",
    )
    train(cfg, quiet=True)
    ls = losses(tmp_path / "run")
    first, last = ls[0], sum(ls[-5:]) / 5
    assert last < 0.1 * first, (first, last)


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_training_matches_eager(tmp_path, scope):
    """train.compile=true (Inductor on CPU), whole model or block by block: the same losses as eager to fp32
    rounding, the checkpoint holds the plain module's keys, and the block scope compiles one frame for all
    blocks (the cold-start saving it exists for)."""
    import torch._dynamo.utils as dutils

    size = "small" if scope == "blocks" else "tiny"  # small: depth 4, so sharing shows in the graph count
    common = ("train.steps=6", "train.log_every=1", f"model.size={size}", "val.every=0")
    eager = smoke_cfg(tmp_path / "e", *common)
    train(eager, quiet=True)
    torch._dynamo.reset()
    dutils.counters.clear()
    comp = smoke_cfg(tmp_path / "c", *common, "train.compile=true", f"train.compile_scope={scope}")
    train(comp, quiet=True)
    frames = dutils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    want, got = losses(tmp_path / "e" / "run"), losses(tmp_path / "c" / "run")
    assert len(got) == len(want) == 6
    assert max(abs(a - b) / a for a, b in zip(got, want)) < 1e-4, (got, want)
    state = torch.load(tmp_path / "c" / "run" / "checkpoints" / "ckpt-00000006.pt", weights_only=False)
    assert not any("_orig_mod" in k for k in state["model"])
    if scope == "blocks":  # one graph per distinct batch shape, shared by the 4 blocks (not one per block)
        assert 1 <= frames < 4, frames


def test_compile_dynamic_compiles_the_block_once_for_every_shape(tmp_path):
    """train.compile_dynamic=true with regional compilation: one frame for every batch shape of the run (the smoke
    set's buckets, full and partial batches, several caption lengths), where torch's default compiles again when a
    dim first changes; the losses are eager's to fp32 rounding (the rule of the test above)."""
    import torch._dynamo.utils as dutils

    common = ("train.steps=8", "train.log_every=1", "model.size=small", "val.every=0")
    train(smoke_cfg(tmp_path / "e", *common), quiet=True)
    torch._dynamo.reset()
    dutils.counters.clear()
    dyn = ("train.compile=true", "train.compile_scope=blocks", "train.compile_dynamic=true")
    summary = train(smoke_cfg(tmp_path / "d", *common, *dyn), quiet=True)
    frames = dutils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert summary["stages_s"]["shapes"] >= 3 and frames == 1, (summary["stages_s"]["shapes"], frames)
    want, got = losses(tmp_path / "e" / "run"), losses(tmp_path / "d" / "run")
    assert max(abs(a - b) / a for a, b in zip(got, want)) < 1e-4, (got, want)


def test_the_loop_runs_with_the_short_gil_switch_interval_and_restores_it(tmp_path, monkeypatch):
    """Worker threads (reports, checkpoint pickling) must not hold the GIL for Python's default 5 ms while the
    training thread waits to launch its next call: the loop runs at GIL_SWITCH_S, the caller's interval comes back
    after, also when the run fails."""
    seen = []
    inner = train_mod.loop

    def spy(run, stop, stop_after=None):
        seen.append(sys.getswitchinterval())
        return inner(run, stop, stop_after)

    monkeypatch.setattr(train_mod, "loop", spy)
    before = sys.getswitchinterval()
    train(smoke_cfg(tmp_path, "train.steps=2", "model.size=tiny"), quiet=True)
    assert seen == [pytest.approx(GIL_SWITCH_S)]
    assert sys.getswitchinterval() == before

    def boom(run, stop, stop_after=None):
        raise TrainError("planted")

    monkeypatch.setattr(train_mod, "loop", boom)
    with pytest.raises(TrainError):
        train(smoke_cfg(tmp_path / "b", "train.steps=2", "model.size=tiny"), quiet=True)
    assert sys.getswitchinterval() == before


def test_the_validation_imports_start_once_the_steps_run_at_speed(tmp_path, monkeypatch):
    """The heavy validation imports go to a worker thread after IMPORTS_AT_STEP steps (not beside the warm-up,
    whose Python would share the GIL with them), once, and the run still validates at the end."""
    from nanodit.validation.validator import Validator

    steps, started = [], []
    inner_step, inner_start = train_mod.train_step, Validator.start_imports

    def count_step(run):
        steps.append(run.step)
        return inner_step(run)

    def spy(self):
        started.append(len(steps))
        inner_start(self)

    monkeypatch.setattr(train_mod, "train_step", count_step)
    monkeypatch.setattr(Validator, "start_imports", spy)
    n = train_mod.IMPORTS_AT_STEP + 3
    cfg = smoke_cfg(tmp_path, f"train.steps={n}", "model.size=tiny", "val.at_end=true", "val.samples=2")
    summary = train(cfg, quiet=True)
    assert started[0] == train_mod.IMPORTS_AT_STEP and len(started) == n - train_mod.IMPORTS_AT_STEP + 1
    assert summary["report"]["decision"] in ("GO", "NO-GO", "INCOMPLETE")


def test_the_log_rows_tile_the_loop_and_the_train_stage_says_what_logging_took(tmp_path):
    # each row is timed from where the last one's timing ended, so the rows' step time adds up to the loop's
    # (warm-up and train stages; no validation or checkpoint inside here), the logging between rows included
    cfg = smoke_cfg(tmp_path, "train.steps=60", "train.log_every=10", "train.ckpt_every=1000")
    summary = train(cfg, quiet=True)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    rows_s = sum(r["ms_per_step"] * 10 for r in rows) / 1000
    st = summary["stages_s"]
    loop_s = st["train"] + st["warmup"]
    assert len(rows) == 6 and abs(rows_s - loop_s) <= 0.02 * loop_s + 0.01, (rows_s, loop_s)
    parts = st["train_parts"]
    assert set(parts) == {"log_wait", "log_write"} and all(v >= 0 for v in parts.values())
    assert 0 < parts["log_wait"] + parts["log_write"] < st["train"]
