"""The ``nanodit`` command: one entry point for the trainer, the validator and the data tools.

    nanodit train [--config nano] [key=value ...]       # = python -m nanodit.train
    nanodit validate --run DIR [--self-test] [val.*=...]  # = python -m nanodit.validate
    nanodit data synth|check [key=value ...]             # = python -m nanodit.data
    nanodit config [--config nano]                       # every config key: type, value, what it does

Each command takes ``key=value`` config overrides and lists its options under ``--help``.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "train a DiT by flow matching and write the GO / NO-GO report",
    "validate": "judge a run's checkpoint again (other sampler settings, encoders, the self-test)",
    "data": "write the built-in shapes set, or check shards the way every loader reads them",
    "config": "print every config key with its type, value and description",
}


def _usage() -> str:
    lines = ["usage: nanodit COMMAND [options] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<9} {what}" for name, what in COMMANDS.items()]
    lines += ["", "nanodit COMMAND --help lists a command's options."]
    return "\n".join(lines)


def _config(argv: list[str]) -> int:
    import argparse

    from nanodit.config import ConfigError, describe, load_config  # late, as the commands: --help stays fast

    ap = argparse.ArgumentParser(prog="nanodit config", description=COMMANDS["config"])
    ap.add_argument("--config", help="a YAML file or a bundled name (nano, nano-plan, smoke, production)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    # each command's module is imported only when it runs (torch and the model load in the trainer's)
    if command == "train":
        from nanodit.train import main as run
    elif command == "validate":
        from nanodit.validation.cli import main as run
    elif command == "data":
        from nanodit.data.__main__ import main as run
    elif command == "config":
        run = _config
    else:
        print(
            f"error: nanodit: unknown command {command!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr
        )
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
