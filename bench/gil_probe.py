"""What a busy Python thread costs a loop of tiny torch calls, at several GIL switch intervals.

The trainer's step is host code that makes dozens of small torch calls, each of which releases the GIL and asks
for it back. While a worker thread runs Python (the validation's plots, the TensorBoard images, a checkpoint's
pickling, background imports), each ask can wait up to ``sys.getswitchinterval()`` (5 ms by default). This probe
times a loop of ``--calls`` tiny CPU ops alone and beside a CPU-bound Python thread, per interval, and prints one
JSON object: the loop's median and mean ms and the worker's iterations per second. CPU only; no GPU needed.

    python bench/gil_probe.py --out probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # script mode: import nanodit from the repo

import torch  # noqa: E402

from nanodit.train import gil_switch_interval  # noqa: E402

INTERVALS = (5e-3, 1e-3, 1e-4, 5e-5)


def loop_ms(calls: int, repeats: int) -> tuple[float, float]:
    """(median, mean) ms of ``repeats`` loops of ``calls`` tiny torch ops."""
    x = torch.zeros(16)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = x
        for _ in range(calls):
            y = y.add(1.0)
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 4), round(1e3 * statistics.fmean(times), 4)


class Busy:
    """A thread that runs pure Python until stopped, counting its iterations."""

    def __init__(self) -> None:
        self.count, self.stop = 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop:
            sum(i * i for i in range(1000))
            self.count += 1

    def __enter__(self) -> Busy:
        self.thread.start()
        time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.thread.join()


def probe(calls: int, repeats: int) -> dict:
    out: dict = {"calls": calls, "repeats": repeats, "torch": torch.__version__}
    median, mean = loop_ms(calls, repeats)
    out["alone"] = {"median_ms": median, "mean_ms": mean}
    with Busy() as b:
        time.sleep(1.0)
    out["worker_alone_iters_per_s"] = b.count
    out["beside_worker"] = {}
    for interval in INTERVALS:
        with gil_switch_interval(interval), Busy() as b:
            t0 = time.perf_counter()
            median, mean = loop_ms(calls, repeats)
            dt = time.perf_counter() - t0
        out["beside_worker"][str(interval)] = {
            "median_ms": median,
            "mean_ms": mean,
            "worker_iters_per_s": round(b.count / dt),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    result = probe(args.calls, args.repeats)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
