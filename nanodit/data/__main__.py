"""Data tools.

python -m nanodit.data synth --out DIR [--samples 100] [--seed 0] [--size 64]
python -m nanodit.data check DIR
"""

from __future__ import annotations

import argparse
import sys

from nanodit.data.shards import check_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanodit.data", description=__doc__.split("\n")[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the synthetic shapes set")
    s.add_argument("--out", required=True)
    s.add_argument("--samples", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--size",
        type=int,
        default=64,
        help="latent side of the square bucket (64: the nano shape; images are 2x the latent)",
    )
    c = sub.add_parser("check", help="count samples per bucket and report the first problem")
    c.add_argument("dir")
    args = ap.parse_args(argv)

    if args.cmd == "synth":
        from nanodit.data.synth import make_dataset

        if args.samples <= 0:
            print("error: --samples must be > 0", file=sys.stderr)
            return 2
        if args.size < 16 or args.size % 4:
            print("error: --size must be a multiple of 4 and >= 16", file=sys.stderr)
            return 2
        manifest = make_dataset(args.out, samples=args.samples, seed=args.seed, size=args.size)
        print(f"wrote {manifest['count']} samples to {args.out}")
        for name, entry in manifest["buckets"].items():
            print(f"  {name}: {entry['count']}")
        return 0

    counts, problem = check_dir(args.dir)
    total = sum(counts.values())
    for name, n in counts.items():
        print(f"{name}: {n}")
    print(f"total: {total}")
    if problem:
        print(f"problem: {problem}")
        return 1
    print("ok: no problem found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
