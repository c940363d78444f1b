"""The transaction suite against three front doors: embedded, WebSocket, redis-py.

Each door adapts its own transaction API to the suite's (see
``transaction_suite``): ``kv.transaction``/``kv.watch`` of the embedded
store and of the WebSocket client, and redis-py's transactional pipeline
(MULTI/EXEC, WATCH) over the Redis port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
import redis.exceptions
import trio
from test_resp_server import (
    TIMEOUT,
    RedisPyKV,
    RespCommandError,
    _as_protocol_result,
    error_kind,
    running,
    sync_redis_py,
)
from transaction_suite import SHARDS, TXN_SUITE, Refused, TxnCase

import kvmemo
from kvmemo.api import encode_arg
from kvmemo.client import connect
from kvmemo.config import StoreConfig
from kvmemo.errors import ArityError, CommandSyntaxError, UnknownCommandError
from kvmemo.node import open_node
from kvmemo.server.config import ServerConfig

IDS = [c.name for c in TXN_SUITE]
WHOLE = (ArityError, UnknownCommandError, CommandSyntaxError)  # refusals of the whole


class KVDoor:
    """The embedded store or the WebSocket client: both have transaction() and watch()."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def transaction(self, *calls: tuple[Any, ...]) -> Any:
        return await _refusing(self.kv.transaction(*calls))

    @asynccontextmanager
    async def watch(self, *keys: str) -> AsyncIterator[Any]:
        async with self.kv.watch(*keys) as w:
            yield _Watched(w)


class _Watched:
    def __init__(self, w: Any) -> None:
        self.w = w

    async def transaction(self, *calls: tuple[Any, ...]) -> Any:
        return await _refusing(self.w.transaction(*calls))


async def _refusing(pending: Any) -> Any:
    try:
        return await pending
    except WHOLE as exc:
        raise Refused(str(exc)) from exc


class RedisPyDoor:
    """redis-py's transactional pipeline: MULTI ... EXEC, WATCH, over the Redis port."""

    def __init__(self, client: redis.Redis, kv: RedisPyKV) -> None:
        self.client = client
        self.kv = kv

    async def transaction(self, *calls: tuple[Any, ...]) -> Any:
        return await trio.to_thread.run_sync(self._run, self.client.pipeline(), calls)

    @asynccontextmanager
    async def watch(self, *keys: str) -> AsyncIterator[Any]:
        pipe = self.client.pipeline()
        await trio.to_thread.run_sync(lambda: pipe.watch(*keys))
        try:
            yield _PipeWatched(self, pipe)
        finally:
            await trio.to_thread.run_sync(pipe.reset)

    @staticmethod
    def _run(pipe: Any, calls: tuple[tuple[Any, ...], ...]) -> Any:
        argvs = [[encode_arg(a) for a in call] for call in calls]
        if pipe.watching:
            pipe.multi()
        for argv in argvs:
            pipe.execute_command(*argv)
        try:
            raw = pipe.execute(raise_on_error=False)
        except redis.exceptions.WatchError:
            return None
        except redis.exceptions.ExecAbortError as exc:
            raise Refused(str(exc)) from exc
        except redis.exceptions.ResponseError as exc:  # redis-py raises the queueing error
            raise Refused(str(exc)) from exc
        return [
            RespCommandError(error_kind(r), str(r))
            if isinstance(r, redis.exceptions.ResponseError)
            else _as_protocol_result(argv[0].decode(), argv[1:], r)
            for argv, r in zip(argvs, raw, strict=True)
        ]


class _PipeWatched:
    def __init__(self, door: RedisPyDoor, pipe: Any) -> None:
        self.door = door
        self.pipe = pipe

    async def transaction(self, *calls: tuple[Any, ...]) -> Any:
        return await trio.to_thread.run_sync(RedisPyDoor._run, self.pipe, calls)


@pytest.mark.parametrize("case", TXN_SUITE, ids=IDS)
async def test_embedded(case: TxnCase) -> None:
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=SHARDS) as kv:
            await case.run(KVDoor(kv))


@pytest.mark.parametrize("case", TXN_SUITE, ids=IDS)
async def test_websocket_client(case: TxnCase) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            open_node(
                StoreConfig(shards=SHARDS), ServerConfig(host="127.0.0.1", port=0, resp=False)
            ) as node,
            connect(node.url) as kv,
        ):
            await case.run(KVDoor(kv))


@pytest.mark.parametrize("case", TXN_SUITE, ids=IDS)
async def test_redis_py(case: TxnCase) -> None:
    with trio.fail_after(TIMEOUT):
        async with running(shards=SHARDS) as server, sync_redis_py(server.port, 2) as call:
            client = redis.Redis(port=server.port, protocol=2, decode_responses=False)
            client.response_callbacks.clear()  # raw replies, as the suite's kv sees them
            try:
                await case.run(RedisPyDoor(client, RedisPyKV(call)))
            finally:
                await trio.to_thread.run_sync(client.close)
