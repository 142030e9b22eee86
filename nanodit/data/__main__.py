"""Data tools: write the built-in shapes set, check a data set. Settings are the config's ``data.*`` keys, given
as for training: defaults < ``--config FILE`` < ``key=value``.

    python -m nanodit.data synth [--config FILE] [data.path=DIR] [data.synth_samples=100 data.synth_seed=0 ...]
    python -m nanodit.data check [--config FILE] [data.path=PATH] [data.keys.latent=vae.npy ...]
                                 [--show N] [--no-stamp] [--no-progress]

``synth`` writes the shapes set of ``data.synth_samples/seed/size`` into ``data.path``, or, when it is null, where
training with the same settings finds the built-in set (a folder of ``data.cache_dir``). ``check`` reads every
sample of ``data.path`` (null: the built-in set) with the same check and the same ``data.*`` settings as the
loaders: counts per bucket, every problem by reason (the first few in full). Exit 0 when clean (and a stamp lets
the loaders skip re-reading the arrays while the files stay unchanged), 1 when it found problems, 2 for a usage
mistake.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanodit.config import Config, ConfigError, DataConfig, load_config
from nanodit.data import data_keys, data_root, synthetic_dir
from nanodit.data.check import CheckReport, check_data, write_stamp
from nanodit.data.layout import Layout, resolve
from nanodit.data.prepare import write_synthetic
from nanodit.data.shards import ShardError
from nanodit.logs import add_verbosity, command_logging, verbosity

SYNTH_KEYS = ("path", "cache_dir", "synth_samples", "synth_seed", "synth_size")


def synth(cfg: Config) -> int:
    """``python -m nanodit.data synth``: write the shapes set; returns the exit code."""
    out = Path(cfg.data.path) if cfg.data.path is not None else synthetic_dir(cfg)
    manifest = write_synthetic(cfg, out)
    print(f"wrote {manifest['count']} samples to {out}")
    for name, entry in manifest["buckets"].items():
        print(f"  {name}: {entry['count']}")
    return 0


def _layout(cfg: Config) -> Layout:
    """The layout ``check`` reads: ``data.path`` as given, or the built-in set (which must be written)."""
    spec = cfg.data.path if cfg.data.path is not None else data_root(cfg)
    return resolve(spec, data_keys(cfg), cfg.data.t5_max_len)


def _print_problems(report: CheckReport, show: int) -> None:
    reasons = ", ".join(f"{k}: {v}" for k, v in report.by_reason.items())
    print(f"problems: {len(report.problems)} ({reasons})")
    for e in report.problems[:show]:
        print(f"problem: {e}")
    if len(report.problems) > show:
        print(f"... and {len(report.problems) - show} more (--show N prints more)")


def check(cfg: Config, show: int = 10, stamp: bool = True, progress: bool = True) -> int:
    """``python -m nanodit.data check``: read every sample, print what was found; returns the exit code."""
    try:
        layout = _layout(cfg)
    except ShardError as e:
        print(f"problem: {e}")
        return 1
    m = layout.manifest
    keys = ", ".join(f"{k}={v}" for k, v in m.get("keys", {}).items()) or "default"
    print(
        f"data: {layout.spec} (layout {layout.kind}, {m['count']} samples in {len(layout.shards)} shards, "
        f"T5 limit {m['t5_limit']['source']}, keys {keys})"
    )
    report = check_data(layout, threads=max(1, cfg.data.num_workers), progress=progress)
    for name, n in report.counts.items():
        print(f"{name}: {n}")
    print(f"total: {sum(report.counts.values())} samples passed")
    if report.float32_samples:
        print(
            f"note: {report.float32_samples} samples store float32 arrays: data.loader=gpu-cache converts them, "
            "the streaming loaders (webdataset, dali) need float16"
        )
    if report.problems:
        _print_problems(report, show)
        return 1
    if not stamp:
        print("ok: no problem found")
        return 0
    try:
        print(f"ok: no problem found; stamp {write_stamp(report)} (loaders skip re-reading unchanged files)")
    except OSError as e:
        print(f"ok: no problem found (no stamp written: {e.strerror}; loaders will re-read the arrays)")
    return 0


def data_config(config: str | None, overrides: list[str]) -> Config:
    """The config of a data command: only ``data.*`` settings apply (a ConfigError names any other)."""
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"config: {o!r} is not of the form key=value (a data folder is data.path={o})")
        if not o.startswith("data."):
            raise ConfigError(f"config: override {o!r}: only data.* settings apply to a data command")
    return load_config(config, overrides)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m nanodit.data",
        description="Data tools: write the built-in shapes set, check a data set. Settings are the config's "
        "data.* keys, given as for training: defaults < --config FILE < key=value.",
        epilog="'python -m nanodit.data synth -h' and 'check -h' list their options.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser(
        "synth",
        help="write the synthetic shapes set",
        description="Write the shapes set of data.synth_samples/seed/size into data.path, or, when data.path "
        "is null, where training with the same settings finds the built-in set (a folder of data.cache_dir).",
    )
    defaults = DataConfig()
    keys = ", ".join(f"data.{k} (default {getattr(defaults, k)})" for k in SYNTH_KEYS).replace("None", "null")
    s.add_argument("overrides", nargs="*", metavar="key=value", help=f"data.* settings: {keys}")
    c = sub.add_parser(
        "check",
        help="read every sample as the loaders do: counts per bucket, every problem",
        description="Read every sample of data.path (null: the built-in set) with the loaders' check and "
        "data.* settings; exit 0 when clean, 1 with problems, 2 for a usage mistake.",
    )
    c.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="data.* settings, as for training: data.path=PATH (a folder, a glob, a brace pattern or a "
        "comma-separated list of tars), data.keys.latent=vae.npy (the members' names), data.t5_max_len=300, "
        "data.num_workers=N (reading threads)",
    )
    c.add_argument("--show", type=int, default=10, metavar="N", help="problems printed in full (default 10)")
    c.add_argument(
        "--no-stamp", dest="stamp", action="store_false", help="do not write the stamp of a clean check"
    )
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    for p in (s, c):
        add_verbosity(p)
        p.add_argument(
            "--config",
            metavar="FILE",
            help="a YAML file or a bundled name (nano, nano-plan, smoke, production) whose data.* settings apply; "
            "default: the schema's defaults (nano's data)",
        )
    return ap


def main(argv: list[str] | None = None) -> int:
    """``python -m nanodit.data``; returns the exit code (2: a usage or config mistake)."""
    ap = parser()
    args, extra = ap.parse_known_args(argv)  # key=value overrides may follow the options too
    if any(x.startswith("-") for x in extra):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        cfg = data_config(args.config, [*args.overrides, *extra])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with command_logging(verbosity(args)):
        if args.cmd == "synth":
            return synth(cfg)
        return check(cfg, args.show, args.stamp, args.progress and not args.quiet)


if __name__ == "__main__":
    sys.exit(main())
