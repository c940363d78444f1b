"""An operator's audit of ``kvmemo serve``: start, stop, logs, metrics, start refusals.

Each test is a defect found by running the server as the README tells an
operator to (or a guard of what an operator relies on), with what it did
before the fix:

- a start refused by the data directory (in use, damaged, written with
  another shard count or by a newer KVMemo) raised errors that were not
  ``kvmemo.KVMemoError``s, so ``except kvmemo.KVMemoError`` around
  ``open_store`` let them through;
- a standard output nobody reads (``kvmemo serve | head -0``, ``>/dev/full``)
  made a node that had started "fail" with a traceback and exit 1;
- a data directory that cannot be written at start was served (reads only,
  writes get ``IO``) without a word in the log: the start looked clean;
- ``--host 0.0.0.0`` (or any address but loopback) without ``--auth-token``
  opened every key to the network without a word;
- ``/metrics`` is checked against a strict reading of the Prometheus text
  format (a guard: it held already).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from test_cli import EXIT_TIMEOUT, env, finish, serve_command
from test_persistence_disk import tmpfs

import kvmemo
from actors import EventKind, LifecycleEvent
from kvmemo.cli import exposure_warning
from kvmemo.config import StoreConfig
from kvmemo.node import build, log_event, open_node
from kvmemo.persistence import CorruptLog, CorruptSnapshot, NewerVersion, PersistenceError
from kvmemo.persistence.layout import DirectoryInUse, ShardCountMismatch
from kvmemo.server.config import ServerConfig

__all__ = ["tmpfs"]  # a fixture, used by name


# -- start refusals are KVMemoErrors ---------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        PersistenceError,
        DirectoryInUse,
        ShardCountMismatch,
        CorruptLog,
        CorruptSnapshot,
        NewerVersion,
    ],
    ids=lambda c: c.__name__,
)
def test_every_start_refusal_of_the_data_directory_is_a_kvmemo_error_of_kind_io(
    cls: type[Exception],
) -> None:
    assert issubclass(cls, kvmemo.KVMemoError)
    assert cls.kind == "IO"  # type: ignore[attr-defined]


def test_a_newer_version_error_keeps_its_file_format_apart_from_its_kind() -> None:
    exc = NewerVersion("DIR/shard-0/snap-00000002.kvs", 2, 1, kind="snapshot")
    assert (exc.kind, exc.file_format) == ("IO", "snapshot")
    assert str(exc) == (
        "DIR/shard-0/snap-00000002.kvs: written by a newer KVMemo (snapshot format version 2;"
        " this build reads up to 1); refusing to start"
    )


async def test_except_kvmemo_error_around_open_store_catches_a_held_data_directory(
    tmp_path: Path,
) -> None:
    async with kvmemo.open_store(shards=2, data_dir=tmp_path) as kv:
        await kv.set("k", "v")
        caught: kvmemo.KVMemoError | None = None
        try:
            async with kvmemo.open_store(shards=2, data_dir=tmp_path):
                pass  # pragma: no cover - refused before the block
        except kvmemo.KVMemoError as exc:
            caught = exc
        assert isinstance(caught, kvmemo.DirectoryInUse)  # still its own class
        assert caught.kind == "IO"
        assert "in use by another KVMemo store" in caught.message
        assert await kv.get("k") == b"v"


async def test_except_kvmemo_error_around_open_store_catches_a_corrupt_log(
    tmp_path: Path,
) -> None:
    async with kvmemo.open_store(shards=1, data_dir=tmp_path, snapshot_log_bytes=0) as kv:
        for i in range(20):
            await kv.set(f"k{i}", "v" * 20)
        kv.engine.skip_final_snapshot()  # leave the records in the log
    segment = sorted((tmp_path / "shard-0").glob("wal-*.log"))[0]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a record in the middle: damage, not a torn tail
    segment.write_bytes(bytes(data))
    with pytest.raises(kvmemo.KVMemoError, match=r"corrupt write-ahead log at offset \d+") as got:
        async with kvmemo.open_store(shards=1, data_dir=tmp_path):
            pass  # pragma: no cover - refused before the block
    assert isinstance(got.value, CorruptLog)


# -- standard output, logs ---------------------------------------------------------------------


def _messages(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def _stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM, then the exit code and the rest of standard error."""
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process, EXIT_TIMEOUT)
    return code, err


def _read_until_started(process: subprocess.Popen[str]) -> list[str]:
    """Standard error's lines up to and including the ``started:`` log line."""
    assert process.stderr is not None
    lines = []
    while True:
        line = process.stderr.readline()
        assert line, f"exited before it started: {''.join(lines)}"
        lines.append(line)
        if json.loads(line)["msg"].startswith("started: "):
            return lines


def test_a_closed_standard_output_does_not_stop_a_started_server(tmp_path: Path) -> None:
    # Was: printing "KVMemo listening on ..." raised BrokenPipeError once the
    # node was up: logged as "the node failed" with a traceback, exit 1.
    process = subprocess.Popen(
        serve_command("--port", "0", "--resp-port", "0", "--shards", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        assert process.stdout is not None
        process.stdout.close()  # nobody reads it: every write to it is EPIPE
        first = "".join(_read_until_started(process))
        code, rest = _stop(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    err = first + rest
    assert code == 0, err
    assert "Traceback" not in err
    assert "Exception ignored" not in err
    entries = _messages(err)
    warnings = [e["msg"] for e in entries if e["level"] == "warning"]
    assert len(warnings) == 1, warnings
    assert re.fullmatch(
        r"standard output cannot be written \(Broken pipe\): the 'KVMemo listening on' lines"
        r" were not printed; serving on ws://127\.0\.0\.1:\d+/ws, redis://127\.0\.0\.1:\d+",
        str(warnings[0]),
    )
    assert entries[-1]["msg"] == "stopped"


def test_a_read_only_data_directory_is_reported_at_start(tmpfs: Path) -> None:
    # Was: the start logged "recovered 0 keys" and "started" and nothing else:
    # every write then got IO and /healthz answered 503, the log silent on why.
    data = tmpfs / "data"
    data.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True, timeout=10)
    process = subprocess.Popen(
        serve_command("--port", "0", "--resp-port", "0", "--shards", "2", "--dir", str(data)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        first = _read_until_started(process)
        code, rest = _stop(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=False, timeout=10)
    assert code == 0
    entries = _messages("".join(first) + rest)
    # The node's own warning, logged right after "started" (the intent log's
    # warning of the same cause may come before or after it: other tasks).
    after = [e for e in entries[len(first) :] if e["logger"] == "kvmemo"]
    warning = after[0]
    assert warning["level"] == "warning", after
    assert re.fullmatch(
        r"persistence is failing at start: writes get IO errors and /healthz answers 503"
        r" while it lasts: shard-0: Read-only file system: \S+; shard-1: Read-only file"
        r" system: \S+",
        str(warning["msg"]),
    ), warning


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "[fd00::1]", "db.example"])
def test_ports_open_beyond_loopback_without_a_token_are_warned_of(host: str) -> None:
    # Was: nothing said so; a `--host 0.0.0.0` left every key open to the network.
    assert exposure_warning(ServerConfig(host=host)) == (
        f"listening on {host} without --auth-token: any client that reaches it can read and"
        " write every key and stop the server (SHUTDOWN on the Redis port)"
    )
    assert exposure_warning(ServerConfig(host=host, tokens=frozenset({"s3cret"}))) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost", "LOCALHOST"])
def test_a_loopback_address_without_a_token_is_not_warned_of(host: str) -> None:
    assert exposure_warning(ServerConfig(host=host)) is None


# -- /metrics, read strictly -----------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_LABEL = rf"[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE}"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{({_LABEL}(?:,{_LABEL})*)?\}})? (\S+)$")


def strict_exposition_problems(text: str) -> list[str]:
    """What breaks the Prometheus text format 0.0.4 (or its naming conventions) in ``text``.

    Every family has ``# HELP`` then ``# TYPE`` before its samples, and its
    samples follow it with its name (a histogram: ``_bucket`` with ``le``,
    cumulative and ending with ``+Inf``, then ``_sum`` and ``_count``, the
    count equal to the ``+Inf`` bucket); no series twice; values are floats;
    counters end with ``_total`` and nothing else does.
    """
    problems: list[str] = []
    if text and not text.endswith("\n"):
        problems.append("no final newline")
    family: str | None = None
    kinds: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    buckets: dict[str, list[tuple[float, float]]] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            family = line.split(" ", 3)[2]
            if family in kinds:
                problems.append(f"{family}: a second HELP")
            kinds[family] = ""
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            if name != family or kinds.get(name) != "":
                problems.append(f"{name}: TYPE without its HELP just before")
            kinds[name] = kind
            continue
        match = _SAMPLE.match(line)
        if match is None or family is None:
            problems.append(f"not a sample line: {line!r}")
            continue
        name, labels, value = match.groups()
        try:
            number = float(value.replace("Inf", "inf"))
        except ValueError:
            problems.append(f"{name}: value {value!r} is no float")
            continue
        kind = kinds[family]
        allowed = (
            {family}
            if kind != "histogram"
            else {f"{family}{s}" for s in ("_bucket", "_sum", "_count")}
        )
        if name not in allowed:
            problems.append(f"{name}: outside its family {family}")
        if (name, labels or "") in seen:
            problems.append(f"{name}{{{labels}}}: a second time")
        seen.add((name, labels or ""))
        if kind == "histogram":
            pairs = re.findall(rf"([a-zA-Z_][a-zA-Z0-9_]*)=({_LABEL_VALUE})", labels or "")
            rest = ",".join(f"{k}={v}" for k, v in pairs if k != "le")
            series = f"{family}{{{rest}}}"
            if name.endswith("_bucket"):
                le = [v for k, v in pairs if k == "le"]
                if len(le) != 1:
                    problems.append(f"{series}: a bucket without one le")
                    continue
                bound = float(le[0].strip('"').replace("Inf", "inf"))
                buckets.setdefault(series, []).append((bound, number))
            elif name.endswith("_count"):
                counts[series] = number
    for name, kind in kinds.items():
        if kind not in ("counter", "gauge", "histogram", "summary", "untyped"):
            problems.append(f"{name}: unknown type {kind!r}")
        if (kind == "counter") != name.endswith("_total"):
            problems.append(f"{name}: a {kind} {'without' if kind == 'counter' else 'with'} _total")
    for series, points in buckets.items():
        bounds = [b for b, _ in points]
        values = [v for _, v in points]
        if bounds != sorted(bounds) or not bounds or not math.isinf(bounds[-1]):
            problems.append(f"{series}: buckets not in order up to +Inf")
        if values != sorted(values):
            problems.append(f"{series}: buckets not cumulative")
        if values and counts.get(series) != values[-1]:
            problems.append(f"{series}: _count is not the +Inf bucket")
    return problems


def test_the_strict_reader_finds_what_it_is_meant_to_find() -> None:
    bad = (
        "# HELP a_total x\n# TYPE a_total counter\na_total 1\na_total 2\n"
        "# HELP b x\n# TYPE b counter\nb 1\n"
        '# HELP h x\n# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_count 2\n'
        'c{x="unclosed} 1\n'
    )
    problems = strict_exposition_problems(bad)
    assert any("a second time" in p for p in problems)
    assert any("b: a counter without _total" in p for p in problems)
    assert any("not cumulative" in p for p in problems)
    assert any("not a sample line" in p for p in problems)


async def test_metrics_of_a_busy_node_read_strictly_as_prometheus_text() -> None:
    config = ServerConfig(port=0, resp_port=0)
    async with open_node(StoreConfig(shards=2, maxmemory="1MiB"), config) as node:
        kv = node.engine
        await kv.execute("SET", [b"k", b"v", b"EX", b"1"])
        await kv.execute("GET", [b"k"])
        with pytest.raises(kvmemo.KVMemoError):
            await kv.execute("INCR", [b"k"])
        kv.refresh_actor_metrics()
        text = kv.metrics.render_prometheus()
    assert strict_exposition_problems(text) == []
    assert 'kvmemo_command_errors_total{kind="NOT_INTEGER"} 1' in text
    assert re.search(r'^kvmemo_command_duration_seconds_count\{command="set"\} 1$', text, re.M)


def test_the_node_exports_its_version_start_time_and_persistence_problems(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Was: none of them; a scrape could not tell a restart, nor a failing disk
    # (only /healthz said so).
    before = time.time()
    engine, _, _, _ = build(StoreConfig(shards=2), ServerConfig(port=0, resp=False))
    text = engine.metrics.render_prometheus()
    assert f'kvmemo_build_info{{version="{kvmemo.__version__}"}} 1\n' in text
    started = re.search(r"^kvmemo_start_time_seconds (\S+)$", text, re.MULTILINE)
    assert started is not None
    assert before <= float(started[1]) <= time.time()
    assert "\nkvmemo_persistence_problems 0\n" in text
    problems = ["shard-0: Read-only file system: d/shard-0", "shard-1: snapshot failed: x"]
    monkeypatch.setattr(engine, "persistence_problems", lambda: problems)
    assert "\nkvmemo_persistence_problems 2\n" in engine.metrics.render_prometheus()


# -- the actors' lifecycle in the log --------------------------------------------------------


async def test_a_crash_and_its_restart_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    # Was: nothing was logged; a crashing shard showed only as a restart count.
    caplog.set_level(logging.DEBUG, logger="kvmemo.actors")
    config = ServerConfig(port=0, resp=False)
    async with open_node(StoreConfig(shards=2, chaos=True), config) as node:
        async with node.system.events.subscribe() as events:
            assert node.system.kill("shard-1")
            node.system.inject_fault("shard-0", RuntimeError("disk on fire"))
            with contextlib.suppress(kvmemo.KVMemoError):
                await node.engine.execute("GET", [key_on(node.engine, 0)])
            with trio.fail_after(5):
                restarted: set[str] = set()
                async for event in events:
                    if event.kind is EventKind.RESTARTED:
                        restarted.add(event.actor)
                    if restarted == {"shard-0", "shard-1"}:
                        break
        await trio.testing.wait_all_tasks_blocked()  # the node's logger has had them too
    by_message = {r.getMessage(): r for r in caplog.records if r.name == "kvmemo.actors"}
    killed = by_message["shard-1 crashed (chaos: ActorKilled: shard-1 was killed)"]
    assert (killed.levelname, killed.exc_info) == ("WARNING", None)
    crashed = by_message["shard-0 crashed: RuntimeError: disk on fire"]
    assert crashed.levelname == "WARNING"
    assert crashed.exc_info is not None
    assert crashed.exc_info[0] is RuntimeError
    assert by_message["shard-1 restarted"].levelname == "INFO"
    assert by_message["shard-0 restarted"].levelname == "INFO"


def key_on(engine: kvmemo.KVEngine, shard: int) -> bytes:
    n = 0
    while engine.slots.shard_of(b"k%d" % n) != shard:
        n += 1
    return b"k%d" % n


@pytest.mark.parametrize(
    ("kind", "error", "level", "message"),
    [
        (
            EventKind.GAVE_UP,
            RuntimeError("too many"),
            "ERROR",
            "storage gave up: RuntimeError: too many",
        ),
        (
            EventKind.STATE_REBUILT,
            None,
            "WARNING",
            "storage: its state failed its checks and was rebuilt",
        ),
        (EventKind.STARTED, None, "DEBUG", "storage started"),
        (EventKind.STOPPED, None, "DEBUG", "storage stopped"),
    ],
)
def test_each_lifecycle_event_has_its_level(
    caplog: pytest.LogCaptureFixture,
    kind: EventKind,
    error: BaseException | None,
    level: str,
    message: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvmemo.actors")
    log_event(LifecycleEvent(0.0, "storage", kind, error))
    [record] = caplog.records
    assert (record.levelname, record.getMessage()) == (level, message)
