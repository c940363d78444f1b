"""A front-end developer's audit of the browser side: the JS client, the console, the wire.

Each test plays someone building a page on KVMemo from the README, docs/protocol.md
and examples/browser/ alone, in a real headless Chromium (Debian's ``chromium``,
driven as tests/test_browser.py drives it) against ``kvmemo serve`` in a
subprocess, or on the raw WebSocket against an in-process node. Each names the
defect it was written for; it failed before the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import trio
from trio_websocket import open_websocket_url

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from playwright.sync_api import Browser, Page, expect
from test_browser import (  # noqa: F401 - browser, page, page_errors, playwright: fixtures
    SPY_WEBSOCKET,
    PageErrors,
    _SubprocessServer,
    browser,
    page,
    page_errors,
    playwright,
    run_command,
    serve_page,
)

from kvmemo.config import StoreConfig
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig

MAX_BATCH = 5  # the servers' --max-batch here: small, so that a page goes over it
TEST_TIMEOUT = 20  # seconds for an in-process test
BLANK_HTML = '<!doctype html><link rel="icon" href="data:,"><title>blank</title>'


class _Server:
    """``kvmemo serve --max-batch 5`` in a subprocess, with the addresses a page needs."""

    def __init__(self) -> None:
        self._impl = _SubprocessServer(0, ("--max-batch", str(MAX_BATCH)))
        self.url = self._impl.url
        self.port = self._impl.port
        self.http = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._impl.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    kv = _Server()
    try:
        yield kv
    finally:
        kv.stop()


def blank_page(page: Page, server: _Server) -> None:  # noqa: F811
    """A blank page of the server's origin, with the WebSocket spy of test_browser."""
    serve_page(page, server, "/blank.html", BLANK_HTML)  # type: ignore[arg-type]
    page.evaluate(SPY_WEBSOCKET)


# ---- whole-message errors: a batch over the server's limit -------------------------------


def test_a_batch_over_the_limit_is_refused_while_another_batch_awaits_its_replies(
    server: _Server,
    page: Page,  # noqa: F811
    page_errors: PageErrors,  # noqa: F811
) -> None:
    # Was: the server answers a batch over --max-batch with one error whose id is
    # null; the client gave it to "the only message without replies" and, with two
    # (here the 8 and 2 calls of one busy turn split by maxBatch; also any pipelined
    # turn), only fired an "error" event: the 8 calls of the refused batch never
    # settled. Now the error says the batch's length (data.length) and the client
    # rejects exactly those calls with TOO_LARGE.
    blank_page(page, server)
    out = page.evaluate(
        """async () => {
          const {KVMemoClient} = await import("/static/kvmemo.js");
          const kv = await KVMemoClient.connect("/ws", {WebSocketImpl: SpyWebSocket, maxBatch: 8});
          const events = [];
          kv.addEventListener("error", (ev) => events.push(ev.detail.error.message));
          const before = window.__sent.length;
          const calls = [];
          for (let i = 0; i < 10; i++) {
            calls.push(kv.get(`over:${i}`).then(
              (value) => ({value}), (e) => ({kind: e.kind, code: e.code, data: e.data})));
          }
          const hang = new Promise((resolve) => setTimeout(() => resolve("hang"), 5000));
          const outcome = await Promise.race([Promise.all(calls), hang]);
          const sizes = window.__sent.slice(before).map((m) => JSON.parse(m.data).length ?? 1);
          const after = await kv.ping();
          await kv.close();
          return {outcome, sizes, events, after};
        }"""
    )
    assert out["sizes"] == [8, 2]
    assert out["outcome"] != "hang", out["events"]
    refused = {
        "kind": "TOO_LARGE",
        "code": -32004,
        "data": {"kind": "TOO_LARGE", "length": 8, "limit": MAX_BATCH},
    }
    assert out["outcome"] == [refused] * 8 + [{"value": None}] * 2
    assert out["events"] == []
    assert out["after"] == "PONG"


async def test_the_error_for_a_batch_over_the_limit_says_its_length_and_the_limit() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, resp=False, max_batch=MAX_BATCH)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(StoreConfig(shards=2), config) as node:
            await _check_batch_over_limit(node)


async def _check_batch_over_limit(node: Node) -> None:
    batch = [{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(MAX_BATCH + 2)]
    async with open_websocket_url(node.url) as ws:
        await ws.send_message(json.dumps(batch))
        answer = json.loads(await ws.get_message())
        assert answer == {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": -32004,
                "message": f"batch of {MAX_BATCH + 2} requests is over the limit of {MAX_BATCH}",
                "data": {"kind": "TOO_LARGE", "length": MAX_BATCH + 2, "limit": MAX_BATCH},
            },
        }
        await ws.send_message(json.dumps(batch[:MAX_BATCH]))  # the session goes on
        assert len(json.loads(await ws.get_message())) == MAX_BATCH


# ---- params that JSON cannot carry -------------------------------------------------------


def test_call_and_notify_refuse_params_json_cannot_carry_before_sending(
    server: _Server,
    page: Page,  # noqa: F811
    page_errors: PageErrors,  # noqa: F811
) -> None:
    # Was: kv.call("get", NaN) (or Infinity, undefined, a function) went out as
    # null and came back as the server's "params[0] ... got null", naming a value
    # the page never passed; kv.notify("set", "k", NaN) was sent, refused by the
    # server and, being a notification, silently never ran; kv.call("incrby", "n",
    # 5n) failed with "Do not know how to serialize a BigInt" though incrby(n, 5n)
    # works; kv.ping({}) threw synchronously while every other helper rejects.
    blank_page(page, server)
    out = page.evaluate(
        """async () => {
          const {KVMemoClient} = await import("/static/kvmemo.js");
          const kv = await KVMemoClient.connect("/ws", {WebSocketImpl: SpyWebSocket});
          const outcome = (p) => p.then(
            (value) => ({value}), (e) => ({name: e.name, message: e.message}));
          await kv.set("audit:n", "1");
          const before = window.__sent.length;
          const refused = await Promise.all([
            outcome(kv.call("get", NaN)),
            outcome(kv.call("expire", "audit:n", Infinity)),
            outcome(kv.call("get", undefined)),
            outcome(kv.call("get", null)),
            outcome(kv.call("set", "audit:n", () => 1)),
            outcome(kv.call("set", "audit:n", true)),
            outcome(kv.call("get", {key: "audit:n"})),
          ]);
          let notified;
          try { kv.notify("set", "audit:n", NaN); notified = "sent"; }
          catch (e) { notified = {name: e.name, message: e.message}; }
          let ping;
          try { ping = kv.ping({}); } catch (e) { ping = "threw"; }
          const pingOutcome = ping === "threw" ? ping : await outcome(ping);
          await Promise.resolve();
          const sentBad = window.__sent.length - before;
          const bigint = await outcome(kv.call("incrby", "audit:n", 5n));
          const value = await kv.get("audit:n");
          await kv.del("audit:n");
          await kv.close();
          return {refused, notified, pingOutcome, sentBad, bigint, value};
        }"""
    )
    for entry, got in zip(
        out["refused"],
        ["NaN", "Infinity", "undefined", "null", "function", "boolean", "object"],
        strict=True,
    ):
        assert entry["name"] == "TypeError", entry
        assert re.search(
            rf"param \d must be a string or a finite number, got {got}$", entry["message"]
        )
    assert out["notified"] == {
        "name": "TypeError",
        "message": "'set': param 2 must be a string or a finite number, got NaN",
    }
    assert out["pingOutcome"]["name"] == "TypeError"
    assert out["sentBad"] == 0  # none of them left the page
    assert out["bigint"] == {"value": 6}
    assert out["value"] == "6"


# ---- the web console ---------------------------------------------------------------------

# Installed before the console's module runs: every socket it opens is kept.
SOCKET_SPY = """
window.__sockets = [];
window.WebSocket = class extends window.WebSocket {
  constructor(...args) { super(...args); window.__sockets.push(this); }
};
"""


def test_console_subscriptions_survive_a_reconnection(
    server: _Server,
    page: Page,  # noqa: F811
    page_errors: PageErrors,  # noqa: F811
) -> None:
    # Was: SUBSCRIBE typed in the console went out as a bare call: after a lost
    # connection the new session was subscribed to nothing, and the messages the
    # README says the console shows stopped, silently. Now the console subscribes
    # through the client, which subscribes again after reconnecting.
    page.add_init_script(SOCKET_SPY)
    page.goto(f"{server.http}/")
    expect(page.locator("#status")).to_have_text("connected")
    expect(run_command(page, "SUBSCRIBE audit-news").locator(".entry-result")).to_contain_text(
        "audit-news"
    )
    run_command(page, "PSUBSCRIBE audit-p*")
    page.evaluate("window.__sockets[0].close(4000, 'test: lost connection')")
    page.wait_for_function("window.__sockets.length === 2 && window.__sockets[1].readyState === 1")
    expect(page.locator("#status")).to_have_text("connected")
    entry = run_command(page, 'PUBLISH audit-news "after the reconnection"')
    expect(entry.locator(".entry-result")).to_have_text("1")
    expect(run_command(page, "PUBLISH audit-pub x").locator(".entry-result")).to_have_text("1")
    pushes = page.locator("#output .push")
    expect(pushes.nth(0).locator(".push-head")).to_have_text("« message audit-news")
    expect(pushes.nth(0).locator(".push-data")).to_have_text("after the reconnection")
    expect(pushes.nth(1).locator(".push-head")).to_have_text("« pmessage audit-p* audit-pub")
    # UNSUBSCRIBE there is forgotten too: the next reconnection does not bring it back.
    run_command(page, "UNSUBSCRIBE")
    run_command(page, "PUNSUBSCRIBE")
    page.evaluate("window.__sockets[1].close(4000, 'test: lost connection')")
    page.wait_for_function("window.__sockets.length === 3 && window.__sockets[2].readyState === 1")
    expect(page.locator("#status")).to_have_text("connected")
    expect(run_command(page, "PUBLISH audit-news again").locator(".entry-result")).to_have_text("0")


# ---- a helper for every command of version 1 ---------------------------------------------

V1_HELPERS = [
    # Every method of docs/protocol.md's "Commands of version 1" but debug.*.
    "ping", "get", "set", "getdel", "getex", "del", "exists", "expire", "pexpire", "expireat",
    "pexpireat", "ttl", "pttl", "persist", "incr", "decr", "incrby", "decrby", "append",
    "strlen", "mget", "mset", "msetnx", "type", "dbsize", "scan", "keys", "flushall", "info",
    "auth", "save",
]  # fmt: skip


def test_the_client_has_a_helper_for_every_command_of_version_1(
    server: _Server,
    page: Page,  # noqa: F811
    page_errors: PageErrors,  # noqa: F811
) -> None:
    # Was: the module says it speaks version 1, but getdel, getex, expireat,
    # pexpireat, decrby, append, strlen, msetnx, type, keys, flushall and save
    # had no method: kv.getdel(k) was "kv.getdel is not a function".
    blank_page(page, server)
    out = page.evaluate(
        """async (names) => {
          const {KVMemoClient} = await import("/static/kvmemo.js");
          const kv = await KVMemoClient.connect("/ws");
          const missing = names.filter((name) => typeof kv[name] !== "function");
          if (missing.length) { await kv.close(); return {missing}; }
          const soon = Math.floor(Date.now() / 1000) + 100;
          const results = {
            msetnx: await kv.msetnx({"h:a": "é", "h:b": "2"}),
            msetnxAgain: await kv.msetnx("h:a", "x", "h:c", "3"),
            append: await kv.append("h:a", "ü"),
            strlen: await kv.strlen("h:a"),
            type: await kv.type("h:a"),
            keys: (await kv.keys("h:*")).sort(),
            decrby: await kv.decrby("h:b", 5),
            getex: await kv.getex("h:b", {ex: 100}),
            ttl: [99, 100].includes(await kv.ttl("h:b")),
            getexPersist: await kv.getex("h:b", "PERSIST"),
            ttlAfter: await kv.ttl("h:b"),
            expireat: await kv.expireat("h:b", soon),
            pexpireat: await kv.pexpireat("h:a", Date.now() + 100000, "NX"),
            getdel: await kv.getdel("h:a"),
            gone: await kv.exists("h:a"),
            save: await kv.save().catch((e) => e.kind),
            getexBad: await kv.getex("h:b", {ttl: 1}).catch((e) => e.name),
            flushall: await kv.flushall(),
            dbsize: await kv.dbsize(),
          };
          await kv.close();
          return {missing, results};
        }""",
        V1_HELPERS,
    )
    assert out["missing"] == []
    assert out["results"] == {
        "msetnx": 1,
        "msetnxAgain": 0,
        "append": 4,  # bytes: "é" and "ü" are two each in UTF-8
        "strlen": 4,
        "type": "string",
        "keys": ["h:a", "h:b"],
        "decrby": -3,
        "getex": "-3",
        "ttl": True,
        "getexPersist": "-3",
        "ttlAfter": -1,
        "expireat": 1,
        "pexpireat": 1,
        "getdel": "éü",
        "gone": 0,
        "save": "DISABLED",
        "getexBad": "TypeError",
        "flushall": "OK",
        "dbsize": 0,
    }


# ---- giving up -----------------------------------------------------------------------------


def test_backoff_max_attempts_ends_a_connect_that_can_never_succeed(
    server: _Server,
    page: Page,  # noqa: F811
    page_errors: PageErrors,  # noqa: F811
) -> None:
    # Was: a page cannot see why a handshake failed (a wrong path, a refused
    # origin or URL token: all close code 1006 in a browser), and the client
    # retried forever: `await KVMemoClient.connect(...)` never settled and calls
    # made meanwhile waited for ever. Now backoff.maxAttempts ends it.
    page_errors.allowed.append(re.compile(r"WebSocket connection to .* failed"))
    blank_page(page, server)
    out = page.evaluate(
        """async () => {
          const {KVMemoClient} = await import("/static/kvmemo.js");
          const kv = new KVMemoClient("/no-such-path", {
            WebSocketImpl: SpyWebSocket, backoff: {initialMs: 10, maxMs: 20, maxAttempts: 2}});
          const closes = [];
          kv.addEventListener("close", (ev) => closes.push(ev.detail.willReconnect));
          const waiting = kv.get("k").then(() => "sent", (e) => e.kind);
          const hang = new Promise((resolve) => setTimeout(() => resolve("hang"), 5000));
          const ready = await Promise.race([
            kv.ready.then(() => "ready", (e) => ({kind: e.kind, message: e.message})), hang]);
          let bad;
          try { new KVMemoClient("/ws", {backoff: {maxAttempts: 0}}); } catch (e) { bad = e.name; }
          const state = kv.state;
          await kv.close();
          return {ready, waiting: await waiting, state, sockets: window.__sockets.length,
                  closes, bad};
        }"""
    )
    assert out["ready"] != "hang"
    assert out["ready"]["kind"] == "DISCONNECTED"
    assert "gave up connecting" in out["ready"]["message"]
    assert out["waiting"] == "DISCONNECTED"
    assert out["state"] == "closed"
    assert out["sockets"] == 3  # the first, then two attempts
    assert out["closes"] == [True, True, False]
    assert out["bad"] == "RangeError"


# ---- pub/sub across a reconnection -----------------------------------------------------------


def test_after_a_reconnection_subscriptions_come_back_before_the_calls_that_waited(
    server: _Server,
    page: Page,  # noqa: F811
    page_errors: PageErrors,  # noqa: F811
) -> None:
    # Was: the client subscribed again after the calls made while it was
    # disconnected: a publish made then on a channel the page listens to went
    # first, reached nobody (0) and the page never heard its own message.
    blank_page(page, server)
    out = page.evaluate(
        """async () => {
          const {KVMemoClient} = await import("/static/kvmemo.js");
          const kv = await KVMemoClient.connect("/ws", {
            WebSocketImpl: SpyWebSocket, backoff: {initialMs: 20, maxMs: 50}});
          let heard;
          const message = new Promise((resolve) => (heard = resolve));
          await kv.subscribe("audit-rc", (data, channel) => heard([channel, data]));
          const once = (type) => new Promise((res) => kv.addEventListener(type, res, {once: true}));
          const reopened = once("open");
          window.__sockets[0].close(4000, "test: lost connection");
          await once("close");
          const state = kv.state;
          const published = kv.publish("audit-rc", "sent while away");
          await reopened;
          const hang = new Promise((resolve) => setTimeout(() => resolve("hang"), 5000));
          const got = await Promise.race([message, hang]);
          const result = {state, published: await published, got};
          await kv.close();
          return result;
        }"""
    )
    assert out == {
        "state": "reconnecting",
        "published": 1,
        "got": ["audit-rc", "sent while away"],
    }


def test_console_keeps_no_auth_line_in_its_history(
    server: _Server,
    page: Page,  # noqa: F811
    page_errors: PageErrors,  # noqa: F811
) -> None:
    # Was: every line typed went to the history in localStorage, which outlives
    # the page and the session: `AUTH <token>` left the token there for anyone
    # at that browser (redis-cli keeps no AUTH in its history file).
    page.goto(f"{server.http}/")
    expect(page.locator("#status")).to_have_text("connected")
    run_command(page, "PING before")
    entry = run_command(page, "AUTH not-a-real-token")
    expect(entry).to_have_class(re.compile(r"\berror\b"))  # this server has no tokens
    run_command(page, ' auth "unterminated')
    run_command(page, "PING after")
    saved = json.loads(page.evaluate("localStorage.getItem('kvmemo.console.history')"))
    assert saved[-2:] == ["PING before", "PING after"]
    assert not [line for line in saved if "auth" in line.lower()]
    page.press("#command-input", "ArrowUp")
    page.press("#command-input", "ArrowUp")
    expect(page.locator("#command-input")).to_have_value("PING before")


def test_a_turn_of_more_calls_than_the_default_batch_limit_succeeds(
    browser: Browser,  # noqa: F811
) -> None:
    # Was: the client sent every call of a turn as ONE batch (maxBatch defaulted
    # to Infinity) while the server refuses a batch over 10,000 requests by
    # default: `Promise.all(keys.map((k) => kv.get(k)))` over 10,001 keys failed
    # whole with TOO_LARGE. Now the client's default is the server's.
    kv = _SubprocessServer(0)  # the server's default limits
    http = f"http://127.0.0.1:{kv.port}"
    context = browser.new_context(service_workers="block")
    try:
        page = context.new_page()
        serve_page(page, _Origin(http), "/blank.html", BLANK_HTML)  # type: ignore[arg-type]
        page.evaluate(SPY_WEBSOCKET)
        out = page.evaluate(
            """async () => {
              const {KVMemoClient} = await import("/static/kvmemo.js");
              const kv = await KVMemoClient.connect("/ws", {WebSocketImpl: SpyWebSocket});
              const before = window.__sent.length;
              const calls = [];
              for (let i = 0; i < 10005; i++) calls.push(kv.ping(`${i}`).catch((e) => e.kind));
              const results = await Promise.all(calls);
              const sizes = window.__sent.slice(before).map((m) => JSON.parse(m.data).length ?? 1);
              await kv.close();
              return {sizes, wrong: results.filter((r, i) => r !== `${i}`).slice(0, 3)};
            }"""
        )
    finally:
        context.close()
        kv.stop()
    assert out == {"sizes": [10000, 5], "wrong": []}


class _Origin:
    """What serve_page needs of a server: its HTTP origin."""

    def __init__(self, http: str) -> None:
        self.http = http


# ---- authentication across a reconnection ----------------------------------------------------


@pytest.fixture(scope="module")
def token_server() -> Iterator[_Origin]:
    kv = _SubprocessServer(0, ("--auth-token", "s3cret"))
    try:
        yield _Origin(f"http://127.0.0.1:{kv.port}")
    finally:
        kv.stop()


def test_a_session_authenticated_with_auth_stays_so_after_a_reconnection(
    token_server: _Origin,
    page: Page,  # noqa: F811
    page_errors: PageErrors,  # noqa: F811
) -> None:
    # Was: kv.auth(token) authenticated that socket only; the client reconnects
    # by itself, and after it every call failed NOAUTH. Now the accepted token is
    # sent first on every later connection, as the `token` option's is.
    serve_page(page, token_server, "/blank.html", BLANK_HTML)  # type: ignore[arg-type]
    page.evaluate(SPY_WEBSOCKET)
    out = page.evaluate(
        """async () => {
          const {KVMemoClient} = await import("/static/kvmemo.js");
          const kv = await KVMemoClient.connect("/ws", {
            WebSocketImpl: SpyWebSocket, backoff: {initialMs: 20, maxMs: 50}});
          const kind = (p) => p.then((value) => ({value}), (e) => ({kind: e.kind}));
          const before = await kind(kv.get("auth:k"));
          const wrong = await kind(kv.auth("nope"));
          const auth = await kv.auth("s3cret");
          await kv.set("auth:k", "v");
          const reopened = new Promise((res) => kv.addEventListener("open", res, {once: true}));
          window.__sockets[0].close(4000, "test: lost connection");
          await reopened;
          const after = await kind(kv.get("auth:k"));
          const first = JSON.parse(window.__sent.find((m) => m.socket === 1).data);
          await kv.del("auth:k");
          await kv.close();
          return {before, wrong, auth, after, first: [first.method, first.params]};
        }"""
    )
    assert out == {
        "before": {"kind": "NOAUTH"},
        "wrong": {"kind": "NOAUTH"},
        "auth": "OK",
        "after": {"value": "v"},
        "first": ["auth", ["s3cret"]],
    }


def test_console_auth_lasts_across_a_reconnection(
    token_server: _Origin,
    page: Page,  # noqa: F811
    page_errors: PageErrors,  # noqa: F811
) -> None:
    # Was: AUTH typed in the console authenticated one socket: after a lost
    # connection every command (and the metrics) got NOAUTH again.
    page.add_init_script(SOCKET_SPY)
    page.goto(f"{token_server.http}/")
    expect(page.locator("#status")).to_have_text("connected")
    expect(run_command(page, "AUTH s3cret").locator(".entry-result")).to_have_text('"OK"')
    expect(run_command(page, "SET auth:console v").locator(".entry-result")).to_have_text('"OK"')
    page.evaluate("window.__sockets[0].close(4000, 'test: lost connection')")
    page.wait_for_function("window.__sockets.length === 2 && window.__sockets[1].readyState === 1")
    expect(page.locator("#status")).to_have_text("connected")
    expect(run_command(page, "GET auth:console").locator(".entry-result")).to_have_text('"v"')
    run_command(page, "DEL auth:console")
