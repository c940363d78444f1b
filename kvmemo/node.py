"""A KVMemo node: the engine's actors plus the server layer, under one root.

::

    root supervisor (one_for_one)
    ├── storage supervisor ── shard-0 … shard-N-1
    ├── ttl-manager
    ├── eviction supervisor ── eviction-manager   (temporary)
    └── server   (WebSocket/HTTP port, Redis port; sessions under it)
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from actors import (
    ActorKilled,
    ActorSystem,
    ChildSpec,
    EventKind,
    InjectedFault,
    LifecycleEvent,
)

from ._version import __version__
from .config import StoreConfig
from .engine.engine import KVEngine
from .server.app import Server, ServerActor
from .server.config import ServerConfig

SERVER = "server"

lifecycle_log = logging.getLogger("kvmemo.actors")


@attrs.define
class Node:
    """A running node: its engine, server and actor system."""

    engine: KVEngine
    server: Server
    system: ActorSystem
    resp_bound: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def resp_url(self) -> str | None:
        if self.resp_bound is None:
            return None
        host, port = self.resp_bound
        return f"redis://{host}:{port}"


def build(
    store: StoreConfig, server_config: ServerConfig
) -> tuple[KVEngine, Server, list[ChildSpec], dict[str, Any]]:
    """The engine, the server and the server's child spec for the root supervisor."""
    engine = KVEngine(store)
    _node_metrics(engine)
    server = Server(engine, server_config)
    bound: dict[str, Any] = {}
    extra = []
    if server_config.resp:
        from .server.openfiles import OpenFiles, reserved_fds
        from .server.resp_server import RespSettings, serve_resp

        # CONFIG SET's changes (timeout, maxclients, the slow log) outlive the
        # server actor's restarts, as the port number does. maxclients stays
        # within what the process's open-file limit allows (server.openfiles).
        reserved = reserved_fds(store.shards, persistent=store.data_dir is not None)
        settings = RespSettings(server_config.resp_limits, open_files=OpenFiles(reserved))
        settings.clients_allowed()  # a limit that leaves no client fails before any port opens

        async def run_resp(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            # Keep the port across restarts of the server actor (port 0 included).
            port = bound["resp"][1] if "resp" in bound else server_config.resp_port
            recorder = _Recorder(bound, task_status)
            try:
                await serve_resp(
                    engine,
                    host=server_config.host,
                    port=port,
                    tokens=server_config.tokens,
                    limits=server_config.resp_limits,
                    shutdown=server.request_stop,
                    config_file=server_config.config_file,
                    settings=settings,
                    task_status=recorder,
                )
            except OSError as exc:
                if recorder.done:
                    raise
                host = server_config.host
                host = f"[{host}]" if ":" in host else host
                why = exc.strerror or str(exc)
                raise OSError(exc.errno, f"cannot listen on {host}:{port}: {why}") from None

        extra.append(run_resp)
    spec = ChildSpec(SERVER, start=lambda ctx: ServerActor(server, extra))
    return engine, server, [spec], bound


def _node_metrics(engine: KVEngine) -> None:
    """Register what ``/metrics`` says of the node as a whole (read at each scrape).

    - ``kvmemo_build_info{version}``: always 1 (Prometheus's ``_info`` idiom);
    - ``kvmemo_start_time_seconds``: when the node started (Unix time), so a
      restart shows as a step;
    - ``kvmemo_persistence_problems``: what ``/healthz`` reports of
      persistence (a shard whose log cannot be written, or whose last
      snapshot failed: one each); 0 without persistence. Alert on it > 0.
    """
    m = engine.metrics
    m.gauge("kvmemo_build_info", "KVMemo's version (always 1)", ["version"]).labels(
        __version__
    ).set(1)
    m.gauge("kvmemo_start_time_seconds", "When the node started, in Unix time").set(time.time())
    m.gauge(
        "kvmemo_persistence_problems",
        "Shards whose log cannot be written or whose last snapshot failed (as /healthz)",
    ).set_function(lambda: float(len(engine.persistence_problems())))


async def _log_lifecycle(system: ActorSystem) -> None:
    """Log the actors' lifecycle events while the node runs (see :func:`log_event`)."""
    async with system.events.subscribe() as events:
        async for event in events:
            log_event(event)


def log_event(event: LifecycleEvent) -> None:
    """One lifecycle event as the operator wants it in the log.

    A crash is a warning (with its traceback, unless it is a chaos kill or an
    injected fault: those say so in one line), a restart is info, a state
    that failed its checks and was rebuilt is a warning, a supervisor that
    gave up is an error (its parent restarts its subtree, or the node stops);
    starts and clean stops are debug (every actor has them, at every start
    and stop). Without these lines a crash showed only as a restart count
    in ``/metrics``.
    """
    name, error = event.actor, event.error
    if event.kind is EventKind.CRASHED:
        if isinstance(error, ActorKilled | InjectedFault):
            lifecycle_log.warning("%s crashed (chaos: %s)", name, _describe(error))
        elif error is not None:
            lifecycle_log.warning(
                "%s crashed: %s",
                name,
                _describe(error),
                exc_info=(type(error), error, error.__traceback__),
            )
        else:
            lifecycle_log.warning("%s crashed", name)
    elif event.kind is EventKind.RESTARTED:
        lifecycle_log.info("%s restarted", name)
    elif event.kind is EventKind.STATE_REBUILT:
        lifecycle_log.warning("%s: its state failed its checks and was rebuilt", name)
    elif event.kind is EventKind.GAVE_UP:
        lifecycle_log.error("%s gave up: %s", name, _describe(error))
    else:
        lifecycle_log.debug("%s %s", name, event.kind.value)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no error recorded"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Recorder:
    """Passes ``started`` on, keeping the bound address for the node."""

    def __init__(self, bound: dict[str, Any], status: trio.TaskStatus[Any]) -> None:
        self.bound = bound
        self.status = status
        self.done = False

    def started(self, value: Any = None) -> None:
        self.bound["resp"] = value
        self.done = True
        self.status.started(value)


@asynccontextmanager
async def open_node(
    store: StoreConfig | None = None, server_config: ServerConfig | None = None
) -> AsyncIterator[Node]:
    """Run a whole node (engine + server) for the duration of the block.

    The WebSocket/HTTP port is bound before any actor starts and the block
    runs once every listener (the Redis port too) is bound, so a port that
    cannot be had fails here at once with ``OSError``. An exception raised by
    the block comes out as itself, not wrapped in an exception group.

    Raises:
        OSError: an address cannot be bound, or the open-file limit (``ulimit
            -n``) leaves the Redis port no client (see ``server.openfiles``).
    """
    store = store if store is not None else StoreConfig()
    server_config = server_config if server_config is not None else ServerConfig()
    engine, server, extra, bound = build(store, server_config)
    await server.bind()
    try:
        await engine.prepare()  # recovery from disk, when persistence is on
    except BaseException:  # a corrupt log, an unusable data directory: nothing left open
        engine.close()
        with trio.CancelScope(shield=True):
            for listener in server.listeners:
                await listener.aclose()
        raise
    body_error: BaseException | None = None
    start_error: OSError | None = None
    try:
        async with trio.open_nursery() as nursery:
            system: ActorSystem = await nursery.start(engine.supervisor(extra).run)
            nursery.start_soon(_log_lifecycle, system)
            await server.ready.wait()  # every listener bound (the Redis port too)
            start_error = server.start_error
            if start_error is not None:
                nursery.cancel_scope.cancel()
            else:
                node = Node(engine, server, system, bound.get("resp"))
                try:
                    yield node
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if body_error is not None and list(group.exceptions) == [body_error]:
            raise body_error from None
        if start_error is not None:
            raise start_error from None
        raise
    finally:
        engine.close()
        with trio.CancelScope(shield=True):
            for listener in server.listeners:  # when the server actor never started
                await listener.aclose()
    if start_error is not None:
        raise start_error
