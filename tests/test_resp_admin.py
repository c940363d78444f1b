"""Operations commands of the Redis port: SHUTDOWN, SLOWLOG, CLIENT KILL, ROLE, WAIT.

- SHUTDOWN against a real ``kvmemo serve`` process (``redis-cli shutdown``
  stops it with exit status 0, the data is there after a restart on the same
  ``--dir``; AUTH is required first when tokens are set), and in-process: the
  owner's callback gets the request; without one it is refused; the refusals
  Redis makes (syntax, ABORT, inside MULTI, a save that cannot be made).
- The slow log's core (Redis's entry format and truncation, its settings),
  and the server's timing: data commands, a pipelined batch as one entry,
  EXEC's transaction, thresholds that log everything or nothing.
- CLIENT KILL in its forms, and the killed client really gone.

Every server runs on 127.0.0.1 on a port it picks; subprocesses are killed
in a ``finally``. Replies compared with Redis's own are in
``test_resp_admin_differential.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from test_resp_server import Client

from kvmemo.config import StoreConfig
from kvmemo.engine.engine import KVEngine
from kvmemo.node import open_node
from kvmemo.server.app import StopRequest
from kvmemo.server.config import ServerConfig
from kvmemo.server.resp import ErrorReply, encode_command
from kvmemo.server.resp_server import SHUTDOWN_FAILED, SHUTDOWN_UNAVAILABLE, serve_resp
from kvmemo.server.slowlog import NEVER, SlowLog, entry_args

ROOT = Path(__file__).resolve().parents[1]
REDIS_CLI = shutil.which("redis-cli")
TIMEOUT = 30  # seconds per test
START_TIMEOUT = 20  # seconds for a kvmemo serve process to print its listening lines
STOP_TIMEOUT = 10  # seconds for a process told to SHUTDOWN to exit ("promptly")
TOKEN = "s3cret"
SYNTAX = ErrorReply("ERR syntax error")


@attrs.frozen
class Port:
    engine: KVEngine
    host: str
    port: int


@asynccontextmanager
async def resp_port(
    shutdown: Callable[[StopRequest], bool] | None = None,
    *,
    tokens: frozenset[str] = frozenset(),
    **settings: Any,
) -> AsyncIterator[Port]:
    """A store and its Redis port (``serve_resp`` with ``shutdown``), stopped at the end."""
    settings.setdefault("shards", 2)
    async with trio.open_nursery() as nursery:
        engine = KVEngine(StoreConfig(**settings))
        await engine.prepare()
        system = await nursery.start(engine.supervisor().run)
        engine.attach(system)
        host, port = await nursery.start(
            partial(serve_resp, engine, port=0, tokens=tokens, shutdown=shutdown)
        )
        try:
            yield Port(engine, host, port)
        finally:
            nursery.cancel_scope.cancel()
    engine.close()


async def connect(port: Port) -> Client:
    return Client(await trio.open_tcp_stream(port.host, port.port))


# -- SHUTDOWN: a real kvmemo serve process ---------------------------------------------------


def _env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("KVMEMO_")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    return out


@attrs.define
class Processes:
    """Starts ``kvmemo serve`` processes; the fixture kills any still running."""

    logs: Path
    started: list[trio.Process] = attrs.Factory(list)

    async def start(self, *args: str) -> tuple[trio.Process, int]:
        """Start a server with ``args``; its process and Redis port."""
        log = self.logs / f"server-{len(self.started)}.log"
        with log.open("wb") as stderr:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "kvmemo", "serve", "--port", "0", "--resp-port", "0", *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=_env(),
            )
        self.started.append(process)
        assert process.stdout is not None
        data = b""
        with trio.fail_after(START_TIMEOUT):
            while data.count(b"\n") < 2:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"the server exited before listening: {log.read_text()}"
                data += chunk
        second = data.split(b"\n")[1].decode()
        assert second.startswith("KVMemo listening on redis://127.0.0.1:"), second
        return process, int(second.rsplit(":", 1)[1])


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    launcher = Processes(logs)
    try:
        yield launcher
    finally:
        for process in launcher.started:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def cli(port: int, *args: str) -> tuple[int, str]:
    """redis-cli's exit status and output (stdout and stderr)."""
    assert REDIS_CLI is not None
    result = await trio.run_process(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, (result.stdout + result.stderr).decode()


async def stopped(process: trio.Process) -> int:
    with trio.fail_after(STOP_TIMEOUT):
        return await process.wait()


@pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is not installed")
async def test_redis_cli_shutdown_stops_the_server_process_and_the_data_survives_a_restart(
    processes: Processes, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    auth = ("-a", TOKEN, "--no-auth-warning")
    base = ("--shards", "2", "--dir", str(data), "--auth-token", TOKEN)
    with trio.fail_after(3 * START_TIMEOUT + 3 * STOP_TIMEOUT):
        process, port = await processes.start(*base)
        assert await cli(port, *auth, "SET", "kept", "v1") == (0, "OK\n")
        assert await cli(port, *auth, "MSET", "a", "1", "b", "2") == (0, "OK\n")
        # Not authenticated: refused, and the server keeps serving.
        assert await cli(port, "SHUTDOWN") == (0, "NOAUTH Authentication required.\n\n")
        assert await cli(port, *auth, "SHUTDOWN", "ABORT") == (
            0,
            "ERR No shutdown in progress.\n\n",
        )
        assert process.returncode is None
        assert await cli(port, *auth, "GET", "kept") == (0, "v1\n")
        # redis-cli reads the closed connection as success: status 0, no output.
        assert await cli(port, *auth, "SHUTDOWN") == (0, "")
        assert await stopped(process) == 0
        assert list(data.glob("shard-*/snap-*.kvs")), "the graceful stop takes its snapshot"

        process, port = await processes.start(*base)
        assert await cli(port, *auth, "MGET", "kept", "a", "b") == (0, "v1\n1\n2\n")
        assert await cli(port, *auth, "SET", "after", "v2") == (0, "OK\n")
        snapshots = sorted(data.glob("shard-*/snap-*.kvs"))
        assert await cli(port, *auth, "SHUTDOWN", "NOSAVE", "NOW") == (0, "")
        assert await stopped(process) == 0
        # NOSAVE: no snapshot taken; the synced logs bring "after" back below.
        assert sorted(data.glob("shard-*/snap-*.kvs")) == snapshots

        process, port = await processes.start(*base)
        assert await cli(port, *auth, "MGET", "kept", "after") == (0, "v1\nv2\n")
        assert await cli(port, *auth, "SHUTDOWN", "SAVE") == (0, "")
        assert await stopped(process) == 0


# -- SHUTDOWN: in-process ------------------------------------------------------------------


async def test_shutdown_without_an_owner_callback_is_refused_and_changes_nothing() -> None:
    with trio.fail_after(TIMEOUT):
        async with resp_port() as port:
            client = await connect(port)
            assert await client.call("SET", "k", "v") == "OK"
            assert await client.call("SHUTDOWN") == SHUTDOWN_UNAVAILABLE
            assert SHUTDOWN_UNAVAILABLE.message.startswith("ERR SHUTDOWN is not available")
            assert await client.call("GET", "k") == b"v"
        with trio.fail_after(TIMEOUT):
            async with open_node(StoreConfig(shards=2), ServerConfig(port=0, resp_port=0)) as node:
                assert node.resp_bound is not None
                host, resp = node.resp_bound
                client = Client(await trio.open_tcp_stream(host, resp))
                assert await client.call("SHUTDOWN", "NOSAVE") == SHUTDOWN_UNAVAILABLE
                assert await client.call("PING") == "PONG"


async def test_open_node_shutdown_reaches_the_owner_callback_once() -> None:
    requests: list[StopRequest] = []
    with trio.fail_after(TIMEOUT):
        async with open_node(StoreConfig(shards=2), ServerConfig(port=0, resp_port=0)) as node:
            node.server.on_stop = requests.append
            assert node.resp_bound is not None
            host, resp = node.resp_bound
            first = Client(await trio.open_tcp_stream(host, resp))
            second = Client(await trio.open_tcp_stream(host, resp))
            await first.send(encode_command("SHUTDOWN", "nosave"))
            assert await first.closed()
            await second.send(encode_command("SHUTDOWN"))  # while stopping: accepted, not repeated
            assert await second.closed()
    assert len(requests) == 1
    assert requests[0].save is False
    assert requests[0].origin.startswith("RESP client id=")


async def test_shutdown_answers_the_commands_before_it_then_closes_without_a_reply() -> None:
    requests: list[StopRequest] = []

    def on_stop(request: StopRequest) -> bool:
        requests.append(request)
        return True

    with trio.fail_after(TIMEOUT):
        async with resp_port(on_stop) as port:
            client = await connect(port)
            pipeline = [("SET", "k", "1"), ("INCR", "k"), ("SHUTDOWN", "now"), ("GET", "k")]
            await client.send(b"".join(encode_command(*c) for c in pipeline))
            assert await client.replies(2) == ["OK", 2]
            with pytest.raises(EOFError):
                await client.reply()  # nothing for SHUTDOWN nor what followed it
    assert [r.save for r in requests] == [True]


async def test_shutdown_refusals_answer_as_redis_and_call_nothing() -> None:
    called: list[StopRequest] = []

    def on_stop(request: StopRequest) -> bool:
        called.append(request)
        return True

    with trio.fail_after(TIMEOUT):
        async with resp_port(on_stop, tokens=frozenset({TOKEN})) as port:
            client = await connect(port)
            assert await client.call("SHUTDOWN") == ErrorReply("NOAUTH Authentication required.")
            assert await client.call("AUTH", TOKEN) == "OK"
            for bad in (["bogus"], ["NOSAVE", "SAVE"], ["ABORT", "NOW"], ["NOW", "ABORT"]):
                assert await client.call("SHUTDOWN", *bad) == SYNTAX, bad
            assert await client.call("SHUTDOWN", "ABORT") == ErrorReply(
                "ERR No shutdown in progress."
            )
            assert await client.call("MULTI") == "OK"
            assert await client.call("SHUTDOWN") == ErrorReply(
                "ERR Command not allowed inside a transaction"
            )
            assert await client.call("EXEC") == ErrorReply(
                "EXECABORT Transaction discarded because of previous errors."
            )
            # Nothing to save to without persistence: SAVE is refused unless FORCE.
            assert await client.call("SHUTDOWN", "SAVE") == SHUTDOWN_FAILED
            assert called == []
            await client.send(encode_command("SHUTDOWN", "SAVE", "FORCE"))
            assert await client.closed()
    assert [r.save for r in called] == [True]


async def test_shutdown_refuses_to_save_while_writes_are_not_durable_unless_forced_or_nosave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    called: list[bool] = []

    def on_stop(request: StopRequest) -> bool:
        called.append(request.save)
        return True

    with trio.fail_after(TIMEOUT):
        async with resp_port(on_stop, data_dir=str(tmp_path)) as port:
            monkeypatch.setattr(port.engine, "persistence_problems", lambda: ["shard-0: EIO"])
            client = await connect(port)
            assert await client.call("SHUTDOWN") == SHUTDOWN_FAILED
            assert await client.call("SHUTDOWN", "SAVE") == SHUTDOWN_FAILED
            assert called == []
            await client.send(encode_command("SHUTDOWN", "NOSAVE"))
            assert await client.closed()
            other = await connect(port)
            await other.send(encode_command("SHUTDOWN", "FORCE"))
            assert await other.closed()
    assert called == [False, True]


# -- SLOWLOG: the core ---------------------------------------------------------------------


def test_entry_arguments_are_cut_as_redis_cuts_them() -> None:
    assert entry_args([b"GET", b"k"]) == [b"GET", b"k"]
    long = b"x" * 200
    assert entry_args([b"SET", b"k", long]) == [b"SET", b"k", b"x" * 128 + b"... (72 more bytes)"]
    assert entry_args([b"SET", b"k", b"y" * 128]) == [b"SET", b"k", b"y" * 128]
    many = [b"MSET", *(b"k%d" % i for i in range(40))]  # 41 arguments
    cut = entry_args(many)
    assert len(cut) == 32
    assert cut[:31] == many[:31]
    assert cut[31] == b"... (10 more arguments)"
    assert entry_args(many[:32]) == many[:32]  # exactly 32: kept whole
    # A timed batch: one slot for the count of the other commands.
    assert entry_args([b"GET", b"k"], more_commands=3) == [
        b"GET",
        b"k",
        b"... (3 more commands in this batch)",
    ]
    batch = entry_args(many, more_commands=1)
    assert len(batch) == 32
    assert batch[30] == b"... (11 more arguments)"
    assert batch[31] == b"... (1 more commands in this batch)"


def test_slow_log_keeps_the_newest_entries_and_its_settings_are_checked() -> None:
    log = SlowLog()
    assert (log.slower_than, log.max_len, log.threshold_ns) == (10_000, 128, 10_000_000)
    log.configure(max_len=2)
    for i in range(3):
        log.record(5_000 + i, [b"GET", b"k%d" % i], b"1.2.3.4:5", b"me", 1700000000.5)
    assert [(e[0], e[1], e[2], e[3][1]) for e in log.get(-1)] == [
        (2, 1700000000, 5, b"k2"),
        (1, 1700000000, 5, b"k1"),
    ]
    assert log.get(1)[0][4:] == (b"1.2.3.4:5", b"me")
    assert log.get(0) == []
    # Lowering max-len trims at the next entry, as Redis does.
    log.configure(max_len=1)
    assert len(log.entries) == 2
    log.record(1, [b"X"], b"a:1", b"", 0)
    assert [e[0] for e in log.entries] == [3]
    log.reset()
    log.record(1, [b"X"], b"a:1", b"", 0)
    assert [e[0] for e in log.entries] == [4]  # ids go on after a reset
    log.configure(slower_than=-1)
    assert log.threshold_ns == NEVER
    log.configure(slower_than=0)
    assert log.threshold_ns == 0
    log.configure(max_len=0)
    assert log.threshold_ns == NEVER
    with pytest.raises(ValueError, match=r"^slower_than must be between -1 and \d+, got -2$"):
        log.configure(slower_than=-2, max_len=5)
    assert log.max_len == 0  # nothing changed
    with pytest.raises(ValueError, match=r"^max_len must be between 0 and \d+, got -1$"):
        log.configure(max_len=-1)


# -- SLOWLOG: the server -------------------------------------------------------------------


def _args_of(entries: object) -> list[list[bytes]]:
    assert isinstance(entries, list)
    return [entry[3] for entry in entries]


async def test_slowlog_at_zero_logs_each_data_command_with_its_client() -> None:
    with trio.fail_after(TIMEOUT):
        async with resp_port() as port:
            client = await connect(port)
            assert await client.call("CLIENT", "SETNAME", "loader") == "OK"
            assert await client.call("CONFIG", "SET", "slowlog-log-slower-than", "0") == "OK"
            assert await client.call("SET", "k", "x" * 200) == "OK"
            assert await client.call("get", "k") == b"x" * 200
            entries = await client.call("SLOWLOG", "GET")
            assert _args_of(entries) == [
                [b"get", b"k"],  # as the client spelled it
                [b"SET", b"k", b"x" * 128 + b"... (72 more bytes)"],
            ]
            info = await client.call("CLIENT", "INFO")
            assert isinstance(info, bytes)
            assert isinstance(entries, list)
            addr = dict(f.split(b"=", 1) for f in info.split())[b"addr"]
            newest = entries[0]
            assert newest[0] > entries[1][0]
            assert newest[1] > 1_600_000_000  # Unix time, seconds
            assert newest[2] >= 0  # microseconds
            assert newest[4:] == [addr, b"loader"]
            assert await client.call("SLOWLOG", "LEN") == 2
            assert await client.call("SLOWLOG", "RESET") == "OK"
            assert await client.call("SLOWLOG", "LEN") == 0
            # Only engine calls are timed: connection commands are never logged.
            assert await client.call("CLIENT", "SETNAME", "again") == "OK"
            assert await client.call("SLOWLOG", "GET", "-1") == []


async def test_a_pipelined_batch_is_one_entry_naming_its_first_command() -> None:
    with trio.fail_after(TIMEOUT):
        async with resp_port() as port:
            client = await connect(port)
            assert await client.call("CONFIG", "SET", "slowlog-log-slower-than", "0") == "OK"
            pipeline = [("set", "a", "1"), ("INCR", "a"), ("MSET", "b", "2", "c", "3")]
            await client.send(b"".join(encode_command(*c) for c in pipeline))
            assert await client.replies(3) == ["OK", 2, "OK"]
            assert _args_of(await client.call("SLOWLOG", "GET")) == [
                [b"set", b"a", b"1", b"... (2 more commands in this batch)"]
            ]
            assert await client.call("SLOWLOG", "RESET") == "OK"
            assert await client.call("MULTI") == "OK"
            assert await client.call("SET", "t", "1") == "QUEUED"
            assert await client.call("PING") == "QUEUED"
            assert await client.call("incr", "t") == "QUEUED"
            assert await client.call("EXEC") == ["OK", "PONG", 2]
            assert _args_of(await client.call("SLOWLOG", "GET")) == [
                [b"SET", b"t", b"1", b"... (1 more commands in this batch)"]
            ]


async def test_only_calls_at_least_as_slow_as_the_threshold_are_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with resp_port() as port:
            engine = port.engine
            real = engine.execute

            async def execute(name: str, args: Any) -> Any:
                if name == "dbsize":
                    await trio.sleep(0.03)  # a slow command: it takes at least 30 ms
                return await real(name, args)

            monkeypatch.setattr(engine, "execute", execute)
            client = await connect(port)
            assert await client.call("CONFIG", "GET", "slowlog-*") == [
                b"slowlog-log-slower-than",
                b"10000",
                b"slowlog-max-len",
                b"128",
            ]
            assert await client.call("DBSIZE") == 0
            entries = await client.call("SLOWLOG", "GET")
            assert isinstance(entries, list)
            assert [e[3] for e in entries if e[3] == [b"DBSIZE"]] == [[b"DBSIZE"]]
            assert next(e[2] for e in entries if e[3] == [b"DBSIZE"]) >= 30_000
            for off in ("-1", "1000000000"):  # disabled; slower than any call here
                assert await client.call("SLOWLOG", "RESET") == "OK"
                assert await client.call("CONFIG", "SET", "slowlog-log-slower-than", off) == "OK"
                assert await client.call("DBSIZE") == (0 if off == "-1" else 1)
                assert await client.call("SET", "k", "v") == "OK"
                assert await client.call("SLOWLOG", "LEN") == 0
            assert await client.call("CONFIG", "SET", "slowlog-log-slower-than", "0") == "OK"
            assert await client.call("CONFIG", "SET", "slowlog-max-len", "0") == "OK"
            assert await client.call("DBSIZE") == 1
            assert await client.call("SLOWLOG", "LEN") == 0  # max-len 0 keeps nothing


# -- CLIENT KILL -------------------------------------------------------------------------


async def _ids_and_addrs(client: Client) -> dict[int, bytes]:
    listing = await client.call("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    out = {}
    for line in listing.splitlines():
        fields = dict(f.split(b"=", 1) for f in line.split())
        out[int(fields[b"id"])] = fields[b"addr"]
    return out


async def test_client_kill_by_id_and_addr_drops_the_client_at_once() -> None:
    with trio.fail_after(TIMEOUT):
        async with resp_port() as port:
            admin = await connect(port)
            victims = [await connect(port) for _ in range(3)]
            ids = [await v.call("CLIENT", "ID") for v in victims]
            admin_id = await admin.call("CLIENT", "ID")
            assert await admin.call("CLIENT", "KILL", "ID", str(ids[0])) == 1
            assert await victims[0].closed()
            assert set(await _ids_and_addrs(admin)) == {admin_id, ids[1], ids[2]}
            addrs = await _ids_and_addrs(admin)
            assert await admin.call("CLIENT", "KILL", addrs[ids[1]].decode()) == "OK"
            assert await victims[1].closed()
            assert await admin.call("CLIENT", "KILL", addrs[ids[1]].decode()) == ErrorReply(
                "ERR No such client"
            )
            assert await admin.call("CLIENT", "KILL", "ADDR", addrs[ids[2]].decode()) == 1
            assert await victims[2].closed()
            assert set(await _ids_and_addrs(admin)) == {admin_id}
            assert await admin.call("PING") == "PONG"


async def test_client_kill_filters_skip_the_caller_unless_skipme_no() -> None:
    with trio.fail_after(TIMEOUT):
        async with resp_port() as port:
            admin = await connect(port)
            others = [await connect(port) for _ in range(2)]
            for other in others:
                assert await other.call("PING") == "PONG"
            info = await admin.call("CLIENT", "INFO")
            assert isinstance(info, bytes)
            laddr = dict(f.split(b"=", 1) for f in info.split())[b"laddr"].decode()
            assert await admin.call("CLIENT", "KILL", "TYPE", "pubsub") == 0
            assert await admin.call("CLIENT", "KILL", "ID", "99999") == 0
            assert await admin.call("CLIENT", "KILL", "LADDR", laddr, "USER", "default") == 2
            for other in others:
                assert await other.closed()
            assert await admin.call("CLIENT", "KILL", "USER", "nobody") == ErrorReply(
                "ERR No such user 'nobody'"
            )
            assert await admin.call("CLIENT", "KILL", "ID", "0") == ErrorReply(
                "ERR client-id should be greater than 0"
            )
            assert await admin.call("CLIENT", "KILL", "SKIPME", "maybe") == SYNTAX
            # The caller itself: its reply first, then the connection closes.
            assert await admin.call("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "no") == 1
            assert await admin.closed()


async def test_a_client_killed_in_a_transaction_gives_back_its_watches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with resp_port() as port:
            released: list[list[bytes]] = []
            real = port.engine.unwatch

            def unwatch(watches: Any) -> None:
                released.append([key for _, key, _ in watches])
                real(watches)

            monkeypatch.setattr(port.engine, "unwatch", unwatch)
            admin = await connect(port)
            victim = await connect(port)
            victim_id = await victim.call("CLIENT", "ID")
            assert await victim.call("WATCH", "w") == "OK"
            assert await victim.call("MULTI") == "OK"
            assert await admin.call("CLIENT", "KILL", "ID", str(victim_id)) == 1
            assert await victim.closed()
            assert await admin.call("SET", "w", "1") == "OK"  # after the kill was handled
            assert released == [[b"w"]]


# -- ROLE, WAIT ----------------------------------------------------------------------------


async def test_role_is_a_master_without_replicas_and_wait_never_blocks() -> None:
    with trio.fail_after(TIMEOUT):
        async with resp_port() as port:
            client = await connect(port)
            assert await client.call("ROLE") == [b"master", 0, []]
            assert await client.call("SET", "k", "v") == "OK"
            with trio.fail_after(1):  # Redis would block for the timeout (or forever: 0)
                assert await client.call("WAIT", "1", "0") == 0
                assert await client.call("WAIT", "3", "60000") == 0
            assert await client.call("WAIT", "0", "-1") == ErrorReply("ERR timeout is negative")
