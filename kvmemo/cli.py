"""The ``kvmemo`` command line: ``serve`` (and the tools beside it).

``kvmemo serve`` prints ``KVMemo listening on ws://HOST:PORT/ws`` as its
first stdout line (then the Redis URL, when that port is on), logs JSON
lines on stderr, and on SIGINT, SIGTERM or SIGHUP (unless started with
SIGHUP ignored, as ``nohup`` does) drains the server (in-flight
requests finish within ``shutdown_grace``, sessions are closed with 1001)
and exits 0; a Redis client's ``SHUTDOWN`` (on the Redis port, authenticated
when tokens are set) stops it the same way. A configuration that cannot
work (a bad value, an unknown setting, a port in use, an unreadable
certificate) prints one line
``kvmemo: error: ...`` on stderr and exits 2; a node that fails while
running is logged and exits 1.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from .settings import Resolved, add_flags, resolve_all

if TYPE_CHECKING:
    from .server.app import Server, StopRequest
    from .server.config import ServerConfig

TOOLS: list[Any] = []
"""Modules adding subcommands beside ``serve``: each has ``NAME``,
``add_parser(subparsers)`` and ``run(args) -> int``."""

for _name in ("repl", "loadgen", "chaos"):
    try:
        TOOLS.append(importlib.import_module(f"kvmemo.{_name}"))
    except ModuleNotFoundError as _exc:
        if _exc.name != f"kvmemo.{_name}":
            raise


class _Parser(argparse.ArgumentParser):
    """argparse with KVMemo's error line, and a suggestion for a misspelt flag."""

    flags: frozenset[str] = frozenset()  # every flag of every subcommand (set by build_parser)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            for word in message.split(":", 1)[1].split():
                flag = word.split("=", 1)[0]
                if not flag.startswith("--"):
                    continue
                close = difflib.get_close_matches(flag, sorted(self.flags), n=1)
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        self.exit(2, f"kvmemo: error: {message}\n")


class JsonFormatter(logging.Formatter):
    """Structured logs: one JSON object per line on stderr."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings become JSON lines too


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvmemo", description="KVMemo: an in-memory key-value store on trio.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser(
        "serve",
        help="run a server (WebSocket JSON-RPC + HTTP + Redis)",
        usage="%(prog)s [-h] [--config FILE] [FLAG VALUE ...]  (flags by section below)",
        description="Run a KVMemo server. Every flag is also a TOML key of its section"
        " (--config) and a KVMEMO_* environment variable; a flag wins over the variable,"
        " the variable over the file.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    add_flags(serve)
    for module in TOOLS:
        module.add_parser(sub)
    parser.flags = frozenset(
        flag
        for command in sub.choices.values()
        for flag in command._option_string_actions
        if flag.startswith("--")
    )
    return parser


class StartError(Exception):
    """The node could not start (a port in use, an unreadable certificate)."""


async def _serve(resolved: Resolved, process: bool = False) -> int:
    """Run the node until a signal or a client's ``SHUTDOWN``, then stop it gracefully.

    Signals are taken for the whole run: a second SIGINT or SIGTERM while the
    node stops (an impatient Ctrl-C, a supervisor's follow-up) is logged and
    changes nothing, so the drain and the final snapshot finish and the exit
    code stays 0. SIGHUP (the terminal closed) stops it the same way, with
    the final snapshot; not when it was ignored at start (``nohup``), which
    asks for it to outlive the terminal. With ``process`` (the ``kvmemo``
    process itself, not a caller of :func:`main` in its own process), they
    are ignored outside the receiver's time: from the node's stop to the
    exit, which then has nothing left to do (and for the instant before the
    receiver opens).

    Raises:
        StartError: the node could not start (one line for the operator).
    """
    stopping = _stop_signals()
    if process:
        # What the receiver gives back when it closes, and redelivers a
        # signal it still holds to: a signal as the node finishes stopping,
        # or after, changes nothing either.
        for signum in stopping:
            signal.signal(signum, signal.SIG_IGN)
    with trio.open_signal_receiver(*stopping) as signals:
        first = trio.Event()
        received: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_take_signals, signals, first, received)
            try:
                failed = await _run_node(resolved, first, received)
            finally:
                nursery.cancel_scope.cancel()
    if failed is not None:
        raise StartError(failed)
    return 0


def _stop_signals() -> list[int]:
    """The signals that stop the node gracefully: SIGINT, SIGTERM, and SIGHUP
    where there is one, unless it is ignored already (``nohup``)."""
    stopping: list[int] = [signal.SIGINT, signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        stopping.append(hangup)
    return stopping


async def _take_signals(
    signals: AsyncIterator[int], first: trio.Event, received: list[int]
) -> None:
    """Record every stop signal; the first sets ``first``, later ones are logged only."""
    async for signum in signals:
        received.append(signum)
        if first.is_set():
            name = signal.Signals(signum).name
            logging.getLogger("kvmemo").warning("%s: already shutting down", name)
        first.set()


async def _run_node(resolved: Resolved, signalled: trio.Event, received: list[int]) -> str | None:
    """Start the node, serve until asked to stop, stop it; the start error's line, if any."""
    from .node import open_node
    from .persistence import PersistenceError

    log = logging.getLogger("kvmemo")
    store = resolved.store
    async with AsyncExitStack() as stack:
        try:
            node = await stack.enter_async_context(open_node(store, resolved.server))
        except (OSError, PersistenceError) as exc:
            # A port in use, a bad certificate, a corrupt log (the message
            # names the file and offset): one line, exit 2, without "[Errno N]"
            # but with the file an OSError names (a directory where a data
            # file should be, an unreadable file).
            if isinstance(exc, OSError) and exc.strerror:
                where = f": {exc.filename}" if exc.filename is not None else ""
                return f"{exc.strerror}{where}"
            return str(exc)
        _announce(node.url, node.resp_url)
        log.info(
            "started: %s, %d shard%s, maxmemory %d, policy %s",
            node.url,
            store.shards,
            "" if store.shards == 1 else "s",
            store.maxmemory,
            store.eviction_policy,
        )
        exposed = exposure_warning(resolved.server)
        if exposed is not None:
            log.warning("%s", exposed)
        problems = node.server.engine.persistence_problems()
        if problems:
            # A data directory that cannot be written (read-only, full) is
            # served anyway, reads only: say so now, not at the first write.
            log.warning(
                "persistence is failing at start: writes get IO errors and /healthz"
                " answers 503 while it lasts: %s",
                "; ".join(problems),
            )
        why = await _stop_reason(node.server, signalled, received)
        log.info("%s: shutting down", why)
        request = node.server.stop_requested
        if request is not None and not request.save:
            node.server.engine.skip_final_snapshot()  # NOSAVE: the synced logs suffice
        await node.server.drain()
    log.info("stopped")
    return None


def exposure_warning(server: ServerConfig) -> str | None:
    """The warning for ports open beyond this machine to anyone, or None.

    Without ``--auth-token`` every client that reaches the ports may read and
    write every key, and stop the server (``SHUTDOWN`` on the Redis port):
    safe on a loopback address (the default), worth a word on any other
    (``0.0.0.0``, an interface's address, a host name other than
    ``localhost``), as Redis's protected mode does.
    """
    if server.tokens:
        return None
    host = server.host
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name
        loopback = host.lower() == "localhost"
    if loopback:
        return None
    return (
        f"listening on {host} without --auth-token: any client that reaches it can read and"
        " write every key and stop the server (SHUTDOWN on the Redis port)"
    )


def _announce(url: str, resp_url: str | None) -> None:
    """Print the ``KVMemo listening on ...`` lines; a standard output nobody reads is no failure.

    The lines are for whoever started the server: a reader gone already (a
    closed pipe, ``kvmemo serve | head -0``) or a full device must not stop
    a node that is serving. Such an error is logged once as a warning and
    standard output is pointed at ``/dev/null`` (as Python's documentation
    advises for a broken pipe), so that nothing written or flushed to it
    later (at exit too) fails again. Was: the node "failed" with a
    traceback and exit code 1 once it had started.
    """
    lines = [f"KVMemo listening on {url}"]
    if resp_url is not None:
        lines.append(f"KVMemo listening on {resp_url}")
    try:
        for line in lines:
            print(line, flush=True)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        logging.getLogger("kvmemo").warning(
            "standard output cannot be written (%s): the 'KVMemo listening on' lines were"
            " not printed; serving on %s",
            why,
            ", ".join(line.rsplit(" ", 1)[1] for line in lines),
        )
        _silence_stdout()


def _silence_stdout() -> None:
    """Point file descriptor 1 at ``/dev/null`` (what is still buffered is then dropped)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced, or not a real file
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


async def _stop_reason(server: Server, signalled: trio.Event, received: list[int]) -> str:
    """Wait for a stop signal (``signalled``) or a client's stop request (``SHUTDOWN``); say which.

    The stop request comes through ``server.on_stop`` (see
    :meth:`kvmemo.server.app.Server.request_stop`), set here for the time the
    node runs. A ``SHUTDOWN NOSAVE`` is logged as such (the caller then skips
    the shards' final snapshot).
    """
    stop = trio.Event()

    def on_stop(request: StopRequest) -> None:
        stop.set()

    server.on_stop = on_stop
    async with trio.open_nursery() as nursery:

        async def wait_signal() -> None:
            await signalled.wait()
            stop.set()

        nursery.start_soon(wait_signal)
        await stop.wait()
        nursery.cancel_scope.cancel()
    request = server.stop_requested
    if received and (request is None or signalled.is_set()):
        return signal.Signals(received[0]).name
    assert request is not None
    return f"SHUTDOWN from {request.origin}" + ("" if request.save else " (NOSAVE)")


def _fail(exc: Exception) -> None:
    """The one error line of a configuration that cannot work."""
    print("kvmemo: error: " + " ".join(str(exc).split()), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit status (2: bad configuration)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            resolved = resolve_all(args)  # validate before anything starts
        except ValueError as exc:
            _fail(exc)
            return 2
        _setup_logging(resolved.log_level)
        try:
            return trio.run(_serve, resolved, argv is None)
        except StartError as exc:
            _fail(exc)
            return 2
        except Exception:  # the node itself failed (its root supervisor gave up): logged
            logging.getLogger("kvmemo").exception("the node failed")
            return 1
    for module in TOOLS:
        if args.command == module.NAME:
            code: int = module.run(args)
            return code
    parser.error(f"unknown command {args.command!r}")
