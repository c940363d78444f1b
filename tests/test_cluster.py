"""Three KVMemo nodes behind twemproxy (nutcracker), as ``examples/cluster`` starts them.

Skipped when ``nutcracker`` is not installed (CI installs it: Debian's
``nutcracker``, in ``/usr/sbin``). The nodes and the proxy are subprocesses
started by the launcher's own functions (``examples/cluster/run_cluster.py``),
each in its own process group; the fixture stops them all, whatever happens.
The client is redis-py, in RESP2 and without ``CLIENT SETINFO``: twemproxy
forwards only key-based commands and closes the connection on any other
(``HELLO``, ``CLIENT``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "examples" / "cluster" / "run_cluster.py"


def _load_launcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvmemo_example_run_cluster", LAUNCHER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run_cluster = _load_launcher()

pytestmark = [
    pytest.mark.skipif(run_cluster.find_nutcracker() is None, reason="nutcracker not installed"),
    pytest.mark.slow,
]

KEYS = 10_000
CHUNK = 500  # commands per pipeline round trip
DEADLINE = 20.0  # seconds for the proxy to eject a dead node
TEST_TIMEOUT = 60  # seconds per test (SIGALRM)


def connect(host: str, port: int) -> redis.Redis:
    """redis-py as twemproxy needs it: RESP2, no ``CLIENT SETINFO`` on connect."""
    options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5, "protocol": 2}
    if "driver_info" in inspect.signature(redis.Redis).parameters:
        options["driver_info"] = None
    else:  # redis-py < 7
        options.update(lib_name=None, lib_version=None)
    return redis.Redis(host, port, **options)


def write(client: redis.Redis, keys: list[str]) -> None:
    for start in range(0, len(keys), CHUNK):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + CHUNK]:
            pipe.set(key, f"value-of-{key}")
        assert pipe.execute() == [True] * len(keys[start : start + CHUNK])


def read(client: redis.Redis, keys: list[str]) -> list[object]:
    """Each key's value, or the exception the proxy answered for it."""
    values: list[object] = []
    for start in range(0, len(keys), CHUNK):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + CHUNK]:
            pipe.get(key)
        values += pipe.execute(raise_on_error=False)
    return values


def expected(keys: list[str]) -> list[object]:
    return [f"value-of-{key}".encode() for key in keys]


def _expire(signum: int, frame: object) -> None:
    raise TimeoutError(f"test over {TEST_TIMEOUT} s")


@contextlib.contextmanager
def time_limit() -> Iterator[None]:
    """SIGALRM after ``TEST_TIMEOUT`` s; cancelled when the block ends (before any cleanup
    outside it, which the alarm must never cut short)."""
    previous = signal.signal(signal.SIGALRM, _expire)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Any]:
    """Three nodes (4 shards each) and nutcracker; all stopped afterwards.

    The time limit covers the start and the test; it is off while everything stops
    (bounded by the launcher: SIGTERM, then SIGKILL after a few seconds).
    """
    with (
        open(tmp_path / "cluster.log", "wb") as log,
        time_limit(),
        run_cluster.open_cluster(
            tmp_path,
            node_args=["--shards", "4"],
            retry_timeout_ms=120_000,  # a dead node stays out for the whole test
            stats_interval_ms=100,
            stderr=log,
        ) as cluster,
    ):
        try:
            yield cluster
        finally:
            signal.alarm(0)


def node_client(node: Any) -> redis.Redis:
    return connect(node.host, node.port)


def test_keys_are_spread_over_the_nodes_and_read_back(cluster: Any) -> None:
    proxy = connect(cluster.proxy.host, cluster.proxy.port)
    keys = [f"key:{i}" for i in range(KEYS)]
    write(proxy, keys)
    assert read(proxy, keys) == expected(keys)
    sizes = [node_client(node).dbsize() for node in cluster.nodes]
    assert sum(sizes) == KEYS, sizes
    # ketama over three equal weights: about a third each (seen with md5:
    # 36%, 31%, 34%); a short run of similar keys too (with the fnv1a_64 key
    # hash, 300 keys dist:N went 100/10/190)
    assert all(size > KEYS // 5 for size in sizes), sizes
    few = [f"dist:{i}" for i in range(300)]
    write(proxy, few)
    shares = [len(node_client(node).keys("dist:*")) for node in cluster.nodes]
    assert sum(shares) == len(few), shares
    assert min(shares) > len(few) // 5, shares
    assert proxy.delete(*few) == len(few)
    # a multi-key command is split by the proxy and reassembled
    assert proxy.mget(keys[:50]) == expected(keys[:50])
    assert proxy.delete(*keys[:50]) == 50
    assert sum(node_client(node).dbsize() for node in cluster.nodes) == KEYS - 50


def test_a_dead_node_is_ejected_and_the_others_keep_serving(cluster: Any) -> None:
    proxy = connect(cluster.proxy.host, cluster.proxy.port)
    keys = [f"key:{i}" for i in range(KEYS)]
    write(proxy, keys)
    owner = {}
    for node in cluster.nodes:
        for key in node_client(node).keys("*"):
            owner[key.decode()] = node.name
    assert len(owner) == KEYS

    victim = cluster.nodes[1]
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(timeout=10)
    lost = [key for key in keys if owner[key] == victim.name]
    kept = [key for key in keys if owner[key] != victim.name]

    # Requests for the dead node's keys fail until the proxy ejects it; then they are
    # hashed onto the survivors (where those keys do not exist).
    deadline = time.monotonic() + DEADLINE
    failures = 0
    while True:
        try:
            assert proxy.get(lost[failures % len(lost)]) is None
            break
        except (redis.ResponseError, redis.ConnectionError):
            failures += 1
            assert time.monotonic() < deadline, f"not ejected after {failures} failures"
            time.sleep(0.02)
    assert failures >= 1  # the proxy did notice the dead node

    while True:  # twemproxy's statistics say the same (refreshed every 100 ms)
        pool = cluster.proxy.stats()[run_cluster.POOL]
        if pool["server_ejects"] >= 1 and pool[victim.name]["server_ejected_at"] > 0:
            break
        assert time.monotonic() < deadline, pool
        time.sleep(0.1)

    assert read(proxy, kept) == expected(kept)
    fresh = [f"fresh:{i}" for i in range(1000)]
    write(proxy, fresh)
    assert read(proxy, fresh) == expected(fresh)
    survivors = [node for node in cluster.nodes if node is not victim]
    assert sum(node_client(node).dbsize() for node in survivors) == len(kept) + len(fresh)


def test_the_launcher_stops_everything_on_sigterm(tmp_path: Path) -> None:
    pids: list[int] = []
    with open(tmp_path / "launcher.err", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--shards", "2"],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            with time_limit():
                lines = run_cluster._read_lines(proc, 5, 30)
                assert lines[-1].startswith("KVMemo cluster listening on redis://"), lines
                host, _, port = lines[-1].rpartition("redis://")[2].rpartition(":")
                assert connect(host, int(port)).set("k", "v") is True
                pids += [int(re.findall(r"pid (\d+)", line)[0]) for line in lines[:4]]
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0
                assert proc.stdout is not None
                assert b"stopped" in proc.stdout.read()
                for pid in pids:  # the launcher reaped its nodes and nutcracker: all gone
                    with pytest.raises(ProcessLookupError):
                        os.kill(pid, 0)
        finally:
            run_cluster.stop_process(proc)  # SIGTERM: the launcher stops what it started
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
