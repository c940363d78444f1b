"""Security of the WebSocket/HTTP port: origins, tokens, chaos methods, TLS."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url

from kvmemo.config import StoreConfig
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig

TIMEOUT = 10  # seconds


@asynccontextmanager
async def node(store: StoreConfig | None = None, **server: Any) -> AsyncIterator[Node]:
    store = store if store is not None else StoreConfig(shards=4)
    async with open_node(store, ServerConfig(port=0, resp=False, **server)) as running:
        yield running


async def call(ws: WebSocketConnection, method: str, *params: Any) -> dict[str, Any]:
    request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}
    await ws.send_message(json.dumps(request))
    response: dict[str, Any] = json.loads(await ws.get_message())
    return response


def origin_header(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"Origin", origin.encode())]


def port_of(n: Node) -> int:
    assert n.server.bound is not None
    return n.server.bound[1]


# -- origins ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "null", "http://127.0.0.1:1", "https://127.0.0.1:{port}"]
)
async def test_a_foreign_origin_is_refused_with_403(origin: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            headers = origin_header(origin.format(port=port_of(n)))
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(n.url, extra_headers=headers):
                    pass
            assert info.value.status_code == 403
            async with open_websocket_url(n.url) as ws:  # the server is fine
                assert (await call(ws, "ping"))["result"] == "PONG"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_the_servers_own_origin_is_accepted_by_default(host: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            headers = origin_header(f"http://{host}:{port_of(n)}")
            async with open_websocket_url(n.url, extra_headers=headers) as ws:
                assert (await call(ws, "ping"))["result"] == "PONG"


async def test_no_origin_is_accepted() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(allowed_origins=frozenset({"https://app.example"})) as n:
            async with open_websocket_url(n.url) as ws:
                assert (await call(ws, "ping"))["result"] == "PONG"


async def test_configured_allowed_origins_replace_the_default() -> None:
    allowed = frozenset({"https://app.example", "http://dev.example:3000"})
    with trio.fail_after(TIMEOUT):
        async with node(allowed_origins=allowed) as n:
            for origin in sorted(allowed):
                async with open_websocket_url(n.url, extra_headers=origin_header(origin)) as ws:
                    assert (await call(ws, "ping"))["result"] == "PONG"
            for origin in ("https://evil.example", f"http://127.0.0.1:{port_of(n)}"):
                with pytest.raises(ConnectionRejected) as info:
                    async with open_websocket_url(n.url, extra_headers=origin_header(origin)):
                        pass
                assert info.value.status_code == 403


# -- tokens ----------------------------------------------------------------------------------

TOKENS = frozenset({"s3cret", "other-token"})


async def test_requests_before_auth_get_noauth_and_auth_unlocks_the_session() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(tokens=TOKENS) as n:
            await check_first_session(n)
            async with open_websocket_url(n.url) as other:  # auth is per session
                assert (await call(other, "get", "k"))["error"]["code"] == -32001
                assert (await call(other, "auth", "default", "other-token"))["result"] == "OK"
                assert (await call(other, "get", "k"))["result"] == "v"


async def check_first_session(n: Node) -> None:
    async with open_websocket_url(n.url) as ws:
        for method, params in (("get", ["k"]), ("set", ["k", "v"]), ("ping", [])):
            answer = await call(ws, method, *params)
            assert answer["error"]["code"] == -32001
            assert answer["error"]["data"]["kind"] == "NOAUTH"
        wrong = await call(ws, "auth", "guess")
        assert (wrong["error"]["code"], wrong["error"]["data"]["kind"]) == (-32001, "NOAUTH")
        assert (await call(ws, "get", "k"))["error"]["code"] == -32001
        assert (await call(ws, "auth", "s3cret"))["result"] == "OK"
        assert (await call(ws, "set", "k", "v"))["result"] == "OK"
        assert (await call(ws, "get", "k"))["result"] == "v"


async def test_a_batch_is_authenticated_from_its_auth_item_on() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(tokens=TOKENS) as n, open_websocket_url(n.url) as ws:
            batch = [
                {"jsonrpc": "2.0", "id": 1, "method": "set", "params": ["k", "early"]},
                {"jsonrpc": "2.0", "id": 2, "method": "auth", "params": ["s3cret"]},
                {"jsonrpc": "2.0", "id": 3, "method": "set", "params": ["k", "late"]},
                {"jsonrpc": "2.0", "id": 4, "method": "get", "params": ["k"]},
            ]
            await ws.send_message(json.dumps(batch))
            answers = {a["id"]: a for a in json.loads(await ws.get_message())}
            assert answers[1]["error"]["data"]["kind"] == "NOAUTH"
            assert answers[2]["result"] == "OK"
            assert answers[3]["result"] == "OK"
            assert answers[4]["result"] == "late"


async def test_token_in_the_query_authenticates_the_session() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(tokens=TOKENS) as n:
            async with open_websocket_url(n.url + "?token=s3cret") as ws:
                assert (await call(ws, "set", "k", "v"))["result"] == "OK"


async def test_a_wrong_token_in_the_query_is_refused_with_403() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(tokens=TOKENS) as n:
            for query in ("?token=wrong", "?token=", "?token=s3cret%00"):
                with pytest.raises(ConnectionRejected) as info:
                    async with open_websocket_url(n.url + query):
                        pass
                assert info.value.status_code == 403, query


async def test_without_configured_tokens_no_auth_is_needed() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            async with open_websocket_url(n.url + "?token=anything") as ws:
                assert (await call(ws, "set", "k", "v"))["result"] == "OK"
                answer = await call(ws, "auth", "anything")
                assert answer["error"]["code"] == -32001  # nothing to authenticate against


# -- chaos -----------------------------------------------------------------------------------


async def test_debug_kill_is_an_unknown_method_without_chaos() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            answer = await call(ws, "debug.kill", "shard-0")
            assert (answer["error"]["code"], answer["error"]["data"]["kind"]) == (
                -32601,
                "UNKNOWN_METHOD",
            )
            assert all(a.restarts == 0 for a in n.system.actors())


async def test_debug_kill_with_chaos_restarts_the_shard_and_its_data_survives() -> None:
    store = StoreConfig(shards=2, chaos=True, restart_backoff=0.001, restart_backoff_max=0.001)
    with trio.fail_after(TIMEOUT):
        async with node(store) as n, open_websocket_url(n.url) as ws:
            keys = [f"key:{i}" for i in range(40)]
            for key in keys:
                assert (await call(ws, "set", key, key.upper()))["result"] == "OK"
            assert (await call(ws, "debug.kill", "shard-0"))["result"] == "OK"
            while True:
                actors = {a["name"]: a for a in (await call(ws, "debug.actors"))["result"]}
                if actors["shard-0"]["restarts"] >= 1 and actors["shard-0"]["state"] == "running":
                    break
                await trio.sleep(0.005)
            answer = await call(ws, "mget", *keys)
            assert answer["result"] == [key.upper() for key in keys]
            unknown = await call(ws, "debug.kill", "no-such-actor")
            assert unknown["error"]["code"] == -32602


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str, ssl.SSLContext]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return str(cert_path), str(key_path), client


async def test_wss_and_https_with_a_certificate(tls_files: tuple[str, str, ssl.SSLContext]) -> None:
    cert, key, client = tls_files
    with trio.fail_after(TIMEOUT):
        async with node(tls_cert=cert, tls_key=key) as n:
            assert n.url.startswith("wss://127.0.0.1:")
            async with open_websocket_url(n.url, ssl_context=client) as ws:
                assert (await call(ws, "set", "k", "v"))["result"] == "OK"
                assert (await call(ws, "get", "k"))["result"] == "v"
            own = origin_header(f"https://127.0.0.1:{port_of(n)}")
            async with open_websocket_url(n.url, ssl_context=client, extra_headers=own) as ws:
                assert (await call(ws, "ping"))["result"] == "PONG"
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", port_of(n), ssl_context=client, https_compatible=True
            )
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
            await stream.aclose()
            assert data.startswith(b"HTTP/1.1 200 ")
            assert json.loads(data.partition(b"\r\n\r\n")[2])["status"] == "ok"


async def test_plaintext_on_a_tls_port_fails_and_the_server_survives(
    tls_files: tuple[str, str, ssl.SSLContext],
) -> None:
    cert, key, client = tls_files
    with trio.fail_after(TIMEOUT):
        async with node(tls_cert=cert, tls_key=key) as n:
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(n))
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                data = await stream.receive_some(4096)
            except trio.BrokenResourceError:
                data = b""
            assert not data.startswith(b"HTTP/1.1 200")
            await stream.aclose()
            async with open_websocket_url(n.url, ssl_context=client) as ws:
                assert (await call(ws, "ping"))["result"] == "PONG"
