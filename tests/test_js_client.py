"""The browser client under Node: its unit tests (plain Node, no packages), and a live round trip.

The unit tests (tests/js/test_client.mjs) play the server with a fake
WebSocket. The round trip runs the same module against a real in-process
server, with Node's own WebSocket (``--experimental-websocket`` on Node 20,
built in from Node 22); it is skipped when Node has none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from kvmemo.config import StoreConfig
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig

SCRIPT = Path(__file__).parent / "js" / "test_client.mjs"
MODULE = Path(__file__).resolve().parent.parent / "kvmemo" / "server" / "static" / "kvmemo.js"
TEST_TIMEOUT = 30  # seconds for a whole test, node start included


def test_browser_client_unit_tests_pass_under_node() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    done = subprocess.run(
        [node, str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 failed" in done.stdout


def _node_with_websocket() -> list[str]:
    """The command running Node with a global WebSocket; skips the test when there is none."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    for flags in ([], ["--experimental-websocket"]):
        probe = subprocess.run(
            [node, *flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if probe.returncode == 0:
            return [node, *flags]
    pytest.skip("this node has no WebSocket (Node >= 20.10 with --experimental-websocket)")


# Subscribes, publishes on the same client, waits for the pushes, leaves; prints what it saw.
ROUND_TRIP = """
import {KVMemoClient} from %(module)s;
const kv = await KVMemoClient.connect(process.env.KVMEMO_URL, {reconnect: false});
const seen = [];
let done;
const arrived = new Promise((resolve) => { done = resolve; });
const note = (...args) => { seen.push(args); if (seen.length === 3) done(); };
const out = {};
out.subscribe = await kv.subscribe(["news", "other"], note);
out.psubscribe = await kv.psubscribe("n*", note);
out.publish = await kv.publish("news", "h\\u00e9llo");
out.publish_other = await kv.publish("other", "2");
await arrived;
out.seen = seen;
out.numsub = await kv.call("pubsub", "numsub", "news");
out.unsubscribe = await kv.unsubscribe();
out.punsubscribe = await kv.punsubscribe();
out.get = await kv.get("missing");
console.log(JSON.stringify(out));
await kv.close();
"""


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(
            StoreConfig(shards=2), ServerConfig(host="127.0.0.1", port=0, resp=False)
        ) as running:
            yield running


async def test_a_subscribe_round_trip_against_a_real_server(node: Node) -> None:
    command = _node_with_websocket()
    script = ROUND_TRIP % {"module": json.dumps(MODULE.as_uri())}
    with trio.fail_after(TEST_TIMEOUT):
        done = await trio.run_process(
            [*command, "--no-warnings", "--input-type=module", "-e", script],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "KVMEMO_URL": node.url},
        )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert out["subscribe"] == [["subscribe", "news", 1], ["subscribe", "other", 2]]
    assert out["psubscribe"] == [["psubscribe", "n*", 3]]
    assert out["publish"] == 2
    assert out["publish_other"] == 1
    # The channel's own message, then the pattern's (one publish), then the next publish.
    assert out["seen"] == [
        ["h\u00e9llo", "news", None],
        ["h\u00e9llo", "news", "n*"],
        ["2", "other", None],
    ]
    assert out["numsub"] == ["news", 1]
    assert out["unsubscribe"] == [["unsubscribe", "news", 2], ["unsubscribe", "other", 1]]
    assert out["punsubscribe"] == [["punsubscribe", "n*", 0]]
    assert out["get"] is None
    await trio.testing.wait_all_tasks_blocked()  # the server saw the close (loopback, in-process)
    assert node.engine.pubsub.numsub([b"news"]) == [(b"news", 0)]


# ---- the idle close (tests/js/test_idle_s24.mjs) ----

IDLE_SCRIPT = Path(__file__).parent / "js" / "test_idle_s24.mjs"
IDLE_TIMEOUT = 0.3  # seconds: the server's real idle timer; the script waits on events, not time
IDLE_TOKEN = "idle-s24-token"


def test_idle_close_unit_tests_pass_under_node() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("KVMEMO_URL", "KVMEMO_AUTH_TOKEN")}
    done = subprocess.run(
        [node, str(IDLE_SCRIPT)], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 failed" in done.stdout


async def test_an_idle_client_reconnects_only_when_called_against_a_real_server() -> None:
    command = _node_with_websocket()
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        resp=False,
        idle_timeout=IDLE_TIMEOUT,
        tokens=frozenset({IDLE_TOKEN}),
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(StoreConfig(shards=2), config) as running:
            done = await trio.run_process(
                [*command, "--no-warnings", str(IDLE_SCRIPT)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**os.environ, "KVMEMO_URL": running.url, "KVMEMO_AUTH_TOKEN": IDLE_TOKEN},
            )
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    assert "3 passed, 0 failed" in out
