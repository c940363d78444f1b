"""What the command-line tools that talk to a server share (``kvmemo cli``, ``bench``).

- ``--url``: :func:`add_url_flag` declares it and :func:`url_of` reads it:
  the flag when given, else the ``KVMEMO_URL`` environment variable, else
  ``ws://127.0.0.1:7070/ws`` (:func:`kvmemo.client.session_url`, which the
  Python client's users can call too).
- A reader that goes away early (``kvmemo cli -c "KEYS *" | head -5``):
  :func:`quiet_on_broken_pipe` ends the tool silently with status 141, as a
  Unix tool killed by SIGPIPE ends (Python ignores SIGPIPE, so a write to a
  closed pipe raises ``BrokenPipeError`` instead), following the recipe of
  Python's ``signal`` documentation ("Note on SIGPIPE").
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .client import DEFAULT_URL, URL_VARIABLE, session_url

__all__ = ["EXIT_BROKEN_PIPE", "add_url_flag", "quiet_on_broken_pipe", "url_of"]

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE (13): what a shell reports for `yes | head -1`

URL_GIVEN = "url_given"  # the attribute that says --url was on the command line


class _UrlFlag(argparse.Action):
    """Stores ``--url`` and notes that it was given, so ``KVMEMO_URL`` does not replace it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, URL_GIVEN, True)


def add_url_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--url`` to a tool's parser (its value: ``args.url``; read it with :func:`url_of`).

    ``args.url`` holds the built-in default when the flag is not given (the
    environment is read by :func:`url_of`, when the tool runs, so that a bad
    ``KVMEMO_URL`` never stops another subcommand from parsing).
    """
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        action=_UrlFlag,
        help=f"session URL (default: ${URL_VARIABLE}, else {DEFAULT_URL})",
    )


def url_of(args: argparse.Namespace) -> str:
    """The URL a tool connects to: ``--url`` when given, else ``$KVMEMO_URL``, else the default.

    Raises:
        ValueError: that URL is no ``ws://``/``wss://`` URL with a host and a
            valid port; the message names ``--url`` or ``KVMEMO_URL``.
    """
    return session_url(args.url if getattr(args, URL_GIVEN, False) else None)


def quiet_on_broken_pipe(run: Callable[[], int]) -> int:
    """``run()``'s exit status; 141, silently, once its output's reader has gone away.

    A ``BrokenPipeError`` (alone, or every exception of a group a nursery
    raised) ends the tool: standard output is pointed at ``/dev/null`` so
    that Python's own flush at exit cannot fail again and print a traceback
    ("Exception ignored ... BrokenPipeError"). Anything else propagates.
    """
    try:
        return run()
    except BrokenPipeError:
        pass
    except BaseExceptionGroup as group:
        _, rest = group.split(BrokenPipeError)
        if rest is not None:
            raise
    _silence_stdout()
    return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Point file descriptor 1 at ``/dev/null`` (when standard output is a file at all)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return  # replaced by something that is no file (a test's capture): nothing to flush
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
