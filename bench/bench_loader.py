"""Loader throughput: samples/s of each backend on a 2,000-sample nano-shape set written to local disk.

    pytest bench/bench_loader.py --benchmark-only          # pytest-benchmark, GPU only
    python bench/bench_loader.py --out DIR [--samples 2000] [--variants gpu-cache,webdataset-w8,dali-t4]
    python bench/bench_loader.py --device cpu --variants webdataset-w2,webdataset-w2-s0   # the CPU path

Variants: ``webdataset-wN`` N workers with the slot ring (the default path), ``-s0`` the per-batch shared-memory
path with the DataLoader's pin thread (the path before the ring, to compare), ``-sK`` a ring of K slots,
``-nocheck`` without the NaN/Inf check; ``dali-tN`` N threads per pipeline. ``--device cpu`` times the CPU path
(no pinning, no DMA, no data-wait column): a relative measure for machines without a GPU.

Workload: random finite fp16 arrays at the nano shapes, written with the ShardWriter (tars + DALI index files):
the 4 aspect buckets of a 64x64 latent (16 channels), DINO 1024-d, T5 4096-d with random lengths 1..256 stored
unpadded, flipped variants of all three; 125 samples per shard (4 shards per bucket, so DALI reads cross shards
like Part C's, ~15 shards per bucket); batch 16, shuffled, one bucket per batch. The tars were just written, so
they sit in the page cache: this measures the loaders, not the disk (the Part C set, 55-180 GB, will not fit
the page cache of a 128 GB host; an NVMe reads ~3-7 GB/s, i.e. ~1,500-3,000 samples/s at ~2.3 MB/sample).
Each variant reports: samples/s over a timed run of ``--batches`` batches (device-synchronised), start-up time
(index + workers/pipelines, first batch), bytes that cross the bus per sample (unpadded T5: the padded batch
would be ~1.8x), and the data wait at a simulated 13 ms training step (the goal nano step, ~1,200 samples/s):
the GPU sleeps 13 ms per batch while the host fetches the next; wait = share of wall time above 13 ms/step.
Target (issue 6): >= 4,000 samples/s per GPU for the streaming backends, data wait < 1%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nanodit.data.batch import Batch  # noqa: E402
from nanodit.data.dali_loader import DaliLoader, dali_available  # noqa: E402
from nanodit.data.gpu_cache import GpuCacheLoader  # noqa: E402
from nanodit.data.index import build_index  # noqa: E402
from nanodit.data.loader import Semantics  # noqa: E402
from nanodit.data.shards import ShardWriter, read_all  # noqa: E402
from nanodit.data.wds_loader import WebDatasetLoader  # noqa: E402
from nanodit.shapes import buckets  # noqa: E402

B, C, SIDE, DD, DT, LMAX = 16, 16, 64, 1024, 4096, 256
VARIANTS = [
    "gpu-cache",
    "webdataset-w8",
    "webdataset-w8-s0",
    "webdataset-w14",
    "webdataset-w14-s0",
    "webdataset-w8-nocheck",
    "dali-t2",
    "dali-t4",
]
STEP_MS = 13.0


def write_set(root: Path, samples: int = 2000, seed: int = 0, per_shard: int = 125) -> dict:
    """The nano-shape set: arrays are slices of one random pool (fast), distinct per sample."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(48 << 20, dtype=np.float32).astype(np.float16)  # 96 MB of finite values
    shapes = buckets(SIDE)

    def draw(*shape):
        n = int(np.prod(shape))
        start = int(rng.integers(0, pool.size - n))
        return pool[start : start + n].reshape(shape)

    w = ShardWriter(root, {"name": "bench-nano"}, samples_per_shard=per_shard)
    for i in range(samples):
        h, wd = shapes[i % len(shapes)]
        L, Lf = (int(v) for v in rng.integers(1, LMAX + 1, size=2))
        w.write(
            {
                "__key__": f"b{i:05d}",
                "latent": draw(C, h, wd),
                "latent_flip": draw(C, h, wd),
                "dino": draw(DD),
                "dino_flip": draw(DD),
                "t5": draw(L, DT),
                "t5_flip": draw(Lf, DT),
                "txt": f"sample {i} on the left",
                "flip.txt": f"sample {i} on the right",
                "json": {"bucket": [h, wd], "id": f"b{i:05d}"},
            }
        )
    return w.close()


def make_loader(variant: str, root: Path, device: torch.device, index=None):
    sem = Semantics(batch_size=B, seed=0, shuffle=True)
    kind, *opts = variant.split("-")
    if variant == "gpu-cache":
        _, groups, _ = read_all(root)
        return GpuCacheLoader(groups, sem, device)
    index = index or build_index(root)
    n = int(next(o[1:] for o in opts if o[0] in "wt"))
    if kind == "webdataset":
        # "-sK": a ring of K slots, "-s0" the per-batch path; none: the default ring
        slots = next((int(o[1:]) for o in opts if o[0] == "s" and o[1:].isdigit()), None)
        return WebDatasetLoader(
            index, sem, device, num_workers=n, prefetch=4, check_finite="nocheck" not in opts, slots=slots
        )
    return DaliLoader(index, sem, device, threads=n, prefetch=2)


def bus_bytes(batch: Batch) -> torch.Tensor:
    """Bytes a streaming backend moves host -> device for this batch (T5 unpadded: only valid rows), as a 0-d
    tensor on the batch's device: reading it back per batch would synchronise the device every batch (and hide
    copies that overlap the next batch's fetch), so ``run_batches`` reads the sum once, at the end."""
    lat, dino, mask = batch.latent, batch.dino, batch.t5_mask
    return mask.sum() * (batch.t5.shape[-1] * 2) + (lat.numel() * 2 + dino.numel() * 2)


def run_batches(loader, n: int) -> tuple[int, int]:
    samples, moved = 0, 0
    for _ in range(n):
        b = next(loader)
        samples += len(b.ids)
        moved = moved + bus_bytes(b)
    sync()
    return samples, int(moved)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sleep_cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def data_wait(loader, steps: int, cycles: int) -> float:
    """Share of wall time lost to data at a simulated STEP_MS step: the GPU works on batch k while the host
    fetches batch k+1, as in the trainer."""
    next(loader)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        torch.cuda._sleep(cycles)  # the "training step" on the current batch
        next(loader)  # the next batch, fetched while the GPU works
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return max(0.0, wall - steps * STEP_MS / 1e3) / wall


def measure(
    variant: str, root: Path, device: torch.device, batches: int, wait_steps: int, cycles: int
) -> dict:
    t0 = time.perf_counter()
    loader = make_loader(variant, root, device)
    next(loader)
    sync()
    startup = time.perf_counter() - t0
    try:
        run_batches(loader, 10)  # warm-up: workers, pipelines, allocator
        t = time.perf_counter()
        samples, moved = run_batches(loader, batches)
        dt = time.perf_counter() - t
        wait = data_wait(loader, wait_steps, cycles) if device.type == "cuda" else float("nan")
    finally:
        loader.close()
    return {
        "variant": variant,
        "samples_per_s": samples / dt,
        "bus_MB_per_sample": 0.0 if variant == "gpu-cache" else moved / samples / 1e6,
        "bus_GB_per_s": 0.0 if variant == "gpu-cache" else moved / dt / 1e9,
        "startup_s": startup,
        "data_wait_pct_at_13ms": 100 * wait,
        "samples": samples,
    }


def available(variant: str) -> bool:
    return not variant.startswith("dali") or dali_available()


@pytest.fixture(scope="module")
def nano_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader-bench")
    write_set(root)
    return root


@pytest.mark.parametrize("variant", VARIANTS)
def test_loader_throughput(benchmark, variant, nano_set, bench_meta):
    if not available(variant):
        pytest.skip("NVIDIA DALI is not installed")
    loader = make_loader(variant, nano_set, torch.device("cuda"))
    try:
        run_batches(loader, 10)
        samples, moved = benchmark.pedantic(run_batches, args=(loader, 50), rounds=3, iterations=1)
    finally:
        loader.close()
    benchmark.extra_info.update(bench_meta)
    benchmark.extra_info.update(
        variant=variant,
        samples_per_s=samples / benchmark.stats.stats.median,
        bus_MB_per_sample=moved / samples / 1e6,
    )


def main() -> None:
    from conftest import machine_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_loader.json")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=250, help="timed batches per variant (2 epochs at 2,000)")
    ap.add_argument("--wait-steps", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--data", default=None, help="shard folder to reuse/write (default: a temporary folder)")
    ap.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the CPU path, no data wait"
    )
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_loader: needs a CUDA GPU (or --device cpu for the CPU path)")
    device = torch.device(args.device)
    meta = machine_info() | {"cpus": os.cpu_count(), "dali": None, "webdataset": None}
    if dali_available():
        import nvidia.dali

        meta["dali"] = nvidia.dali.__version__
    import webdataset

    meta["webdataset"] = getattr(webdataset, "__version__", "?")
    with tempfile.TemporaryDirectory(prefix="nanodit-loader-bench-") as tmp:
        root = Path(args.data or tmp)
        t = time.perf_counter()
        if not (root / "manifest.json").is_file():
            write_set(root, args.samples)
        gb = sum(p.stat().st_size for p in root.rglob("*.tar")) / 1e9
        print(
            f"data: {root}, {args.samples} samples, {gb:.1f} GB, written in {time.perf_counter() - t:.1f} s"
        )
        t = time.perf_counter()
        build_index(root)
        index_s = time.perf_counter() - t
        print(f"index: {index_s:.2f} s ({1e6 * index_s / args.samples:.0f} us/sample)")
        cycles = int(STEP_MS * sleep_cycles_per_ms()) if device.type == "cuda" else 0
        rows = []
        print(
            f"{'variant':24s} {'samples/s':>10s} {'MB/sample':>10s} {'bus GB/s':>9s} {'start s':>8s} {'wait@13ms':>10s}"
        )
        for v in args.variants.split(","):
            if not available(v):
                rows.append({"variant": v, "skipped": "NVIDIA DALI is not installed"})
                print(f"{v:24s} skipped: NVIDIA DALI is not installed")
                continue
            r = measure(v, root, device, args.batches, args.wait_steps, cycles)
            rows.append(r)
            print(
                f"{v:24s} {r['samples_per_s']:10.0f} {r['bus_MB_per_sample']:10.2f} {r['bus_GB_per_s']:9.2f} "
                f"{r['startup_s']:8.2f} {r['data_wait_pct_at_13ms']:9.2f}%",
                flush=True,
            )
    result = {"meta": meta | {"index_s": index_s, "samples": args.samples, "batch": B}, "rows": rows}
    out = Path(args.out) / "bench_loader.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
