"""End to end in a real headless Chromium: the web console and the ES module client.

A real KVMemo server runs in a subprocess (``python -m kvmemo serve --port 0``;
when the command line cannot start one, the same node runs in-process in a
background thread). Debian's ``chromium`` is driven by Playwright's sync API
with ``executable_path``; Playwright's own browser downloads are never used.
Every assertion reads what the page shows (DOM text and classes) or what the
client module returns; no screenshots.

The module is skipped when the ``playwright`` package or a ``chromium`` on PATH
is missing, so a developer without them still gets a green suite.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian package 'chromium')", allow_module_level=True)

from playwright.sync_api import (  # noqa: E402
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_HTML = ROOT / "examples" / "browser" / "example.html"

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT = 20.0  # seconds for a server to print its address
STOP_TIMEOUT = 10.0  # seconds for a server to exit after SIGTERM (then SIGKILL)
UI_TIMEOUT_MS = 10_000  # what a page may take to show something
LISTENING = re.compile(r"KVMemo listening on (ws://127\.0\.0\.1:(\d+)/ws)")


# ---- the server ----------------------------------------------------------------------


class _SubprocessServer:
    """``python -m kvmemo serve`` in a child process."""

    def __init__(self, port: int, extra_args: tuple[str, ...] = ()) -> None:
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvmemo",
                "serve",
                "--port",
                str(port),
                "--no-resp",
                "--shards",
                "4",
                "--log-level",
                "warning",
                *extra_args,
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            line = None
        match = LISTENING.search(line or "")
        if match is None:
            stderr = self.stderr_tail()
            self.stop()
            raise RuntimeError(f"`kvmemo serve` did not start (first line {line!r}):\n{stderr}")
        self.url = match.group(1)
        self.port = int(match.group(2))

    def _pump(self, lines: queue.Queue[str | None]) -> None:
        # Hands over every stdout line (so the pipe never fills) and None at EOF.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            lines.put(line)
        lines.put(None)

    def stderr_tail(self, limit: int = 4000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-limit:]

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=STOP_TIMEOUT)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()


class _ThreadServer:
    """The same node run in-process: ``open_node`` under ``trio.run`` in a thread."""

    def __init__(self, port: int) -> None:
        import trio

        from kvmemo.config import StoreConfig
        from kvmemo.node import open_node
        from kvmemo.server.config import ServerConfig

        self._trio = trio
        started = threading.Event()
        self._state: dict[str, Any] = {}

        async def main() -> None:
            with trio.CancelScope() as scope:
                self._state["scope"] = scope
                self._state["token"] = trio.lowlevel.current_trio_token()
                async with open_node(
                    StoreConfig(shards=4), ServerConfig(port=port, resp=False)
                ) as node:
                    self._state["url"] = node.url
                    started.set()
                    await trio.sleep_forever()

        def run() -> None:
            try:
                trio.run(main)
            except Exception as exc:
                # Kept for the constructor's message (a failed start), and logged.
                self._state["error"] = exc
                logging.getLogger(__name__).exception("in-process node failed")
            finally:
                started.set()

        self._thread = threading.Thread(target=run, name="kvmemo-node", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT) or "url" not in self._state:
            self.stop()
            raise RuntimeError(f"in-process node did not start: {self._state.get('error')!r}")
        self.url = self._state["url"]
        self.port = int(urlsplit(self.url).port or 0)

    def stop(self) -> None:
        scope = self._state.get("scope")
        token = self._state.get("token")
        if scope is not None and token is not None and self._thread.is_alive():
            try:
                self._trio.from_thread.run_sync(scope.cancel, trio_token=token)
            except self._trio.RunFinishedError:
                pass
        self._thread.join(STOP_TIMEOUT)
        assert not self._thread.is_alive(), "the in-process node did not stop"


class KVServer:
    """A KVMemo server that can be stopped and started again on the same port."""

    def __init__(self) -> None:
        self._impl: _SubprocessServer | _ThreadServer | None = None
        self._in_process = False
        self.port = 0

    def start(self) -> None:
        assert self._impl is None
        if not self._in_process:
            try:
                self._impl = _SubprocessServer(self.port)
            except RuntimeError as exc:
                if self.port != 0:
                    raise
                warnings.warn(
                    f"running the node in-process instead of `kvmemo serve`: {exc}",
                    stacklevel=2,
                )
                self._in_process = True
        if self._impl is None:
            self._impl = _ThreadServer(self.port)
        self.port = self._impl.port

    def stop(self) -> None:
        impl, self._impl = self._impl, None
        if impl is not None:
            impl.stop()

    @property
    def url(self) -> str:
        assert self._impl is not None
        return self._impl.url

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server() -> Iterator[KVServer]:
    kv = KVServer()
    try:
        kv.start()
        yield kv
    finally:
        kv.stop()


# ---- the browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:  # stops Playwright's driver process on the way out
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=30_000
    )
    try:
        yield browser
    finally:
        browser.close()


class PageErrors:
    """Uncaught exceptions and console.error messages of one page."""

    def __init__(self, page: Page) -> None:
        self.messages: list[str] = []
        self.allowed: list[re.Pattern[str]] = []
        page.on("pageerror", lambda exc: self.messages.append(f"uncaught: {exc}"))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not any(p.search(message.text) for p in self.allowed):
            self.messages.append(f"console.error: {message.text}")


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(service_workers="block")
    try:
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)
        yield page
    finally:
        context.close()


@pytest.fixture
def page_errors(page: Page) -> Iterator[PageErrors]:
    errors = PageErrors(page)
    yield errors
    assert errors.messages == []


def run_command(page: Page, line: str) -> Locator:
    """Types `line` into the console, submits it, and returns its (finished) entry."""
    before = page.locator("#output .entry").count()
    page.fill("#command-input", line)
    page.press("#command-input", "Enter")
    entry = page.locator("#output .entry").nth(before)
    expect(entry.locator(".entry-command")).to_have_text(f"> {line}")
    expect(entry).not_to_have_class(re.compile(r"\bpending\b"))
    return entry


def open_console(page: Page, server: KVServer) -> None:
    page.goto(f"{server.http}/")
    expect(page.locator("#status")).to_have_text("connected")
    expect(page.locator("#server-url")).to_have_text(server.url)


# ---- the web console -----------------------------------------------------------------


def test_console_commands_keys_metrics_and_errors(
    server: KVServer, page: Page, page_errors: PageErrors
) -> None:
    open_console(page, server)
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    # Other tests of this module share the server: start from an empty keyspace.
    expect(run_command(page, "FLUSHALL").locator(".entry-result")).to_have_text('"OK"')

    # Messages of what the console subscribed to show in its output.
    run_command(page, "SUBSCRIBE console-news")
    expect(
        run_command(page, 'PUBLISH console-news "hi there"').locator(".entry-result")
    ).to_have_text("1")
    push = page.locator("#output .push").last
    expect(push.locator(".push-head")).to_have_text("« message console-news")
    expect(push.locator(".push-data")).to_have_text("hi there")
    run_command(page, "UNSUBSCRIBE")

    entry = run_command(page, "SET greeting hello")
    expect(entry).not_to_have_class(re.compile(r"\berror\b"))
    expect(entry.locator(".entry-result")).to_have_text('"OK"')
    expect(page.locator("#command-input")).to_have_value("")

    entry = run_command(page, "GET greeting")
    expect(entry.locator(".entry-result")).to_have_text('"hello"')
    expect(page.locator("#output")).to_contain_text("hello")

    # Quoting as redis-cli: one word with a blank in it.
    entry = run_command(page, 'SET "two words" "a b"')
    expect(entry.locator(".entry-result")).to_have_text('"OK"')
    entry = run_command(page, "MGET greeting 'two words' missing")
    result = entry.locator(".entry-result").inner_text()
    assert json.loads(result) == ["hello", "a b", None]
    expect(run_command(page, 'DEL "two words"').locator(".entry-result")).to_have_text("1")

    # Key browser: a full SCAN, then a click shows the value and the TTL.
    page.click("#scan-button")
    expect(page.locator("#scan-status")).to_have_text("1 key")
    expect(page.locator("#keys li")).to_have_text(["greeting"])
    page.locator("#keys li", has_text="greeting").click()
    expect(page.locator("#key-name")).to_have_text("greeting")
    expect(page.locator("#key-value")).to_have_text("hello")
    expect(page.locator("#key-ttl")).to_have_text("no expiry")
    expect(page.locator("#keys li.selected")).to_have_text("greeting")

    # Live metrics (INFO + DBSIZE polled every second).
    expect(page.locator("#metric-keys")).to_have_text("1")
    expect(page.locator("#metrics")).not_to_have_class(re.compile(r"\bstale\b"))
    expect(page.locator("#metric-memory")).not_to_have_text("n/a")
    expect(page.locator("#metric-actors table tbody tr").first).to_be_visible()
    expect(page.locator("#metric-actors")).to_contain_text("shard-0")
    expect(page.locator("#metric-memory")).to_have_text(re.compile(r"^\d[\d.]* (B|KiB|MiB) / "))
    expect(page.locator("#metric-ops")).to_contain_text("expired_keys")
    # Nested INFO values are folded (closed <details>), not a wall of JSON, and
    # one opened stays open across the once-a-second refresh.
    for text in page.locator("#metric-ops dd, #metric-server dd").all_inner_texts():
        assert len(text) < 200, text
    nested = page.locator("#metric-ops details.nested")
    if nested.count() > 0:
        nested.first.locator("summary").click()
        updated = page.locator("#metrics-updated").inner_text()
        expect(page.locator("#metrics-updated")).not_to_have_text(updated)
        expect(page.locator("#metric-ops details.nested").first).to_have_attribute("open", "")

    # A server error: the entry is marked as one and shows the stable kind.
    entry = run_command(page, "INCR greeting")
    expect(entry).to_have_class(re.compile(r"\berror\b"))
    expect(entry.locator(".entry-result")).to_contain_text("NOT_INTEGER")
    expect(entry.locator(".entry-result")).to_contain_text("-32000")

    # A line the tokenizer rejects, and an unknown command.
    entry = run_command(page, 'GET "unterminated')
    expect(entry).to_have_class(re.compile(r"\berror\b"))
    expect(entry.locator(".entry-result")).to_contain_text("unterminated double quote")
    entry = run_command(page, "NOSUCHCOMMAND x")
    expect(entry).to_have_class(re.compile(r"\berror\b"))
    expect(entry.locator(".entry-result")).to_contain_text("UNKNOWN_METHOD")

    # History: ArrowUp brings back the last line.
    page.press("#command-input", "ArrowUp")
    expect(page.locator("#command-input")).to_have_value("NOSUCHCOMMAND x")

    # The session is still good after the errors, and the metrics follow the keyspace.
    run_command(page, "SET second 2")
    expect(page.locator("#metric-keys")).to_have_text("2")
    page.click("#scan-button")
    expect(page.locator("#keys li")).to_have_text(["greeting", "second"])
    page.fill("#scan-match", "sec*")
    page.click("#scan-button")
    expect(page.locator("#keys li")).to_have_text(["second"])
    expect(page.locator("#scan-status")).to_have_text("1 key matching sec*")

    page.click("#clear-output")
    expect(page.locator("#output .entry")).to_have_count(0)


# ---- the client module, in the page ----------------------------------------------------

# Records every socket the client opens and every message it sends.
SPY_WEBSOCKET = """() => {
  window.__sockets = [];
  window.__sent = [];
  window.SpyWebSocket = class extends WebSocket {
    constructor(...args) { super(...args); window.__sockets.push(this); }
    send(data) {
      window.__sent.push({socket: window.__sockets.indexOf(this), data});
      super.send(data);
    }
  };
}"""


def serve_page(page: Page, server: KVServer, path: str, html: str) -> None:
    """Makes `path` of the server's origin answer `html`, and opens it.

    The page is the server's origin, so /static/kvmemo.js and /ws are
    same-origin. Chromium treats a response made up by Playwright as coming
    from the public internet and would refuse its connections to 127.0.0.1
    (Local Network Access), unlike for a page the server really served; that
    permission is granted for the server's origin only.
    """
    page.context.grant_permissions(["local-network-access"], origin=server.http)
    page.route(
        f"{server.http}{path}",
        lambda route: route.fulfill(status=200, content_type="text/html", body=html),
    )
    page.goto(f"{server.http}{path}")


def client_page(page: Page, server: KVServer) -> None:
    """A blank page of the server's origin with a WebSocket spy installed."""
    serve_page(page, server, "/blank.html", BLANK_HTML)
    page.evaluate(SPY_WEBSOCKET)


BLANK_HTML = '<!doctype html><link rel="icon" href="data:,"><title>blank</title>'


def test_client_batches_calls_of_one_turn(
    server: KVServer, page: Page, page_errors: PageErrors
) -> None:
    client_page(page, server)
    out = page.evaluate(
        """async () => {
          const {KVMemoClient, KVMemoError} = await import("/static/kvmemo.js");
          const kv = await KVMemoClient.connect("/ws", {WebSocketImpl: SpyWebSocket});
          const before = window.__sent.length;
          // Made in one turn: they must leave as ONE JSON-RPC batch, in this order.
          const results = await Promise.all([
            kv.set("batch:a", "1"),
            kv.set("batch:b", "two"),
            kv.incr("batch:a"),
            kv.get("batch:a"),
            kv.mget("batch:a", "batch:b", "batch:none"),
            kv.incr("batch:b").catch((e) => ({
              error: e instanceof KVMemoError, kind: e.kind, code: e.code,
            })),
            kv.call("dbsize"),
          ]);
          const batch = window.__sent.slice(before).map((m) => JSON.parse(m.data));
          // A lone call is sent as a plain request object.
          const pong = await kv.ping();
          const lone = JSON.parse(window.__sent[window.__sent.length - 1].data);
          // Calls after an await that really waits go in a later message.
          const first = kv.get("batch:a");
          await new Promise((r) => setTimeout(r, 20));
          const second = kv.get("batch:b");
          const split = [await first, await second];
          await kv.del("batch:a", "batch:b");
          const state = kv.state;
          await kv.close();
          return {results, batch, pong, lone, split, state, closedState: kv.state,
                  messages: window.__sent.length - before};
        }"""
    )
    results = out["results"]
    assert results[:5] == ["OK", "OK", 2, "2", ["2", "two", None]]
    assert results[5] == {"error": True, "kind": "NOT_INTEGER", "code": -32000}
    assert isinstance(results[6], int)
    assert results[6] >= 2

    # The seven calls left as one message: a batch array of seven requests.
    assert len(out["batch"]) >= 1
    batch = out["batch"][0]
    assert isinstance(batch, list)
    assert len(batch) == 7
    assert [r["method"] for r in batch] == ["set", "set", "incr", "get", "mget", "incr", "dbsize"]
    ids = [r["id"] for r in batch]
    assert len(set(ids)) == 7
    assert all(isinstance(i, int) for i in ids)
    assert all(r["jsonrpc"] == "2.0" for r in batch)

    assert out["pong"] == "PONG"
    assert isinstance(out["lone"], dict)
    assert out["lone"]["method"] == "ping"
    assert out["lone"]["id"] > max(ids)
    assert out["split"] == ["2", "two"]
    assert out["state"] == "open"
    assert out["closedState"] == "closed"
    # batch, ping, two separate gets, del
    assert out["messages"] == 5


def test_client_reconnects_after_the_socket_closes(
    server: KVServer, page: Page, page_errors: PageErrors
) -> None:
    client_page(page, server)
    out = page.evaluate(
        """async () => {
          const {KVMemoClient} = await import("/static/kvmemo.js");
          const events = [];
          const kv = await KVMemoClient.connect("/ws", {
            WebSocketImpl: SpyWebSocket, backoff: {initialMs: 50, maxMs: 200},
          });
          for (const type of ["open", "close", "reconnecting"]) {
            kv.addEventListener(type, (ev) => events.push({type, ...ev.detail}));
          }
          await kv.set("rc:key", "before");
          const reopened = new Promise((resolve) => {
            kv.addEventListener("open", resolve, {once: true});
          });

          // A call in flight when the socket dies, then the socket closed from
          // this side without the client knowing (no kv.close()).
          const inflight = kv.get("rc:key");
          await Promise.resolve();  // let the batch flush: the get is now on the wire
          const sentBefore = window.__sent.length;
          window.__sockets[0].close(4000, "test: unexpected close");
          // Made while the socket is going away: must wait and leave after reconnecting.
          const queued = kv.set("rc:key", "after");

          const inflightOutcome = await inflight.then(
            (value) => ({value}), (e) => ({kind: e.kind, code: e.code}));
          const stateWhileDown = kv.state;
          await reopened;
          const queuedResult = await queued;
          const value = await kv.get("rc:key");
          await kv.del("rc:key");
          const sentAfter = window.__sent.slice(sentBefore);
          await kv.close();
          return {inflightOutcome, stateWhileDown, queuedResult, value, events,
                  sockets: window.__sockets.length,
                  sentOn: [...new Set(sentAfter.map((m) => m.socket))]};
        }"""
    )
    # A reply to a call already sent can never arrive on a dead socket.
    assert out["inflightOutcome"] == {"kind": "DISCONNECTED", "code": None}
    assert out["stateWhileDown"] == "reconnecting"
    assert out["queuedResult"] == "OK"
    assert out["value"] == "after"
    assert out["sockets"] == 2
    assert out["sentOn"] == [1]  # everything after the close went on the new socket
    types = [e["type"] for e in out["events"]]
    assert types[:3] == ["close", "reconnecting", "open"]
    close, reconnecting, opened = out["events"][:3]
    assert close["code"] == 4000
    assert close["willReconnect"] is True
    assert reconnecting["attempt"] == 1
    assert 0 <= reconnecting["delayMs"] <= 200
    assert opened["reconnected"] is True


def test_client_transaction_and_watch(
    server: KVServer, page: Page, page_errors: PageErrors
) -> None:
    client_page(page, server)
    out = page.evaluate(
        """async () => {
          const {KVMemoClient, KVMemoError} = await import("/static/kvmemo.js");
          const kv = await KVMemoClient.connect("/ws", {WebSocketImpl: SpyWebSocket});
          const other = await KVMemoClient.connect("/ws");  // another session
          const slot = (x) => x instanceof KVMemoError
            ? {error: true, kind: x.kind, code: x.code, data: x.data} : x;
          await kv.del("tx:a", "tx:text", "tx:w");
          await kv.set("tx:text", "not a number");
          const before = window.__sent.length;
          const results = await kv.transaction(["set", "tx:a", "1"], ["incr", "tx:a"],
                                               ["incr", "tx:text"], ["mget", "tx:a", "tx:none"]);
          const request = JSON.parse(window.__sent[before].data);
          const a = await kv.get("tx:a");

          // Optimistic locking: a write by another session since WATCH aborts it.
          const watched = await kv.watch("tx:w");
          await other.set("tx:w", "theirs");
          const aborted = await kv.transaction(["set", "tx:w", "mine"]);
          const afterAbort = await kv.get("tx:w");
          // The transaction ended the watch: the retry runs.
          const retried = await kv.transaction(["set", "tx:w", "mine"]);
          // Nobody wrote since WATCH: it runs; and UNWATCH lets it run anyway.
          await kv.watch("tx:w");
          const untouched = await kv.transaction(["get", "tx:w"]);
          await kv.watch("tx:w");
          await other.set("tx:w", "theirs again");
          const unwatched = await kv.unwatch();
          const afterUnwatch = await kv.transaction(["get", "tx:w"]);

          // Refused as a whole: rejects, and nothing ran.
          const refused = await kv.transaction(["set", "tx:a", "9"], ["get"]).then(
            (value) => ({value}), (e) => slot(e));
          const aAfterRefusal = await kv.get("tx:a");
          await kv.del("tx:a", "tx:text", "tx:w");
          await other.close();
          await kv.close();
          return {results: results.map(slot), request, a, watched, aborted, afterAbort,
                  retried, untouched, unwatched, afterUnwatch, refused, aAfterRefusal};
        }"""
    )
    assert out["request"]["method"] == "transaction"
    assert out["request"]["params"] == [
        ["set", "tx:a", "1"],
        ["incr", "tx:a"],
        ["incr", "tx:text"],
        ["mget", "tx:a", "tx:none"],
    ]
    ok, n, error, values = out["results"]
    assert (ok, n, values) == ("OK", 2, ["2", None])
    assert error["error"] is True
    assert error["kind"] == "NOT_INTEGER"
    assert error["code"] == -32000
    assert out["a"] == "2"  # nothing rolled back

    assert out["watched"] == "OK"
    assert out["aborted"] is None
    assert out["afterAbort"] == "theirs"
    assert out["retried"] == ["OK"]
    assert out["untouched"] == ["mine"]
    assert out["unwatched"] == "OK"
    assert out["afterUnwatch"] == ["theirs again"]

    refused = out["refused"]
    assert refused["error"] is True
    assert refused["code"] == -32602
    assert refused["data"]["index"] == 1
    assert out["aAfterRefusal"] == "2"


def test_console_reconnects_after_a_server_restart(
    server: KVServer, page: Page, page_errors: PageErrors
) -> None:
    # While the server is away Chromium logs each refused connection as an error.
    page_errors.allowed.append(re.compile(r"WebSocket connection to .* failed"))
    open_console(page, server)
    run_command(page, "SET restart:key v")
    server.stop()
    try:
        expect(page.locator("#status")).to_have_text(re.compile("reconnecting|disconnected"))
        expect(page.locator("#metrics")).to_have_class(re.compile(r"\bstale\b"))
        # A command typed while the server is away waits and runs after the reconnection.
        page.fill("#command-input", "PING")
        page.press("#command-input", "Enter")
        pending = page.locator("#output .entry").last
        expect(pending).to_have_class(re.compile(r"\bpending\b"))
    finally:
        server.start()  # the same port again
    expect(page.locator("#status")).to_have_text("connected", timeout=15_000)
    expect(pending).not_to_have_class(re.compile(r"\bpending\b"))
    expect(pending.locator(".entry-result")).to_have_text('"PONG"')
    # The data was in memory only: the new server starts empty.
    expect(run_command(page, "GET restart:key").locator(".entry-result")).to_have_text("null")
    expect(page.locator("#metrics")).not_to_have_class(re.compile(r"\bstale\b"))


# ---- the example page ----------------------------------------------------------------


def test_example_page(server: KVServer, page: Page, page_errors: PageErrors) -> None:
    # Served from the server's origin, as its README says it must be.
    serve_page(page, server, "/example.html", EXAMPLE_HTML.read_text())
    log = page.locator("#log")
    expect(log).to_contain_text("closed")
    text = log.inner_text()
    assert f"connected to {server.url}" in text
    assert 'set greeting  -> "OK"' in text
    assert 'get greeting  -> "hello, world"' in text
    assert 'mset fruit:*  -> "OK"' in text
    assert 'mget          -> ["hello, world","apple","pear",null]' in text
    assert "incr greeting -> NOT_INTEGER (-32000)" in text
    assert "publish news  -> 1 subscriber" in text
    assert "message       -> news: fresh" in text
    expect(page.locator("#log .error")).to_have_count(0)


def test_example_page_served_from_another_origin(browser: Browser) -> None:
    # As examples/browser/README.md says: the page served by any web server,
    # ?ws= naming a KVMemo server that allows the page's origin. The page
    # imports the client module from that server (cross-origin: it needs the
    # server's CORS header) and talks to it.
    import functools
    import http.server

    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(EXAMPLE_HTML.parent)
    )
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{web.server_address[1]}"
    kv = _SubprocessServer(0, ("--allowed-origin", origin))
    context = browser.new_context(service_workers="block")
    try:
        page = context.new_page()
        page.goto(f"{origin}/example.html?ws={kv.url}")
        log = page.locator("#log")
        expect(log).to_contain_text("closed", timeout=UI_TIMEOUT_MS)
        text = log.inner_text()
        assert f"connected to {kv.url}" in text
        assert 'mget          -> ["hello, world","apple","pear",null]' in text
        expect(page.locator("#log .error")).to_have_count(0)
    finally:
        context.close()
        kv.stop()
        web.shutdown()
        web.server_close()
