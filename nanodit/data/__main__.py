"""Data tools.

python -m nanodit.data synth --out DIR [--samples 100] [--seed 0] [--size 64]
python -m nanodit.data check PATH [--config FILE] [data.keys.latent=vae.npy data.t5_max_len=300 ...]

``check`` reads every sample with the same check (and the same ``data.*`` settings) as the loaders: counts per
bucket, every problem by reason (the first few in full); exit 0 when clean (and a stamp lets the loaders skip
re-reading the arrays while the files stay unchanged), 1 when it found problems, 2 for a usage mistake.
"""

from __future__ import annotations

import argparse
import sys

from nanodit.data.shards import ShardError


def _synth(args) -> int:
    from nanodit.shapes import make_dataset

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


def _check(args) -> int:
    from nanodit.config import ConfigError, load_config
    from nanodit.data import data_keys
    from nanodit.data.check import check_data, write_stamp
    from nanodit.data.layout import resolve

    try:
        for o in args.overrides:
            if not o.startswith("data."):
                raise ConfigError(f"config: override {o!r}: only data.* settings apply to a data check")
        cfg = load_config(args.config, [*args.overrides, f"data.path={args.path}"])
        layout = resolve(args.path, data_keys(cfg), cfg.data.t5_max_len)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:
        print(f"problem: {e}")
        return 1
    m = layout.manifest
    keys = ", ".join(f"{k}={v}" for k, v in m.get("keys", {}).items()) or "default"
    print(
        f"data: {args.path} (layout {layout.kind}, {m['count']} samples in {len(layout.shards)} shards, "
        f"T5 limit {m['t5_limit']['source']}, keys {keys})"
    )
    report = check_data(layout, threads=max(1, cfg.data.num_workers), progress=args.progress)
    for name, n in report.counts.items():
        print(f"{name}: {n}")
    print(f"total: {sum(report.counts.values())} samples passed")
    if report.float32_samples:
        print(
            f"note: {report.float32_samples} samples store float32 arrays: data.loader=gpu-cache converts them, "
            "the streaming loaders (webdataset, dali) need float16"
        )
    problems = report.problems
    if problems:
        reasons = ", ".join(f"{k}: {v}" for k, v in report.by_reason.items())
        print(f"problems: {len(problems)} ({reasons})")
        for e in problems[: args.show]:
            print(f"problem: {e}")
        if len(problems) > args.show:
            print(f"... and {len(problems) - args.show} more (--show N prints more)")
        return 1
    if args.stamp:
        try:
            print(
                f"ok: no problem found; stamp {write_stamp(report)} (loaders skip re-reading unchanged files)"
            )
        except OSError as e:
            print(f"ok: no problem found (no stamp written: {e.strerror}; loaders will re-read the arrays)")
    else:
        print("ok: no problem found")
    return 0


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
    c = sub.add_parser("check", help="read every sample as the loaders do: counts per bucket, every problem")
    c.add_argument("path", help="a shard folder, a glob, a brace pattern or a comma-separated list of tars")
    c.add_argument(
        "overrides", nargs="*", help="data.* settings, as for training (data.keys.*, data.t5_max_len)"
    )
    c.add_argument("--config", help="a YAML file or bundled name whose data.* settings apply")
    c.add_argument("--show", type=int, default=10, help="problems printed in full (default 10)")
    c.add_argument("--no-stamp", dest="stamp", action="store_false", help="do not write the stamp")
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args, extra = ap.parse_known_args(argv)  # key=value overrides may follow the options too
    if extra and (args.cmd != "check" or any(x.startswith("-") or "=" not in x for x in extra)):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return _synth(args) if args.cmd == "synth" else _check(args)


if __name__ == "__main__":
    sys.exit(main())
