"""What one WebSocket session can make the server hold (review, session 21).

Was: a session's memory was ``max_output_buffer`` plus the responses of
every request in flight (up to ``max_in_flight``, 100,000). With
``--max-output-buffer 1MB``, one batch of 3,000 ``getrange`` of a 100 KB
value, from a client that reads nothing, took a server from 41 MB to
821 MB: a batch's results were all computed, then all encoded, at once;
and pipelined messages kept being read and started while the responses of
those before them were not back yet (the reader looked at the output only
before a read, and only at responses already queued).

Now (see the session module, "Output and memory"): the reader dispatches a
message only while the responses waiting for the socket are within
``max_output_buffer`` and the unanswered requests within ``pipeline_window``
(no request starts past the output limit either); a batch longer than the
window runs in chunks (the first of ``BATCH_CHUNK``, the next sized to the
room left under the limit), one such batch at a time, and once its answer
passes ``max_output_buffer`` its requests not yet started are answered
``TOO_LARGE`` (-32004, ``data.applied`` false) without being run. The tests
of the window, the output limit, the cut and the chunks failed before; the
others guard what the fix must keep (answers, order, no head-of-line wait,
a silent peer still dropped, the setting).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import trio
import trio.testing
from test_cli import resolved
from test_review_s20 import _request, _slow_session
from trio_websocket import WebSocketConnection, open_websocket_url
from ws_raw import client_frame

from kvmemo.config import StoreConfig
from kvmemo.engine.engine import KVEngine
from kvmemo.node import Node, open_node
from kvmemo.server import session as session_module
from kvmemo.server.config import ServerConfig

TEST_TIMEOUT = 20  # seconds per test
VALUE = "v" * 10_000
RESPONSE = len(json.dumps({"jsonrpc": "2.0", "id": 99999, "result": VALUE})) + 1  # bytes, at most


def _req(rid: int | None, method: str, *params: str) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": list(params)}
    if rid is not None:
        request["id"] = rid
    return request


def _held(session: Any) -> int:
    """Response bytes the session holds for its peer (queued, or handed to the socket)."""
    return int(session._outbox_bytes + session._sending_bytes)


async def _with_big_value(running: Node) -> KVEngine:
    """The node's engine, once the key ``big`` holds VALUE (the responses the tests weigh)."""
    engine = running.server.engine
    assert engine is not None
    await engine.execute("set", [b"big", VALUE.encode()])
    return engine


def _spy_chunks(monkeypatch: pytest.MonkeyPatch, running: Node) -> list[int]:
    """Record how many calls each ``execute_many`` gets (the results computed at once)."""
    engine = running.server.engine
    assert engine is not None
    real = engine.execute_many
    sizes: list[int] = []

    async def spy(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
        sizes.append(len(calls))
        return await real(calls)

    monkeypatch.setattr(engine, "execute_many", spy)
    return sizes


# -- pipelined messages ----------------------------------------------------------------------


async def test_pipelined_requests_behind_a_slow_one_are_not_read_past_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3,000 pipelined GETRANGEs of 10 KB while the shards are slow, from a peer that reads
    nothing: the session holds at most the output limit plus one window of responses.

    Was: the reader took all 3,000 (nothing had come back to go over the limit),
    then every one of them was answered into the outbox: 30 MB held for a 64 KiB limit.
    """
    window = ServerConfig().pipeline_window
    with trio.fail_after(TEST_TIMEOUT):
        async with _slow_session(65536, 30) as (running, stream, session):
            engine = await _with_big_value(running)
            gate = trio.Event()
            real = engine.execute_many
            started: list[int] = []

            async def slow(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
                started.append(len(calls))
                await gate.wait()
                return await real(calls)

            monkeypatch.setattr(engine, "execute_many", slow)
            requests = b"".join(_request(i, "getrange", "big", "0", "-1") for i in range(3000))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, requests)  # blocks once reading stops
                await trio.testing.wait_all_tasks_blocked()
                unanswered = session.in_flight
                gate.set()
                await trio.testing.wait_all_tasks_blocked()
                held = _held(session)
                nursery.cancel_scope.cancel()
            await stream.aclose()
    assert unanswered <= window, f"{unanswered} requests taken while none was answered"
    assert sum(started) <= 2 * window
    assert held <= 65536 + window * RESPONSE, f"{held} bytes held (limit 65536)"


async def test_a_pipelining_client_that_reads_gets_every_answer_through_a_small_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The window is backpressure, not an error: 2,000 pipelined INCRs through a window of
    4 are all answered, in order per key, never more than 4 unanswered at once."""
    config = ServerConfig(host="127.0.0.1", port=0, resp=False, pipeline_window=4)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_node(StoreConfig(shards=2), config) as running,
            open_websocket_url(running.url) as ws,
        ):
            sizes = _spy_chunks(monkeypatch, running)
            await ws.send_message(json.dumps(_req(0, "ping")))  # the session exists
            assert json.loads(await ws.get_message())["result"] == "PONG"
            (session,) = running.server.sessions
            most = 0
            for i in range(2000):
                await ws.send_message(json.dumps(_req(i, "incr", f"n{i % 3}")))
            answers: dict[int, Any] = {}
            while len(answers) < 2000:
                most = max(most, session.in_flight)
                response = json.loads(await ws.get_message())
                answers[response["id"]] = response["result"]
    assert max(sizes) <= 4
    assert most <= 4
    for n in range(3):
        assert [answers[i] for i in range(n, 2000, 3)] == list(range(1, len(range(n, 2000, 3)) + 1))


async def test_error_answers_count_against_the_output_limit_message_by_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Messages answered by the reader itself (unknown methods, each 10 KB) from a peer that
    reads nothing: the reader stops at the output limit, not after all it had taken.

    The reader is held in ``command.list`` (run in order: after a GET the shards are slow
    to answer) while the 200 messages arrive, so that it then takes many at once.
    """
    with trio.fail_after(TEST_TIMEOUT):
        async with _slow_session(65536, 30) as (running, stream, session):
            engine = running.server.engine
            assert engine is not None
            gate = trio.Event()
            real = engine.execute_many

            async def slow(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
                await gate.wait()
                return await real(calls)

            monkeypatch.setattr(engine, "execute_many", slow)
            await stream.send_all(_request(1, "get", "k") + _request(2, "command.list"))
            await trio.testing.wait_all_tasks_blocked()
            requests = b"".join(_request(i, "x" * 10_000) for i in range(200))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, requests)
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
                await trio.testing.wait_all_tasks_blocked()
                held = _held(session)
                nursery.cancel_scope.cancel()
            await stream.aclose()
    assert held <= 65536 + RESPONSE, f"{held} bytes held (limit 65536)"


# -- batches ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _batch_session(limit: int) -> AsyncIterator[tuple[Node, WebSocketConnection]]:
    """A node whose sessions have this output limit, and a session of it (any answer size)."""
    config = ServerConfig(host="127.0.0.1", port=0, resp=False, max_output_buffer=limit)
    async with (
        open_node(StoreConfig(shards=2), config) as running,
        open_websocket_url(running.url, max_message_size=64 << 20) as ws,
    ):
        yield running, ws


async def test_a_batch_whose_response_passes_the_output_limit_is_cut_with_too_large(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2,000 GETRANGEs of 10 KB in one batch (longer than the window) with a 64 KiB limit: the
    batch runs in chunks; once its response passes the limit the requests not yet run get
    TOO_LARGE, not run (a write among them is not applied); a notification still runs.

    Was: every result computed at once (20 MB of results, then 20 MB of text).
    """
    limit = 65536
    chunk = session_module.BATCH_CHUNK
    batch = [_req(i, "getrange", "big", "0", "-1") for i in range(2000)]
    batch += [_req(2000, "set", "late", "x"), _req(None, "set", "note", "y")]
    with trio.fail_after(TEST_TIMEOUT):
        async with _batch_session(limit) as (running, ws):
            engine = await _with_big_value(running)
            sizes = _spy_chunks(monkeypatch, running)
            await ws.send_message(json.dumps(batch))
            text = await ws.get_message()
            answer = {r["id"]: r for r in json.loads(text)}
            late = await engine.execute("get", [b"late"])
            note = await engine.execute("get", [b"note"])
    assert sorted(answer) == list(range(2001))
    ran = [i for i in range(2001) if "result" in answer[i]]
    assert ran == list(range(len(ran))), "the requests run are the batch's first ones"
    assert 1 <= len(ran) <= chunk + limit // 10_000
    for i in range(len(ran), 2001):
        err = answer[i]["error"]
        assert (err["code"], err["data"]["kind"], err["data"]["applied"]) == (
            -32004,
            "TOO_LARGE",
            False,
        )
        assert "output limit" in err["message"]
    assert all(answer[i]["result"] == VALUE for i in ran)
    assert len(text.encode()) <= limit + (chunk + 1) * RESPONSE + 2000 * 300
    assert max(sizes) <= chunk, f"{max(sizes)} results computed at once"
    assert (late, note) == (None, b"y")


async def test_a_batch_under_the_output_limit_runs_whole_in_order_across_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch longer than the window (3,000: 1,500 INCRs of one key, 1,500 SETs of others)
    is answered whole, each key's requests in batch order across its chunks."""
    batch: list[dict[str, Any]] = []
    for i in range(3000):
        batch.append(_req(i, "incr", "n") if i % 2 else _req(i, "set", f"k{i}", "v"))
    with trio.fail_after(TEST_TIMEOUT):
        async with _batch_session(1 << 20) as (running, ws):
            sizes = _spy_chunks(monkeypatch, running)
            await ws.send_message(json.dumps(batch))
            answer = {r["id"]: r["result"] for r in json.loads(await ws.get_message())}
    assert len(sizes) > 1
    assert [answer[i] for i in range(1, 3000, 2)] == list(range(1, 1501))
    assert all(answer[i] == "OK" for i in range(0, 3000, 2))


async def test_a_long_batch_of_small_responses_runs_in_few_engine_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3,000 SETs in one batch: a chunk of 128, then of the window (1,024; the room left under
    the limit holds far more), so a long batch of writes costs a few engine calls (one sync
    each with appendfsync always), not 24."""
    batch = [_req(i, "set", f"k{i}", "v") for i in range(3000)]
    with trio.fail_after(TEST_TIMEOUT):
        async with _batch_session(64 << 20) as (running, ws):
            sizes = _spy_chunks(monkeypatch, running)
            await ws.send_message(json.dumps(batch))
            answer = json.loads(await ws.get_message())
    assert sorted(r["id"] for r in answer if r["result"] == "OK") == list(range(3000))
    assert sizes == [128, 1024, 1024, 824]


async def test_the_chunks_of_a_long_batch_shrink_to_the_room_left_under_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GETRANGEs of 10 KB with a 3 MiB limit: after the first 128 responses (1.3 MB) the next
    chunk is what the room left holds (~185, not the window's 1,024), then one of 128 passes
    the limit: the answer is over it by at most one first chunk."""
    limit = 3 << 20
    batch = [_req(i, "getrange", "big", "0", "-1") for i in range(2000)]
    with trio.fail_after(TEST_TIMEOUT):
        async with _batch_session(limit) as (running, ws):
            await _with_big_value(running)
            sizes = _spy_chunks(monkeypatch, running)
            await ws.send_message(json.dumps(batch))
            text = await ws.get_message()
    answer = json.loads(text)
    answered = sum("result" in r for r in answer)
    assert sizes[0] == sizes[-1] == 128
    assert len(sizes) == 3
    assert 128 < sizes[1] <= (limit - 128 * 10_000) // 10_000
    assert answered == sum(sizes)
    assert len(text.encode()) <= limit + 128 * RESPONSE + (2000 - answered) * 300


async def test_a_batch_up_to_the_window_runs_at_once_and_whole_even_over_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of up to ``pipeline_window`` requests runs in one engine call, as pipelined
    requests do, and is answered whole even when its answer is over the output limit (as a
    single GET of a value bigger than the limit is)."""
    with trio.fail_after(TEST_TIMEOUT):
        async with _batch_session(1000) as (running, ws):
            await _with_big_value(running)
            sizes = _spy_chunks(monkeypatch, running)
            await ws.send_message(json.dumps([_req(i, "get", "big") for i in range(1024)]))
            answer = {r["id"]: r.get("result") for r in json.loads(await ws.get_message())}
    assert answer == dict.fromkeys(range(1024), VALUE)
    assert sizes == [1024]


async def test_a_batch_with_a_session_method_is_cut_at_the_output_limit_too() -> None:
    """A long batch holding ``command.list`` runs its calls one by one in the reader: past
    the limit, the rest are answered TOO_LARGE (not run); a notification still runs."""
    limit = 65536
    batch = [_req(0, "command.list")]
    batch += [_req(i, "getrange", "big", "0", "-1") for i in range(1, 2000)]
    batch += [_req(2000, "set", "late", "x"), _req(None, "set", "note", "y")]
    with trio.fail_after(TEST_TIMEOUT):
        async with _batch_session(limit) as (running, ws):
            engine = await _with_big_value(running)
            await ws.send_message(json.dumps(batch))
            text = await ws.get_message()
            answer = {r["id"]: r for r in json.loads(text)}
            late = await engine.execute("get", [b"late"])
            note = await engine.execute("get", [b"note"])
    ran = [i for i in range(1, 2001) if "result" in answer[i]]
    assert ran == list(range(1, len(ran) + 1))
    assert 1 <= len(ran) <= limit // 10_000 + 1
    assert all(answer[i]["error"]["data"]["kind"] == "TOO_LARGE" for i in range(len(ran) + 1, 2001))
    assert len(text.encode()) <= limit + RESPONSE + 2000 * 300
    assert (late, note) == (None, b"y")


async def test_batches_from_a_peer_that_reads_nothing_hold_about_one_output_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight batches of 1,100 GETRANGEs of 10 KB, all read while the shards are slow, 64 KiB
    limit, a peer that reads nothing: one batch at a time builds a long response, and none
    starts a chunk past the limit.

    Was: every batch was computed whole (88 MB); with the cut alone, each
    batch would still hold up to the limit plus a chunk, eight at once.
    """
    limit = 65536
    chunk = session_module.BATCH_CHUNK
    batches = [
        client_frame(
            json.dumps([_req(b * 10_000 + i, "getrange", "big", "0", "-1") for i in range(1100)])
        )
        for b in range(8)
    ]
    with trio.fail_after(TEST_TIMEOUT):
        async with _slow_session(limit, 30) as (running, stream, session):
            engine = await _with_big_value(running)
            gate = trio.Event()
            real = engine.execute_many

            async def slow(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
                await gate.wait()
                return await real(calls)

            monkeypatch.setattr(engine, "execute_many", slow)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, b"".join(batches))
                while session.in_flight < 8 * 1100:  # all eight read (loopback may lag)
                    await trio.testing.wait_all_tasks_blocked()
                dispatched = session.in_flight
                gate.set()
                await trio.testing.wait_all_tasks_blocked()
                held = _held(session)
                nursery.cancel_scope.cancel()
            await stream.aclose()
    assert dispatched == 8 * 1100  # all read: the window counts a chunk per long batch
    assert held <= 2 * limit + (chunk + 1) * RESPONSE + 8 * 1100 * 300, f"{held} bytes held"


async def test_a_quick_request_is_not_held_back_by_long_batches_before_it() -> None:
    """Four batches of 5,000 INCRs of one key, then a PING: the PING is answered while the
    batches still run (the window counts a long batch as one chunk, not 5,000 requests)."""
    batches = [[_req(b * 10_000 + i, "incr", "n") for i in range(5000)] for b in range(4)]
    with trio.fail_after(TEST_TIMEOUT):
        async with _batch_session(64 << 20) as (running, ws):
            for batch in batches:
                await ws.send_message(json.dumps(batch))
            await ws.send_message(json.dumps(_req(-1, "ping")))
            before_ping = 0
            while True:
                answer = json.loads(await ws.get_message())
                if isinstance(answer, dict):
                    assert answer == {"jsonrpc": "2.0", "id": -1, "result": "PONG"}
                    break
                before_ping += 1
            results: list[int] = []
            for _ in range(4 - before_ping):
                results += [r["result"] for r in json.loads(await ws.get_message())]
    assert before_ping < 4
    assert len(results) == (4 - before_ping) * 5000


async def test_a_peer_that_half_closes_without_reading_is_still_dropped() -> None:
    """Batches waiting for output room, then the peer shuts its sending side and reads
    nothing: the session ends within the output timeout (it does not wait for them)."""
    batch = client_frame(json.dumps([_req(i, "getrange", "big", "0", "-1") for i in range(1100)]))
    with trio.fail_after(TEST_TIMEOUT):
        async with _slow_session(65536, 0.5) as (running, stream, session):
            await _with_big_value(running)
            await stream.send_all(batch * 3)
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_eof()
            with trio.move_on_after(3 * running.server.config.output_timeout + 2):
                await session._ended.wait()
            ended = session._ended.is_set()
            await stream.aclose()
    assert ended, "the session waits for ever for a peer that reads nothing"


# -- the setting -----------------------------------------------------------------------------


def test_the_pipeline_window_is_a_setting() -> None:
    assert resolved([]).server.pipeline_window == ServerConfig().pipeline_window
    assert resolved(["--pipeline-window", "64"]).server.pipeline_window == 64
    assert resolved([], {"KVMEMO_PIPELINE_WINDOW": "8"}).server.pipeline_window == 8


def test_a_pipeline_window_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^pipeline_window must be >= 1, got 0$"):
        resolved(["--pipeline-window", "0"])
