"""Several processes on CPUs (gloo): the trainer under ``torchrun --nproc_per_node 2`` computes what one process
computes at the same global batch, its checkpoints resume on another world size, and a signal stops every rank
after the same step.

The exact comparisons use a layout where both runs see the same samples in every step: the smoke config's shapes
set (4 buckets of 6 samples), batch 8, ``data.shuffle=false``, so that a step is one whole bucket; on two ranks each
takes 3 of its samples, in one process ``train.grad_accum=2`` cuts the same 3 + 3 (nanodit/accumulate.py) and draws
their noise from the same generator slots. Tolerance rule: the two runs then differ by floating-point rounding
only. Gradient averaging is exact ((g0 + g1) / 2 = g0 / 2 + g1 / 2 in binary floating point), but each rank pads its
captions to its own longest one and multiplies other matrix shapes, so a matrix product may round otherwise: the
logged losses must agree to 1e-5 relative (measured here: bitwise) and the weights to 1e-5 absolute (measured:
4.5e-7 after 12 steps, 3e-7 after 8; the weights are O(0.1)). Against one process without accumulation only the noise of half
of each batch differs: that comparison is statistical (the curves' means within 3%; measured 0.3%).

Each ``torchrun`` call starts three Python processes (~20 s on 2 busy cores), so the file makes three: a DDP run,
an FSDP resume of a one-process checkpoint, and a signalled run; the rest calls ``train`` in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from smokerun import smoke_cache, tiny_overrides

from nanodit.checkpoint import list_checkpoints
from nanodit.config import ConfigError, load_config
from nanodit.dist_checkpoint import load_checkpoint
from nanodit.train import train

REPO = Path(__file__).resolve().parent.parent
LOSS_RTOL = 1e-5  # rounding only (see the module docstring)
WEIGHT_ATOL = 1e-5
COMMON = ("train.steps=8", "train.ckpt_every=4", "data.shuffle=false", "train.batch_size=8")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return smoke_cache(tmp_path_factory)


def overrides(run: Path, cache: Path, *extra: str) -> list[str]:
    """The tiny smoke run (tests/smokerun.py) at the layout of the module docstring."""
    return tiny_overrides(run, cache, *COMMON, *extra)


def torchrun(run: Path, cache: Path, *extra: str, **kw) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node 2 -m nanodit.train --config smoke ...`` as a user types it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "nanodit.train", "--config", "smoke", *overrides(run, cache, *extra)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows(run) if "loss" in r]


def assert_same_curve(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb]
    worst = max(abs(x - y) / abs(y) for (_, x), (_, y) in zip(la, lb))
    assert worst <= LOSS_RTOL, (worst, la, lb)


def assert_close_state(a: Path, b: Path) -> None:
    """Weights, EMA and AdamW moments within the rounding tolerance; step, loader position equal."""
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["step"] == sb["step"] and sa["loader"] == sb["loader"]
    for key in ("model", "ema"):
        assert sa[key].keys() == sb[key].keys()
        worst = max((sa[key][k] - sb[key][k]).abs().max().item() for k in sa[key])
        assert worst <= WEIGHT_ATOL, (key, worst)
    for i, s in sa["optim"]["state"].items():
        assert int(s["step"]) == int(sb["optim"]["state"][i]["step"])
        assert torch.allclose(s["exp_avg"], sb["optim"]["state"][i]["exp_avg"], rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def one(cache, tmp_path_factory) -> Path:
    """One process, grad_accum=2: the reference of every comparison (ckpt-4.pt and ckpt-8.pt)."""
    run = tmp_path_factory.mktemp("one") / "run"
    train(load_config("smoke", overrides(run, cache, "train.grad_accum=2")), quiet=True)
    return run


@pytest.fixture(scope="module")
def ddp(cache, tmp_path_factory) -> tuple[Path, str]:
    """Two processes under torchrun, train.strategy=auto (DDP for the tiny model): ckpt-4.dcp and ckpt-8.dcp."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    out, _ = finish(torchrun(run, cache))
    return run, out


def test_ddp_on_two_ranks_matches_one_process_at_the_same_global_batch(ddp, one, cache, tmp_path):
    """Same loss curve and final state as one process accumulating the same two halves of each step (rounding
    only); the replicas are bitwise identical; rank 0 alone wrote the records (every step logged once); the log
    says how the batch was split."""
    run, out = ddp
    assert_same_curve(run, one)
    assert_close_state(list_checkpoints(run)[-1], list_checkpoints(one)[-1])
    assert [s for s, _ in losses(run)] == list(range(1, 9))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distributed"] == {
        "world_size": 2,
        "strategy": "ddp",
        "why": "auto: 0.6M parameters < 250M",
        "backend": "gloo",
        "global_batch": 8,
        "grad_accum": 1,
        "replicas_identical": True,
    }
    assert "global batch 8 = 2 x 4 samples in 1 micro-batch(es) of 4" in out
    assert out.count("done: 8 steps") == 1  # rank 1 says nothing
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000004.dcp", "ckpt-00000008.dcp"]
    plain = tmp_path / "plain"  # one process, no accumulation: the same samples, half the noise differs
    train(load_config("smoke", overrides(plain, cache)), quiet=True)
    mean = lambda r: sum(x for _, x in losses(r)) / len(losses(r))  # noqa: E731
    assert abs(mean(run) - mean(plain)) <= 0.03 * mean(plain), (mean(run), mean(plain))


def test_a_save_on_two_ranks_resumes_on_one(ddp, one, tmp_path, cache, capsys):
    """ckpt-4.dcp of the two-rank run, resumed by one process with grad_accum=2: every noise stream continues, so
    steps 5-8 are the two-rank run's (rounding only). The folder read whole is the .pt layout, with every rank's
    RNG; its safetensors export is the same weights."""
    run, _ = ddp
    ckpt = run / "checkpoints" / "ckpt-00000004.dcp"
    state = load_checkpoint(ckpt)
    assert {"model", "ema", "optim", "step", "rng", "loader", "config", "log"} <= set(state)
    assert len(state["rng"]) == 2 and state["step"] == 4
    assert sorted(state["optim"]["state"]) == list(range(len(state["model"])))  # keyed by parameter index
    resumed = tmp_path / "run"
    train(load_config("smoke", overrides(resumed, cache, "train.grad_accum=2", f"train.resume={ckpt}")))
    out = capsys.readouterr().out
    assert (
        "warning: resume: 2 process(es) x grad_accum 1 -> 1 x 2:" in out
        and "the noise streams continue" in out
    )
    assert [s for s, _ in losses(resumed)] == list(range(5, 9))
    tail = [x for s, x in losses(run) if s > 4]
    assert max(abs(x - y) / y for (_, x), y in zip(losses(resumed), tail)) <= LOSS_RTOL
    assert_close_state(list_checkpoints(resumed)[-1], list_checkpoints(run)[-1])
    from safetensors.torch import load_file

    final = load_checkpoint(list_checkpoints(run)[-1])
    export = load_file(str(run / "checkpoints" / "model.safetensors"))
    assert all(torch.equal(export[k], final["model"][k]) for k in final["model"])


def test_fsdp_resumes_a_one_process_checkpoint_and_its_shards_resume_on_one(one, tmp_path, cache):
    """train.strategy=fsdp on two ranks resumes ckpt-4.pt of one process (each rank keeps its shards of it),
    trains steps 5-8 like the one process did and writes sharded ckpt-6.dcp / ckpt-8.dcp; ckpt-6.dcp, resumed by
    one process, ends where both ended (rounding only)."""
    run = tmp_path / "fsdp"
    start = one / "checkpoints" / "ckpt-00000004.pt"
    finish(torchrun(run, cache, "train.strategy=fsdp", "train.ckpt_every=2", f"train.resume={start}"))
    tail = [x for s, x in losses(one) if s > 4]
    assert [s for s, _ in losses(run)] == list(range(5, 9))
    assert max(abs(x - y) / y for (_, x), y in zip(losses(run), tail)) <= LOSS_RTOL
    assert_close_state(run / "checkpoints" / "ckpt-00000008.dcp", list_checkpoints(one)[-1])
    shards = sorted(p.name for p in (run / "checkpoints" / "ckpt-00000006.dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    again = tmp_path / "again"
    ckpt6 = run / "checkpoints" / "ckpt-00000006.dcp"
    train(
        load_config("smoke", overrides(again, cache, "train.grad_accum=2", f"train.resume={ckpt6}")),
        quiet=True,
    )
    assert_close_state(list_checkpoints(again)[-1], list_checkpoints(one)[-1])


def test_sigterm_stops_every_rank_after_the_same_step(tmp_path, cache):
    """SIGTERM to torchrun and both workers at once (as a terminal's Ctrl-C or a scheduler reaches the whole
    group; torchrun forwards it once more): both ranks stop after the same step, one checkpoint folder of that
    step is written, each rank prints the one line with the same step, and the folder loads."""
    run = tmp_path / "run"
    proc = torchrun(run, cache, "train.steps=400", "train.ckpt_every=1000", start_new_session=True)
    end = time.time() + 240
    while time.time() < end and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(rows(run)) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if "interrupted by SIGTERM after step" in line]
    assert len(lines) == 2, err[-3000:]
    steps = {int(line.split("after step ")[1].split(":")[0]) for line in lines}
    assert len(steps) == 1, lines
    (step,) = steps
    assert any(line.startswith("[rank 1] interrupted by SIGTERM") for line in lines)
    assert [p.name for p in list_checkpoints(run)] == [f"ckpt-{step:08d}.dcp"]
    assert load_checkpoint(list_checkpoints(run)[-1])["step"] == step
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err


# ---------------------------------------------------------------------------------------------
# in one process: the strategies' code paths on a world of one, accumulation, config errors


def test_ddp_and_fsdp_on_one_process_are_the_plain_run(tmp_path, cache):
    """train.strategy=ddp / fsdp on one process (a process group of one): bitwise the plain run's losses (the
    reductions over one rank are the identity), written as a DCP folder that one plain process resumes."""
    runs = {}
    for strategy in ("none", "ddp", "fsdp"):
        runs[strategy] = tmp_path / strategy
        train(
            load_config("smoke", overrides(runs[strategy], cache, f"train.strategy={strategy}")), quiet=True
        )
    assert losses(runs["ddp"]) == losses(runs["none"]) == losses(runs["fsdp"])
    assert list_checkpoints(runs["fsdp"])[-1].suffix == ".dcp"
    back = tmp_path / "back"
    ckpt = runs["fsdp"] / "checkpoints" / "ckpt-00000004.dcp"
    train(load_config("smoke", overrides(back, cache, f"train.resume={ckpt}")), quiet=True)
    assert losses(back) == [r for r in losses(runs["none"]) if r[0] > 4]
    a, b = load_checkpoint(list_checkpoints(back)[-1]), load_checkpoint(list_checkpoints(runs["none"])[-1])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not torch.distributed.is_initialized()  # the group of one is gone with its run


@pytest.mark.gpu
def test_fsdp_bf16_on_one_gpu_keeps_fp32_master_weights(tmp_path, cache):
    """train.strategy=fsdp with train.precision=bf16 on one GPU (a process group of one, NCCL): bf16 all-gathers,
    yet the checkpoint's weights and EMA are fp32 (the master weights), and one plain process resumes it. Passed on
    an H200 at 0868b45 (bench/results/h200-2026-12-02/gpu_tests_0868b45.log)."""
    import math

    gpu = ("train.device=cuda", "train.precision=bf16", "train.compile=false")
    run = tmp_path / "fsdp"
    train(load_config("smoke", overrides(run, cache, *gpu, "train.strategy=fsdp")), quiet=True)
    assert [s for s, _ in losses(run)] == list(range(1, 9))
    assert all(math.isfinite(x) for _, x in losses(run))
    state = load_checkpoint(list_checkpoints(run)[-1])
    assert all(v.dtype == torch.float32 for k in ("model", "ema") for v in state[k].values())
    back = tmp_path / "back"
    ckpt = run / "checkpoints" / "ckpt-00000004.dcp"
    train(load_config("smoke", overrides(back, cache, *gpu, f"train.resume={ckpt}")), quiet=True)
    assert [s for s, _ in losses(back)] == [5, 6, 7, 8]


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, cache):
    """model.activation_checkpointing recomputes each block in the backward: the same losses and weights (CPU:
    bitwise), and the checkpoint's keys are the plain model's."""
    plain, ac = tmp_path / "plain", tmp_path / "ac"
    train(load_config("smoke", overrides(plain, cache, "train.steps=4")), quiet=True)
    train(
        load_config("smoke", overrides(ac, cache, "train.steps=4", "model.activation_checkpointing=true")),
        quiet=True,
    )
    assert losses(ac) == losses(plain)
    a, b = load_checkpoint(list_checkpoints(ac)[-1]), load_checkpoint(list_checkpoints(plain)[-1])
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_each_rank_loads_its_share_of_the_global_batch(cache):
    """train.batch_size=4 over data.world_size=2: a rank's batches hold 2 samples (its share of the global batch);
    a global batch that does not split evenly is a one-line error."""
    from nanodit.data import build_loader

    over = [f"data.cache_dir={cache}", "data.shuffle=false", "data.rank=1", "data.world_size=2"]
    _, loader = build_loader(load_config("smoke", [*over, "train.batch_size=4"]), torch.device("cpu"))
    assert loader.sem.batch_size == 2 and next(loader).latent.shape[0] == 2
    with pytest.raises(
        ConfigError, match=r"^config: train.batch_size=5 is not divisible by data.world_size=2$"
    ):
        build_loader(load_config("smoke", [*over, "train.batch_size=5"]), torch.device("cpu"))


def test_micro_batches_cut_like_the_rank_split():
    """grad_accum cuts a batch of n into [j n / A, (j + 1) n / A) with weights n_j / n; a micro-batch that would be
    empty (a bucket's last batch smaller than A) runs one sample with weight 0; every field is cut, the epoch kept."""
    from nanodit.accumulate import micro_batches, slot_seed
    from nanodit.data.batch import make_batch

    def batch(n: int):
        ids = [chr(ord("a") + i) for i in range(n)]
        flags = torch.zeros(3, n, dtype=torch.bool)
        return make_batch(
            torch.arange(n)[:, None],
            torch.zeros(n, 2),
            torch.zeros(n, 3, 2),
            torch.ones(n, 3, dtype=torch.bool),
            flags,
            ids,
            ids,
            3,
        )

    parts = micro_batches(batch(5), 2)
    assert [p.ids for p, _ in parts] == [["a", "b"], ["c", "d", "e"]] and [w for _, w in parts] == [0.4, 0.6]
    second = parts[1][0]
    assert (
        second.epoch == 3
        and second.latent.flatten().tolist() == [2, 3, 4]
        and second.captions == ["c", "d", "e"]
    )
    assert all(
        x.shape[0] == 3 for x in (second.dino, second.t5, second.t5_mask, second.drop_text, second.flipped)
    )
    tiny = micro_batches(batch(1), 3)
    assert [w for _, w in tiny] == [0.0, 0.0, 1.0] and all(p.ids == ["a"] for p, _ in tiny)
    assert slot_seed(7, 0) == 7 and len({slot_seed(7, s) for s in range(8)}) == 8
    assert slot_seed(7, 1) != slot_seed(7, 1, step=100)


def test_accumulated_gradient_is_the_batch_gradient(tmp_path, cache):
    """accumulate() over A micro-batches leaves the gradient, loss and t-bin stats of one pass over the whole batch:
    5 samples in A = 2, 3 (uneven parts, weights n_j / n) and 7 (two micro-batches empty, weight 0). The loss here
    draws each sample's t and noise from its own id, so that both sides see the same noise whatever the cut, and
    the weights are moved off their zero-initialised output layers, so that every layer has a gradient.
    Tolerance rule: rounding only (the sums are taken in another order): loss 1e-6 relative, each gradient within
    1e-6 of its largest entry (measured: 2.4e-7 and 1.7e-7; the null tokens' zero gradients stay zero), bin counts
    equal."""
    import zlib

    from nanodit.accumulate import accumulate, take
    from nanodit.flow import training_loss
    from nanodit.train import _open_records, setup

    def per_sample(fwd, batch, flow_loss, generator, *rest):
        out = []
        for i, sid in enumerate(batch.ids):
            g = torch.Generator().manual_seed(zlib.crc32(sid.encode()))
            out.append(training_loss(fwd, take(batch, i, i + 1), flow_loss, g, *rest))
        stats = {k: sum(s[k] for _, s in out) for k in ("bin_sum", "bin_count")}
        return torch.stack([loss for loss, _ in out]).mean(), stats

    run = setup(
        load_config("smoke", overrides(tmp_path, cache, "train.batch_size=6")),
        progress=False,
    )
    _open_records(run)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the zero-initialised output layers: every layer gets a gradient
        for p in run.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = take(next(run.loader), 0, 5)

    def step(parts: int):
        run.cfg.train.grad_accum, run.micro_generators = parts, [run.generator] * (parts - 1)
        if parts == 1:  # the reference: one forward and backward over the whole batch
            t = run.cfg.train
            args = (run.model.ops.flow_loss, run.generator, t.t_mean, t.t_std, t.loss_bins, run.autocast)
            run.optim.zero_grad(set_to_none=True)
            loss, stats = per_sample(run.fwd, batch, *args, t.t_shift)
            loss.backward()
        else:
            loss, stats = accumulate(run, batch, per_sample)
        return loss.detach(), stats, {k: p.grad.clone() for k, p in run.model.named_parameters()}

    loss, stats, grads = step(1)
    zero = {k for k, g in grads.items() if not g.abs().max() > 0}
    assert zero == {"null_dino", "null_text"}, zero  # the null tokens: no CFG dropout in this batch
    for parts in (2, 3, 7):
        loss_a, stats_a, grads_a = step(parts)
        assert abs(loss_a - loss) <= 1e-6 * abs(loss), (parts, loss_a, loss)
        assert torch.equal(stats_a["bin_count"], stats["bin_count"]) and stats["bin_count"].sum() == 5
        torch.testing.assert_close(stats_a["bin_sum"], stats["bin_sum"], rtol=1e-6, atol=0)
        for k, g in grads.items():
            if not g.abs().max() > 0:
                assert torch.equal(grads_a[k], g), (parts, k)
                continue
            worst = (grads_a[k] - g).abs().max() / g.abs().max()
            assert worst <= 1e-6, (parts, k, worst.item())
    run.close()


@pytest.mark.parametrize(
    "override, world, message",
    [
        ("train.grad_accum=3", 1, "config: train.grad_accum=3 does not divide train.batch_size=8"),
        (
            "train.strategy=everything",
            1,
            "config: train.strategy='everything' is not one of auto, none, ddp, fsdp",
        ),
        ("train.grad_accum=0", 1, "config: train.grad_accum=0 must be > 0"),
        (
            "train.grad_accum=2",
            3,
            "config: train.batch_size=8 is not divisible by 3 process(es) x train.grad_accum=2",
        ),
        (
            "train.strategy=none",
            2,
            "config: train.strategy=none with 2 processes: each would train its own copy",
        ),
        ("train.device=cuda:1", 2, "train.device=cuda:1: with 2 processes each takes cuda:LOCAL_RANK"),
    ],
)
def test_bad_distributed_settings_are_one_line(override, world, message, monkeypatch):
    """Mistakes in the new keys, and settings that cannot work on the processes torchrun started, fail before any
    process group starts, in one line."""
    from nanodit import distributed
    from nanodit.device import DeviceError

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises((ConfigError, DeviceError)) as e:
        distributed.setup(load_config("smoke", [override]))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not torch.distributed.is_initialized()


def test_auto_strategy_rule():
    """auto: none on one process; on several, ddp under 250M parameters (nano, 42M) and fsdp from there on
    (production, 743M)."""
    from nanodit.distributed import AUTO_FSDP_PARAMS, Dist, resolve_strategy
    from nanodit.model import SIZES, NanoDiT

    def params(size: str) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in NanoDiT(**SIZES[size], dino_dim=1024, t5_dim=4096).parameters())

    nano, production = params("nano"), params("production")
    assert nano < AUTO_FSDP_PARAMS <= production
    for n, want in ((nano, "ddp"), (production, "fsdp")):
        d = Dist(world=2, strategy="auto")
        resolve_strategy(d, n)
        assert d.strategy == want and d.why.startswith("auto: ")
