"""How nanodit talks: one ``logging`` tree under the ``nanodit`` logger, printed to stdout as plain lines.

Every module logs to ``logging.getLogger(__name__)`` (a module that runs as ``python -m`` names itself:
its ``__name__`` is then ``__main__``, outside the tree). The command lines set it up for their run
(``command_logging``) from their ``-q``/``-v`` count (``add_verbosity``): ``-q`` keeps warnings and errors only, the default adds the progress
lines (INFO), ``-v`` adds DEBUG. INFO lines print as they are; other levels get their name in front
(``warning: ...``), so a line keeps reading the same in a terminal and in a log file. While a tqdm bar is drawn,
``progress_safe`` routes the lines through ``tqdm.write`` so that they never cut the bar.

A program that configures ``logging`` itself keeps its own handlers: ``ensure_configured`` (what ``train`` calls)
installs the default handler only where neither the ``nanodit`` logger nor the root logger has one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

LOG = logging.getLogger("nanodit")


class _Stdout(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stdout`` is at the time of the call (pytest's capture,
    a redirect made after start-up)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # noqa: D102 - the StreamHandler attribute
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property always answers sys.stdout
        pass


class _Plain(logging.Formatter):
    """INFO as the bare message; every other level as ``<level>: message``."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg = f"{msg}\n{self.formatException(record.exc_info)}"
        return msg if record.levelno == logging.INFO else f"{record.levelname.lower()}: {msg}"


def _ours(handler: logging.Handler) -> bool:
    return isinstance(handler, _Stdout)


def configure(verbosity: int = 0) -> None:
    """Print nanodit's log to stdout: ``verbosity`` -1 (``-q``) warnings only, 0 progress lines, 1+ debug."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    LOG.setLevel(level)
    if not any(_ours(h) for h in LOG.handlers):
        handler = _Stdout()
        handler.setFormatter(_Plain())
        LOG.addHandler(handler)
    LOG.propagate = False  # printed once, by this handler


@contextlib.contextmanager
def command_logging(verbosity: int) -> Iterator[None]:
    """``configure(verbosity)`` for the duration of one command (its ``main``); the logger's level, handlers and
    propagation come back after, so that a program (or a test) calling several commands keeps its own setup."""
    saved = LOG.level, list(LOG.handlers), LOG.propagate
    configure(verbosity)
    try:
        yield
    finally:
        LOG.setLevel(saved[0])
        LOG.handlers[:] = saved[1]
        LOG.propagate = saved[2]


def ensure_configured() -> None:
    """``configure()`` unless the program already set up logging (its handlers then get nanodit's records)."""
    if not LOG.handlers and not logging.getLogger().handlers:
        configure(0)


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """The ``-q``/``--quiet`` and ``-v``/``--verbose`` flags every nanodit command takes."""
    parser.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="also debug lines")


def verbosity(args: argparse.Namespace) -> int:
    return args.verbose - args.quiet


@contextlib.contextmanager
def quieted(on: bool, level: int = logging.WARNING) -> Iterator[None]:
    """Only ``level`` and above for the duration (``train(cfg, quiet=True)``: warnings; a rank other than 0:
    errors); the level comes back after."""
    if not on:
        yield
        return
    old = LOG.level
    LOG.setLevel(max(level, old))
    try:
        yield
    finally:
        LOG.setLevel(old)


@contextlib.contextmanager
def progress_safe(on: bool) -> Iterator[None]:
    """While a tqdm bar is drawn: log lines go through ``tqdm.write`` (above the bar, never through it)."""
    if not on:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm  # only where a bar is drawn

    with logging_redirect_tqdm(loggers=[LOG]):
        yield
