"""The trainer under failure: signals, an unwritable folder, a full disk, non-finite steps, resumes that must be
refused or may differ, corrupt checkpoints, and the records (metrics.jsonl, summary.json) across resumes.

Runs that must be killed or signalled run as real processes (``python -m nanodit.train``); the rest call
``train`` in-process. The tiny model on the smoke config's 24-sample shapes set keeps each run to seconds.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from smokerun import smoke_cache, tiny_overrides

import nanodit.checkpoint as ckpt_mod
import nanodit.train as train_mod
from nanodit.checkpoint import CheckpointError, list_checkpoints
from nanodit.config import load_config
from nanodit.nonfinite import StepGuard
from nanodit.resume import ResumeError
from nanodit.train import TrainError, main, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The smoke config's shapes set, generated once for every run of this file."""
    return smoke_cache(tmp_path_factory)


overrides = tiny_overrides


def cfg(run: Path, cache: Path, *extra: str):
    return load_config("smoke", overrides(run, cache, *extra))


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def loss_rows(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows(run) if "loss" in r]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def assert_same_state(a: Path, b: Path) -> None:
    """Bitwise: weights, EMA, optimizer moments and steps, loader position, every RNG."""
    sa, sb = load(a), load(b)
    assert sa["step"] == sb["step"]
    for key in ("model", "ema"):
        assert sa[key].keys() == sb[key].keys()
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), (key, k)
    for pa, pb in zip(sa["optim"]["state"].values(), sb["optim"]["state"].values()):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k
    assert sa["loader"] == sb["loader"]
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    assert torch.equal(sa["rng"]["generator"], sb["rng"]["generator"])


def final(run: Path) -> Path:
    return list_checkpoints(run)[-1]


def reference(tmp_path: Path, cache: Path, steps: int, *extra: str) -> Path:
    run = tmp_path / f"ref-{steps}"
    if not run.exists():
        train(cfg(run, cache, f"train.steps={steps}", *extra), quiet=True)
    return run


def spawn(run: Path, cache: Path, *extra: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "nanodit.train", "--config", "smoke", *overrides(run, cache, *extra)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for_rows(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(
        f"no {n} logged steps (rc {proc.poll()}): {proc.stderr.read() if proc.poll() else ''}"
    )


# ---------------------------------------------------------------------------------------------
# signals


@pytest.mark.parametrize("sig, loader", [(signal.SIGINT, "gpu-cache"), (signal.SIGTERM, "webdataset")])
def test_signal_finishes_the_step_saves_and_exits_128_plus_signum(tmp_path, cache, sig, loader):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM, sent to the whole process group (DataLoader workers
    included): the step finishes, a checkpoint is written, one line says where, the exit code is 130 / 143;
    resuming continues bitwise as if nothing had happened, every step logged once."""
    run = tmp_path / "run"
    extra = ("train.steps=400", f"data.loader={loader}", "data.num_workers=2")
    proc = spawn(run, cache, *extra, start_new_session=True)
    wait_for_rows(run, 3, proc)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    last = err.strip().splitlines()[-1]
    stopped = int(last.split("after step ")[1].split(":")[0])
    ckpt = run / "checkpoints" / f"ckpt-{stopped:08d}.pt"
    assert last == (
        f"interrupted by {signal.Signals(sig).name} after step {stopped}: checkpoint {ckpt} "
        "(continue with train.resume=auto)"
    )
    assert "Traceback" not in err and load(ckpt)["step"] == stopped
    steps = stopped + 3
    train(cfg(run, cache, f"train.steps={steps}", "train.resume=auto", *extra[1:]), quiet=True)
    ref = reference(tmp_path, cache, steps, *extra[1:])
    assert_same_state(final(run), final(ref))
    assert loss_rows(run) == loss_rows(ref) and [s for s, _ in loss_rows(run)] == list(range(1, steps + 1))
    first = [json.loads((r / "summary.json").read_text())["first_logged_loss"] for r in (run, ref)]
    assert first[0] == first[1] == loss_rows(ref)[0][1]  # the run's first loss, not the resumed process's


def test_second_ctrl_c_aborts_at_once(tmp_path, cache):
    """The first SIGINT asks for a stop after the step; a second one, sent as soon as the first is
    acknowledged, ends the process at once (exit 130, one line), and what is on disk is still resumable."""
    run = tmp_path / "run"
    # a slow step (the small model at a larger width): the second signal lands while it is still running
    proc = spawn(run, cache, "train.steps=400", "model.size=small", "model.width=512", "model.heads=8")
    wait_for_rows(run, 1, proc, timeout=300)
    proc.send_signal(signal.SIGINT)
    for _ in range(100):  # past whatever else went to stderr (library warnings at import, say)
        line = proc.stderr.readline()
        if "SIGINT: stopping after this step" in line or not line:
            break
    assert "SIGINT: stopping after this step and writing a checkpoint (Ctrl-C again aborts at once)" in line
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - t0 < 30
    assert err.strip().splitlines()[-1] == "SIGINT again: aborted at once; the last checkpoint is intact"
    for p in list_checkpoints(run):  # whatever is listed loads; a half-written temp file is not listed
        load(p)


def test_graceful_stop_before_and_during_the_loop():
    """Before arm(): the first signal raises Interrupted (nothing to save). After: it only sets the flag; the
    second calls os._exit(128 + signum) (checked in a child process)."""
    from nanodit.signals import GracefulStop, Interrupted

    with GracefulStop():
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        assert e.value.exit_code == 143 and "before the first step" in str(e.value)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
    script = textwrap.dedent(
        """
        import os, signal, time
        from nanodit.signals import GracefulStop
        with GracefulStop() as stop:
            stop.arm()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            assert stop.requested == signal.SIGINT
            print("flag", flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        print("not reached")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 130 and p.stdout == "flag\n" and "aborted at once" in p.stderr


# ---------------------------------------------------------------------------------------------
# file system


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_unwritable_run_folder_is_one_line_before_any_work(tmp_path, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    run = blocker / "run" if where == "under-a-file" else blocker
    data_cache = tmp_path / "cache-never-made"
    assert main(["--config", "smoke", *overrides(run, data_cache)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run.dir={run}: cannot write there") and "\n" not in err
    assert not data_cache.exists()  # nothing was done before the error: not even the data


def test_failed_save_removes_its_temp_file_and_keeps_the_previous_checkpoint(
    tmp_path, cache, capsys, monkeypatch
):
    """The disk fills while the step-4 checkpoint is written (the writer wrote part of it, then ENOSPC):
    one line naming the file and the intact checkpoint, exit 2, no temp file left; the next run resumes from
    step 2 and ends bitwise where an uninterrupted run ends."""
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    run = tmp_path / "run"
    args = ["--config", "smoke", *overrides(run, cache, "train.steps=6", "train.ckpt_every=2")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    ck = run / "checkpoints"
    assert err.startswith(
        f"error: checkpoint of step 4 not written: {ck / 'ckpt-00000004.pt'}: No space left on device"
    )
    assert (
        f"temp file removed, the newest intact checkpoint is {ck / 'ckpt-00000002.pt'}" in err
        and "\n" not in err
    )
    assert sorted(p.name for p in ck.iterdir()) == [
        "ckpt-00000002.pt",
        "ema.safetensors",
        "model.safetensors",
    ]
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    train(cfg(run, cache, "train.steps=6", "train.ckpt_every=2", "train.resume=auto"), quiet=True)
    assert_same_state(final(run), final(reference(tmp_path, cache, 6, "train.ckpt_every=2")))


def test_a_real_write_failure_in_torch_save_is_one_line(tmp_path, cache):
    """No mock: the file-size limit (RLIMIT_FSIZE) makes torch's own zip writer fail mid-file, as a full disk
    does. The resumed process exits 2 with one line; the step-2 checkpoint stays intact; no temp file."""
    run = tmp_path / "run"
    train(cfg(run, cache, "train.steps=6"), quiet=True, stop_after=2)
    size = (run / "checkpoints" / "ckpt-00000002.pt").stat().st_size

    def limit():  # big enough for metrics.jsonl and config.yaml, too small for a checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 4, resource.RLIM_INFINITY))

    proc = spawn(run, cache, "train.steps=6", "train.resume=auto", preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    line = err.strip()
    assert line.startswith("error: checkpoint of step 6 not written: ") and "\n" not in line
    assert "temp file removed, the newest intact checkpoint is" in line and "ckpt-00000002.pt" in line
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert load(run / "checkpoints" / "ckpt-00000002.pt")["step"] == 2


def test_stale_temp_files_are_removed_at_start(tmp_path, cache, capsys):
    run = tmp_path / "run"
    train(cfg(run, cache, "train.steps=4"), quiet=True, stop_after=2)
    for name in ("ckpt-00000003.pt.tmp", "model.safetensors.tmp"):  # what a kill during a save leaves
        (run / "checkpoints" / name).write_bytes(b"partial")
    (run / "summary.json.tmp").write_text("{")
    train(cfg(run, cache, "train.steps=4", "train.resume=auto"))
    out = capsys.readouterr().out
    assert "removed 3 temp file(s) of an interrupted write (" in out and "ckpt-00000003.pt.tmp" in out
    assert not list((run / "checkpoints").glob("*.tmp")) and not list(run.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# resume


def test_resume_of_another_model_size_is_one_line(tmp_path, cache, capsys):
    run = tmp_path / "run"
    train(cfg(run, cache, "train.steps=4"), quiet=True, stop_after=2)
    assert main(["--config", "smoke", *overrides(run, cache, "train.resume=auto", "model.size=small")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "error: cannot resume: the checkpoint's model differs from this run's (model.size tiny -> small;"
    )
    assert "depth 2 -> 4, width 64 -> 128, heads 2 -> 4" in err and "\n" not in err


def test_resume_on_data_of_another_schema_is_one_line(tmp_path, cache):
    from fakedata import write_random_shards

    a, b = tmp_path / "a", tmp_path / "b"
    write_random_shards(a, n=8, dino_dim=32)
    write_random_shards(b, n=8, dino_dim=24)
    run = tmp_path / "run"
    train(cfg(run, cache, "train.steps=4", f"data.path={a}", "train.batch_size=4"), quiet=True, stop_after=2)
    with pytest.raises(ResumeError) as e:
        train(
            cfg(run, cache, "train.steps=4", f"data.path={b}", "train.batch_size=4", "train.resume=auto"),
            quiet=True,
        )
    assert str(e.value) == (
        "cannot resume: the data schema differs from the checkpoint's (dino_dim 32 -> 24): this data does not fit "
        "the trained model"
    )


def test_what_may_change_on_resume(tmp_path, cache, capsys):
    """Resumed with another loader backend and worker count, another validation cadence and more steps than
    planned at first... the documented free changes: no warning, and the result is bitwise the uninterrupted
    run's. Changing the LR is allowed with one warning line naming it."""
    run = tmp_path / "run"
    train(cfg(run, cache, "train.steps=8"), quiet=True, stop_after=4)
    free = ["data.loader=webdataset", "data.num_workers=1", "val.every=1000", "train.keep_checkpoints=5"]
    train(cfg(run, cache, "train.steps=8", "train.resume=auto", *free))
    out = capsys.readouterr().out
    assert "warning" not in out and "resume=auto: 1 checkpoint(s)" in out
    assert_same_state(final(run), final(reference(tmp_path, cache, 8)))
    assert loss_rows(run) == loss_rows(reference(tmp_path, cache, 8))
    run2 = tmp_path / "run2"
    train(cfg(run2, cache, "train.steps=8"), quiet=True, stop_after=4)
    train(cfg(run2, cache, "train.steps=12", "train.resume=auto", "train.lr=5e-4"))
    out = capsys.readouterr().out
    warn = [line for line in out.splitlines() if line.startswith("warning")]
    assert warn == [
        "warning: resume: changed since the checkpoint: train.lr 0.001 -> 0.0005 (no longer the uninterrupted run)"
    ]
    assert load(final(run2))["step"] == 12


def test_resume_auto_says_what_it_found(tmp_path, cache, capsys):
    run = tmp_path / "run"
    train(cfg(run, cache, "train.steps=2", "train.resume=auto"))
    out = capsys.readouterr().out
    assert f"resume=auto: no checkpoint in {run / 'checkpoints'}: starting at step 0" in out


def test_resume_auto_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, cache, capsys):
    """ckpt-6 truncated (a failing disk, a bad copy): a warning names it and renames it *.corrupt, the run
    resumes from ckpt-4 and ends bitwise where an uninterrupted run ends; metrics.jsonl has each step once
    (the rows 5-6 of the first attempt were replaced) and the summary keeps the run's first loss."""
    run = tmp_path / "run"
    extra = ("train.ckpt_every=2",)
    train(cfg(run, cache, "train.steps=8", *extra), quiet=True, stop_after=6)
    bad = run / "checkpoints" / "ckpt-00000006.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    train(cfg(run, cache, "train.steps=8", "train.resume=auto", *extra))
    out = capsys.readouterr().out
    warn = next(line for line in out.splitlines() if line.startswith("warning: resume=auto"))
    assert (
        str(bad) in warn
        and "cannot be read as a checkpoint" in warn
        and "renamed it ckpt-00000006.pt.corrupt" in warn
    )
    assert "resuming from ckpt-00000004.pt (step 4)" in out
    ref = reference(tmp_path, cache, 8, *extra)
    assert_same_state(final(run), final(ref))
    assert loss_rows(run) == loss_rows(ref) and [s for s, _ in loss_rows(run)] == list(range(1, 9))
    summary, ref_summary = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    assert summary["first_logged_loss"] == ref_summary["first_logged_loss"] == loss_rows(ref)[0][1]


def test_stop_between_log_steps_resumes_to_the_same_rows(tmp_path, cache):
    """log_every=4 and a stop at step 6: the loss window (steps 5-6) goes into the checkpoint, so the resumed
    run's row at step 8 is the uninterrupted run's, bit for bit."""
    extra = ("train.log_every=4",)
    run = tmp_path / "run"
    train(cfg(run, cache, "train.steps=12", *extra), quiet=True, stop_after=6)
    train(cfg(run, cache, "train.steps=12", "train.resume=auto", *extra), quiet=True)
    ref = reference(tmp_path, cache, 12, *extra)
    assert loss_rows(run) == loss_rows(ref) and [s for s, _ in loss_rows(run)] == [4, 8, 12]


# ---------------------------------------------------------------------------------------------
# non-finite steps


@pytest.mark.parametrize("fused", [True, False])
def test_step_guard_masks_the_update_on_the_device(fused, monkeypatch):
    """A bad step leaves parameters, moments and step counts bitwise as they were; a good one is exactly the
    optimizer's step. With the fused AdamW (what CUDA uses) the flag is never read on the host: any
    Tensor.__bool__ call there fails this test."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(params, lr=0.1, fused=fused)
    ref = torch.optim.AdamW(twin, lr=0.1, fused=fused)
    guard = StepGuard(opt)
    for p, q in zip(params, twin):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    if fused:
        monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("host read of a device flag"))
    guard.step(guard.check(torch.tensor(1.0), torch.tensor(2.0)), 1, ["a"])  # good: applied
    ref.step()
    before = [p.detach().clone() for p in params], [dict(s) for s in opt.state.values()]
    guard.step(guard.check(torch.tensor(float("nan")), torch.tensor(2.0)), 2, ["b"])  # bad loss
    guard.step(guard.check(torch.tensor(1.0), torch.tensor(float("inf"))), 3, ["c"])  # bad gradient
    monkeypatch.undo()
    for p, b, q in zip(params, before[0], twin):
        assert torch.equal(p, b) and torch.equal(p, q)
    for s, b in zip(opt.state.values(), before[1]):
        assert all(torch.equal(s[k], b[k]) for k in s)
    assert guard.read() == [(2, ["b"]), (3, ["c"])] and guard.read() == []


@pytest.mark.gpu
def test_guarded_step_never_waits_for_the_gpu():
    """On CUDA, with torch's sync debug mode set to error: the loop's per-step work around the optimizer (clip,
    finite flag, masked fused AdamW, EMA, loss window) never synchronises; only the log-time read does."""
    from nanodit.optim import EMA
    from nanodit.runlog import LossWindow

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ema, guard, window = EMA(model), StepGuard(opt), LossWindow(dev, 4)
    x = torch.randn(8, 16, device=dev)
    stats = {"bin_sum": torch.zeros(4, device=dev), "bin_count": torch.zeros(4, device=dev)}
    before = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            loss = model(x).pow(2).mean() * (float("nan") if step == 2 else 1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            ok = guard.check(loss, gnorm)
            if step == 2:
                before = [p.detach().clone() for p in model.parameters()]
            guard.step(ok, step, [f"s{step}"])
            if step == 2:
                after = [p.detach().clone() for p in model.parameters()]
            ema.update(model, 0.9)
            window.add(loss, stats, ok, 8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert guard.read() == [(2, ["s2"])]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the bad step changed nothing
    assert torch.isfinite(window.loss).item() and all(torch.isfinite(v).all() for v in ema.params.values())


def poison_step(monkeypatch, bad_step: int) -> None:
    """The loss of training step ``bad_step`` becomes NaN (so do its gradients): a divergence on cue."""
    real, calls = train_mod.training_loss, [0]

    def loss(*a, **kw):
        calls[0] += 1
        value, stats = real(*a, **kw)
        return (value * float("nan"), stats) if calls[0] == bad_step else (value, stats)

    monkeypatch.setattr(train_mod, "training_loss", loss)


def test_nonfinite_stop_keeps_the_state_apart_and_never_applies_the_step(tmp_path, cache, monkeypatch):
    """Step 3 of 8 diverges (log every 4): the run stops at the log step with one line naming step 3 and its
    batch; the bad update was never applied (3 optimizer steps in 4, weights and EMA finite); the state goes
    to nonfinite/, not checkpoints/, so resume=auto continues from the last good checkpoint."""
    poison_step(monkeypatch, 3)
    run = tmp_path / "run"
    with pytest.raises(TrainError) as e:
        train(cfg(run, cache, "train.steps=8", "train.log_every=4", "train.ckpt_every=2"), quiet=True)
    msg, kept = str(e.value), run / "nonfinite" / "ckpt-00000004.pt"
    assert (
        msg.startswith("non-finite loss or gradient at step 3 (batch ")
        and "1 such step(s) up to step 4" in msg
    )
    assert f"state kept apart in {kept} (resume=auto does not pick it)" in msg and "\n" not in msg
    state = load(kept)
    step, ids = state["nonfinite"][0]  # the step and its batch, named in the message too
    assert step == 3 and ids and f"(batch {ids[0]}, " in msg
    assert all(torch.isfinite(v).all() for k in ("model", "ema") for v in state[k].values())
    assert {int(s["step"]) for s in state["optim"]["state"].values()} == {3}  # step 3 was masked
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000002.pt"]
    assert rows(run)[0]["nonfinite_steps"] == 1 and rows(run)[0]["loss"] is not None


def test_a_bad_step_before_a_checkpoint_is_still_reported_after_the_resume(tmp_path, cache, monkeypatch):
    """Step 3 diverges, step 3 is also a checkpoint and the job stops there, before the log row of step 4 has read
    the step's flag: the checkpoint carries the unread flag, so the resumed run stops at step 4 naming step 3,
    exactly as the uninterrupted run does; under ``skip`` the resumed row counts it and averages the good steps."""
    poison_step(monkeypatch, 3)
    run = tmp_path / "run"
    args = ("train.steps=8", "train.log_every=4", "train.ckpt_every=3")
    train(cfg(run, cache, *args), quiet=True, stop_after=3)
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000003.pt"]
    assert load(list_checkpoints(run)[-1])["log"]["guard"]["bad"] == [False, False, True]
    with pytest.raises(TrainError, match=r"^non-finite loss or gradient at step 3 \(batch "):
        train(cfg(run, cache, *args, "train.resume=auto"), quiet=True)

    poison_step(monkeypatch, 3)  # a fresh count: step 3 of the next job diverges
    run = tmp_path / "run_skip"
    skip = (*args, "train.on_nonfinite=skip")
    train(cfg(run, cache, *skip), quiet=True, stop_after=3)
    summary = train(cfg(run, cache, *skip, "train.resume=auto"), quiet=True)
    assert summary["nonfinite_steps"] == 1
    r = rows(run)
    assert [x["step"] for x in r] == [4, 8] and r[0]["nonfinite_steps"] == 1
    assert isinstance(r[0]["loss"], float) and "nonfinite_steps" not in r[1]


def test_nonfinite_skip_goes_on_and_counts(tmp_path, cache, monkeypatch):
    poison_step(monkeypatch, 3)
    run = tmp_path / "run"
    summary = train(
        cfg(run, cache, "train.steps=8", "train.log_every=4", "train.on_nonfinite=skip"), quiet=True
    )
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 8
    r = rows(run)
    assert r[0]["nonfinite_steps"] == 1 and "nonfinite_steps" not in r[1]
    assert all(isinstance(x["loss"], float) for x in r)
    state = load(final(run))
    assert {int(s["step"]) for s in state["optim"]["state"].values()} == {7}
    assert all(torch.isfinite(v).all() for v in state["ema"].values())


def test_save_failure_is_a_checkpoint_error_for_the_api(tmp_path):
    """save_checkpoint itself: the error type, and nothing left behind, when the target folder vanishes."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    state = {"model": {}, "ema": {}, "step": 1}
    ckpt_mod.save_checkpoint(run, 1, state)
    (run / "checkpoints" / "ckpt-00000002.pt").mkdir()  # the rename target is a folder: os.replace fails
    with pytest.raises(CheckpointError, match=r"checkpoint of step 2 not written: .*ckpt-00000002.pt"):
        ckpt_mod.save_checkpoint(run, 2, state)
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_background_writer_saves_the_state_of_its_step_and_raises_a_failure_later(tmp_path):
    """CheckpointWriter: what is written is the state when ``save`` was called (later in-place updates do not
    reach the file); a failed background write is the same one-line CheckpointError, raised by the next call,
    and no later checkpoint is written after it."""
    run = tmp_path / "run"
    w = ckpt_mod.CheckpointWriter(run, keep=3)
    weights = torch.arange(6.0)
    state = {"model": {"w": weights}, "ema": {"w": weights}, "step": 1, "log": {"rows": [1, 2]}}
    path = w.save(1, state)
    weights.add_(100.0)  # training goes on while the file is written
    state["log"]["rows"].append(3)
    w.wait()
    saved = torch.load(path, weights_only=False)
    assert torch.equal(saved["model"]["w"], torch.arange(6.0)) and saved["log"]["rows"] == [1, 2]
    (run / "checkpoints" / "ckpt-00000002.pt").mkdir()  # the rename target is a folder: os.replace fails
    w.save(2, state)
    w._thread.join()
    with pytest.raises(CheckpointError, match=r"checkpoint of step 2 not written: .*ckpt-00000002.pt"):
        w.poll()
    w.poll()  # raised once
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000001.pt"]


def test_snapshot_reuses_its_staging_buffers():
    """The pinned host buffers of one snapshot serve the next (by shape and dtype); CPU tensors are cloned."""
    a, b = torch.ones(3), torch.zeros(2, dtype=torch.int64)
    staging: list[torch.Tensor] = []
    snap, event = ckpt_mod.snapshot({"a": a, "b": [b, 7]}, staging)
    assert event is None and staging == []  # CPU tensors: clones, no pinned buffers
    assert snap["a"] is not a and torch.equal(snap["a"], a) and snap["b"][1] == 7


@pytest.mark.gpu
def test_snapshot_of_cuda_tensors_is_pinned_and_reused():
    """CUDA tensors: copied into pinned buffers behind an event; the next snapshot reuses those buffers."""
    staging: list[torch.Tensor] = []
    g = {"x": torch.ones(4, device="cuda"), "y": torch.zeros(2, device="cuda")}
    first, ev = ckpt_mod.snapshot(g, staging)
    ev.synchronize()
    bufs = {id(t) for t in staging}
    assert len(bufs) == 2 and all(t.is_pinned() for t in staging) and torch.equal(first["x"], torch.ones(4))
    g["x"].add_(1.0)
    second, ev = ckpt_mod.snapshot(g, staging)
    ev.synchronize()
    assert {id(t) for t in staging} == bufs and torch.equal(second["x"], torch.full((4,), 2.0))


# ---------------------------------------------------------------------------------------------
# the kill -9 loop


def kill_during_a_save(proc: subprocess.Popen, ckpt_dir: Path) -> None:
    """SIGKILL the moment a checkpoint's temp file exists (a save in progress)."""
    while proc.poll() is None:
        if ckpt_dir.is_dir() and any(e.name.endswith(".tmp") for e in os.scandir(ckpt_dir)):
            proc.kill()
            return
        time.sleep(0.001)


def kill_during_a_step(proc: subprocess.Popen, run: Path, delay: float) -> None:
    """SIGKILL a little after the process logged its first step."""
    start = len(loss_rows(run)) if (run / "metrics.jsonl").is_file() else 0
    wait_for_rows(run, start + 1, proc)
    time.sleep(delay)
    proc.kill()


@pytest.mark.slow
def test_kill_minus_nine_loop_resumes_bitwise(tmp_path, cache):
    """Twelve SIGKILLs, every second one the moment a checkpoint's temp file appears (mid-save), each
    followed by resume=auto: every listed checkpoint always loads, and the finished run is bitwise the
    uninterrupted one, with the same losses and every step logged once. (~75 s on 2 CPU cores.)"""
    steps, extra = 40, ("train.ckpt_every=2", "train.resume=auto")
    run = tmp_path / "run"
    kills = mid_save = processes = 0
    while kills < 12:
        processes += 1
        assert processes < 60, "the run finished before it could be killed often enough"
        proc = spawn(run, cache, f"train.steps={steps}", *extra)
        if kills % 2 == 0:
            kill_during_a_save(proc, run / "checkpoints")
        else:
            kill_during_a_step(proc, run, 0.05 * (kills % 5))
        proc.communicate(timeout=60)
        if proc.returncode == 0:  # it finished first: start again, it resumes at the end
            continue
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        mid_save += any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())
        for p in list_checkpoints(run):
            load(p)  # never a listed checkpoint that does not load
    proc = spawn(run, cache, f"train.steps={steps}", *extra)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    ref = reference(tmp_path, cache, steps, "train.ckpt_every=2")
    assert mid_save >= 3, (kills, mid_save)
    assert_same_state(final(run), final(ref))
    assert loss_rows(run) == loss_rows(ref) and [s for s, _ in loss_rows(run)] == list(range(1, steps + 1))
    print(
        f"kill -9 loop: {kills} kills ({mid_save} left a temp file: killed mid-save), {processes + 1} processes"
    )
