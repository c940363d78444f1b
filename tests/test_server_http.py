"""Plain HTTP on the WebSocket port: /healthz, /metrics, the console, static files."""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import open_websocket_url

from actors import ActorState, EventKind
from kvmemo.config import StoreConfig
from kvmemo.engine.engine import EVICTION_MANAGER, EVICTION_SUPERVISOR
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig

TIMEOUT = 10  # seconds


@asynccontextmanager
async def node(store: StoreConfig | None = None, **server: Any) -> AsyncIterator[Node]:
    store = store if store is not None else StoreConfig(shards=4)
    async with open_node(store, ServerConfig(port=0, resp=False, **server)) as running:
        yield running


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(n: Node, path: str, method: str = "GET", extra: str = "") -> Reply:
    """One raw HTTP/1.1 request; the server closes the connection after its answer."""
    assert n.server.bound is not None
    host, port = n.server.bound
    stream = await trio.open_tcp_stream(host, port)
    request = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n"
    await stream.send_all(request.encode("latin-1"))
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body) or method == "HEAD"
    return Reply(int(status_line.split()[1]), headers, body)


# -- /healthz --------------------------------------------------------------------------------


async def test_healthz_is_200_json_when_every_actor_runs() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            reply = await fetch(n, "/healthz")
            assert reply.status == 200
            assert reply.headers["content-type"].startswith("application/json")
            body = reply.json()
            assert body["status"] == "ok"
            assert body["down"] == []
            assert body["actors"] == len(n.system.actors())


async def test_healthz_is_503_naming_the_actor_whose_supervisor_gave_up() -> None:
    store = StoreConfig(shards=2, restart_backoff=0.001, restart_backoff_max=0.001)
    with trio.fail_after(TIMEOUT):
        async with node(store) as n:
            # Kill eviction-manager until its supervisor (5 restarts in 10 s) gives up.
            # (Polled: leaving an EventLog subscription can race with an emit.)
            while not n.system.events.count(EVICTION_SUPERVISOR, EventKind.GAVE_UP):
                if n.system.state(EVICTION_MANAGER) is ActorState.RUNNING:
                    n.system.kill(EVICTION_MANAGER)
                await trio.sleep(0.001)
            reply = await fetch(n, "/healthz")
            assert reply.status == 503
            body = reply.json()
            assert body["status"] != "ok"
            assert EVICTION_MANAGER in body["down"]
            assert "shard-0" not in body["down"]
            # The node keeps serving without its eviction subtree.
            async with open_websocket_url(n.url) as ws:
                await ws.send_message('{"jsonrpc":"2.0","id":1,"method":"set","params":["k","v"]}')
                assert json.loads(await ws.get_message())["result"] == "OK"


# -- /metrics --------------------------------------------------------------------------------

METRIC = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(
    rf"^(?P<name>{METRIC})(?:\{{(?P<labels>(?:{LABEL})(?:,{LABEL})*)?,?\}})?"
    r" (?P<value>[^ ]+)(?: -?\d+)?$"
)
COMMENT = re.compile(rf"^# (?P<kind>HELP|TYPE) (?P<name>{METRIC})(?: (?P<rest>.*))?$")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_prometheus(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """Check the text exposition format line by line; the types and the samples."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line:
            continue
        comment = COMMENT.match(line)
        if comment:
            name = comment["name"]
            if comment["kind"] == "TYPE":
                assert name not in types, f"second TYPE for {name}"
                assert comment["rest"] in TYPES, line
                assert not any(s[0] == name or s[0].startswith(name + "_") for s in samples), (
                    f"TYPE of {name} after its samples"
                )
                types[name] = comment["rest"]
            else:
                assert name not in helps, f"second HELP for {name}"
                helps.add(name)
            continue
        assert not line.startswith("#"), line
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels = dict(
            re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match["labels"] or "")
        )
        value = float(match["value"])  # also +Inf, -Inf, NaN
        name = match["name"]
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or (family in types and types[family] in ("histogram", "summary")), (
            f"sample {name} without a TYPE"
        )
        samples.append((name, labels, value))
    return types, samples


async def scrape(n: Node) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    reply = await fetch(n, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_prometheus(reply.body.decode("utf-8"))


def value_of(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def set_buckets(samples: list[tuple[str, dict[str, str], float]]) -> list[tuple[float, float]]:
    return [
        (float(lab["le"]), v)
        for name, lab, v in samples
        if name == "kvmemo_command_duration_seconds_bucket" and lab.get("command") == "set"
    ]


async def restarted(n: Node, name: str) -> None:
    """Wait until ``name`` was restarted (polled; see the healthz test)."""
    while True:
        if n.system.events.count(name, EventKind.RESTARTED):
            return
        await trio.sleep(0.001)


async def set_over_websocket(n: Node, count: int) -> None:
    async with open_websocket_url(n.url) as ws:
        for i in range(count):
            request = {"jsonrpc": "2.0", "id": i, "method": "set", "params": [f"k{i}", "v"]}
            await ws.send_message(json.dumps(request))
            assert json.loads(await ws.get_message())["result"] == "OK"


async def test_metrics_is_valid_prometheus_text_with_the_promised_families() -> None:
    store = StoreConfig(shards=2, restart_backoff=0.001, restart_backoff_max=0.001)
    with trio.fail_after(TIMEOUT):
        async with node(store) as n:
            await set_over_websocket(n, 3)
            for i in range(5):
                await n.engine.execute("set", [f"e{i}".encode(), b"v"])
            assert n.system.kill("shard-1")
            await restarted(n, "shard-1")
            types, samples = await scrape(n)
    assert types["kvmemo_command_duration_seconds"] == "histogram"
    assert types["kvmemo_memory_used_bytes"] == "gauge"
    assert types["kvmemo_actor_mailbox_depth"] == "gauge"
    assert types["kvmemo_actor_restarts_total"] == "counter"
    assert "kvmemo_ws_sessions" in types
    buckets = set_buckets(samples)
    assert buckets[-1][0] == math.inf
    assert [le for le, _ in buckets] == sorted(le for le, _ in buckets)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:], strict=False))
    count = value_of(samples, "kvmemo_command_duration_seconds_count", command="set")
    assert buckets[-1][1] == count >= 5
    assert value_of(samples, "kvmemo_command_duration_seconds_sum", command="set") > 0
    assert value_of(samples, "kvmemo_memory_used_bytes") > 0
    assert value_of(samples, "kvmemo_actor_mailbox_depth", actor="shard-0") >= 0
    assert value_of(samples, "kvmemo_actor_restarts_total", actor="shard-1") == 1
    assert value_of(samples, "kvmemo_actor_restarts_total", actor="shard-0") == 0
    assert value_of(samples, "kvmemo_ws_messages_received_total") == 3


async def test_websocket_commands_are_counted_in_the_latency_histogram() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            await set_over_websocket(n, 4)
            _, samples = await scrape(n)
    assert value_of(samples, "kvmemo_command_duration_seconds_count", command="set") == 4


# -- the console and static files ------------------------------------------------------------


async def test_root_serves_the_console_html() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            reply = await fetch(n, "/")
            assert reply.status == 200
            assert reply.headers["content-type"].startswith("text/html")
            assert b"<html" in reply.body.lower()
            head = await fetch(n, "/", method="HEAD")
            assert head.status == 200
            assert head.body == b""
            assert int(head.headers["content-length"]) == len(reply.body)


@pytest.mark.parametrize(
    ("name", "ctype"), [("kvmemo.js", "text/javascript"), ("console.css", "text/css")]
)
async def test_static_files_are_served_with_their_content_type(name: str, ctype: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            reply = await fetch(n, f"/static/{name}")
            assert reply.status == 200
            assert reply.headers["content-type"].startswith(ctype)
            assert reply.headers["x-content-type-options"] == "nosniff"
            assert len(reply.body) > 100


async def test_metrics_need_a_token_when_the_server_has_tokens_and_healthz_does_not() -> None:
    # Was: /metrics answered anyone although sessions had to auth first.
    with trio.fail_after(TIMEOUT):
        async with node(tokens=frozenset({"s3cret"})) as n:
            refused = await fetch(n, "/metrics")
            assert refused.status == 401
            assert refused.headers["www-authenticate"] == 'Bearer realm="kvmemo"'
            assert b"kvmemo_" not in refused.body
            wrong = await fetch(n, "/metrics", extra="Authorization: Bearer nope\r\n")
            assert wrong.status == 401
            bearer = await fetch(n, "/metrics", extra="Authorization: Bearer s3cret\r\n")
            assert bearer.status == 200
            assert b"kvmemo_" in bearer.body
            assert (await fetch(n, "/metrics?token=s3cret")).status == 200
            assert (await fetch(n, "/healthz")).status == 200
        async with node() as open_node_:
            assert (await fetch(open_node_, "/metrics")).status == 200


async def test_the_client_module_is_importable_from_an_allowed_origin_only() -> None:
    # A cross-origin <script type="module"> needs CORS: the origins that may
    # open /ws may import /static/kvmemo.js too (examples/browser/README.md).
    page = "http://127.0.0.1:8000"
    with trio.fail_after(TIMEOUT):
        async with node(allowed_origins=frozenset({page})) as n:
            allowed = await fetch(n, "/static/kvmemo.js", extra=f"Origin: {page}\r\n")
            assert allowed.status == 200
            assert allowed.headers["access-control-allow-origin"] == page
            assert allowed.headers["vary"] == "Origin"
            other = await fetch(n, "/static/kvmemo.js", extra="Origin: http://evil.test\r\n")
            assert other.status == 200  # served, but a browser will not let that page use it
            assert "access-control-allow-origin" not in other.headers
            plain = await fetch(n, "/static/kvmemo.js")
            assert "access-control-allow-origin" not in plain.headers
            missing = await fetch(n, "/static/nope.js", extra=f"Origin: {page}\r\n")
            assert missing.status == 404
            assert "access-control-allow-origin" not in missing.headers


@pytest.mark.parametrize(
    "path", ["/nope", "/static/", "/static/nope.js", "/healthz/x", "/metricsx"]
)
async def test_unknown_paths_are_404(path: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            assert (await fetch(n, path)).status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py",
        "/static/../../pyproject.toml",
        "/static/..%2fapp.py",
        "/static/%2e%2e/app.py",
        "/static//etc/passwd",
        "/static/./kvmemo.js/../../config.py",
        "/static/..\\app.py",
    ],
)
async def test_no_path_traversal_out_of_static(path: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            reply = await fetch(n, path)
            assert reply.status in (400, 404)
            assert b"import" not in reply.body


async def test_other_methods_are_405_and_a_garbled_head_is_400() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            assert (
                await fetch(n, "/healthz", method="POST", extra="Content-Length: 0\r\n")
            ).status == 405
            assert (await fetch(n, "/ws")).status == 426
            assert n.server.bound is not None
            stream = await trio.open_tcp_stream(*n.server.bound)
            await stream.send_all(b"\x00\x01 nonsense\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
            assert data.startswith(b"HTTP/1.1 400 ")


async def test_a_request_head_over_the_limit_is_431() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(max_http_head=1024) as n:
            reply = await fetch(n, "/healthz", extra="X-Big: " + "a" * 5000 + "\r\n")
            assert reply.status == 431
