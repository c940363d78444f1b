"""Three KVMemo nodes behind twemproxy (nutcracker): one Redis address, keys spread by ketama.

Run: ``python examples/cluster/run_cluster.py`` (``just cluster``). It

1. starts three ``kvmemo serve --port 0 --resp-port 0`` nodes on loopback and
   reads the ports they print;
2. fills in ``nutcracker.yml`` (next to this file) with those ports and writes
   it to a temporary directory;
3. starts ``nutcracker`` on a free port (or ``--proxy-port``) and prints its
   address: ``redis-cli -p PORT`` / redis-py / redis-benchmark go there;
4. stops everything on Ctrl-C or SIGTERM (or when nutcracker exits).

A node that dies is left dead: nutcracker ejects it (``auto_eject_hosts``) and
keeps serving the keys of the others (``--retry-timeout-ms`` later it tries the
node again). Twemproxy's statistics (JSON, one snapshot per connection) are on
the stats port it prints.

Needs ``nutcracker`` (Debian: ``apt-get install -y nutcracker``, installed in
``/usr/sbin``). The functions here are reused by ``tests/test_cluster.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEMPLATE = HERE / "nutcracker.yml"
NODES = 3
HOST = "127.0.0.1"
POOL = "kvmemo"  # the pool's name in nutcracker.yml (its key in the statistics)
RETRY_TIMEOUT_MS = 30_000  # server_retry_timeout: how long an ejected node stays out
START_TIMEOUT = 15.0  # seconds for a node or the proxy to come up
STOP_TIMEOUT = 8.0  # seconds between SIGTERM and SIGKILL

Output = IO[Any] | int | None  # what subprocess accepts for stderr


def find_nutcracker() -> str | None:
    """The nutcracker binary: on PATH, else where Debian puts it (``/usr/sbin``)."""
    found = shutil.which("nutcracker")
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(folder) / "nutcracker"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _exited(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to exit, without reaping it (its group id stays
    ours until it is reaped, so the group can still be signalled safely)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def stop_process(
    proc: subprocess.Popen[Any], *, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT
) -> None:
    """Signal the process group of ``proc``, SIGKILL it if it lingers, reap it.

    ``proc`` must lead its own process group (``start_new_session=True``).
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        if not _exited(proc.pid, timeout):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            _exited(proc.pid, timeout)
        # The leader is a zombie, not yet reaped: nothing else can hold its group id, so
        # any process it left behind in its group can be killed without risk.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            stream.close()


@dataclass
class Node:
    """One ``kvmemo serve`` process."""

    name: str
    proc: subprocess.Popen[bytes]
    host: str
    port: int  # Redis protocol
    ws_url: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _read_lines(proc: subprocess.Popen[bytes], count: int, timeout: float) -> list[str]:
    """The first ``count`` stdout lines of ``proc``, within ``timeout`` seconds."""
    assert proc.stdout is not None
    lines: list[str] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while len(lines) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise RuntimeError(f"no startup line within {timeout:.0f} s: {lines}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"exited with status {proc.wait()} before starting: {lines}")
            buffer += chunk
            while b"\n" in buffer and len(lines) < count:
                line, buffer = buffer.split(b"\n", 1)
                lines.append(line.decode().strip())
    return lines


def spawn_node(
    *,
    host: str = HOST,
    args: Sequence[str] = (),
    stderr: Output = None,
    python: str = sys.executable,
) -> subprocess.Popen[bytes]:
    """Start ``kvmemo serve`` on free ports, in its own process group (not yet listening)."""
    command = [python, "-m", "kvmemo", "serve", "--host", host, "--port", "0"]
    command += ["--resp-port", "0", "--log-level", "warning", *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )


def node_ready(name: str, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> Node:
    """Wait for a spawned node's two startup lines (its URLs); the node they name."""
    try:
        ws_line, resp_line = _read_lines(proc, 2, timeout)
        prefix = "KVMemo listening on redis://"
        if not resp_line.startswith(prefix):
            raise RuntimeError(f"unexpected startup line {resp_line!r}")
    except RuntimeError as exc:
        raise RuntimeError(f"node {name}: {exc}") from None
    resp_host, _, port = resp_line[len(prefix) :].rpartition(":")
    return Node(name, proc, resp_host, int(port), ws_line.rpartition(" ")[2])


def start_node(name: str, **options: Any) -> Node:
    """One node, listening (``options`` as :func:`spawn_node`); stopped if it fails to start."""
    proc = spawn_node(**options)
    try:
        return node_ready(name, proc)
    except BaseException:
        stop_process(proc, sig=signal.SIGKILL)
        raise


def render_config(
    nodes: Sequence[Node],
    listen: str,
    *,
    retry_timeout_ms: int = RETRY_TIMEOUT_MS,
    template: str | None = None,
) -> str:
    """``nutcracker.yml`` with the nodes' addresses and the proxy's ``host:port``."""
    text = TEMPLATE.read_text() if template is None else template
    values = {f"node{i}": node.address for i, node in enumerate(nodes, 1)}
    return string.Template(text).substitute(
        values, listen=listen, server_retry_timeout=retry_timeout_ms
    )


@dataclass
class Proxy:
    """The nutcracker process."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    stats_port: int
    config: Path

    def stats(self, timeout: float = 2.0) -> dict[str, Any]:
        """One snapshot of twemproxy's statistics (it sends JSON, then closes)."""
        with socket.create_connection((self.host, self.stats_port), timeout=timeout) as sock:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        stats: dict[str, Any] = json.loads(data)
        return stats


def _wait_listening(proc: subprocess.Popen[bytes], host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nutcracker exited with status {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nutcracker not listening on {host}:{port}") from None
            time.sleep(0.05)


def start_proxy(
    nodes: Sequence[Node],
    workdir: Path,
    *,
    host: str = HOST,
    port: int = 0,
    retry_timeout_ms: int = RETRY_TIMEOUT_MS,
    stats_interval_ms: int = 1000,
    stderr: Output = None,
) -> Proxy:
    """Write the configuration into ``workdir`` and start nutcracker; wait until it listens.

    ``port`` 0 picks a free port (retried if another process takes it first).
    """
    binary = find_nutcracker()
    if binary is None:
        raise RuntimeError("nutcracker is not installed (apt-get install -y nutcracker)")
    config = workdir / "nutcracker.yml"
    attempts = 3 if port == 0 else 1
    for attempt in range(attempts):
        listen_port = port or free_port(host)
        stats_port = free_port(host)
        config.write_text(
            render_config(nodes, f"{host}:{listen_port}", retry_timeout_ms=retry_timeout_ms)
        )
        check = subprocess.run(
            [binary, "--test-conf", "--conf-file", str(config)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if check.returncode != 0:
            raise RuntimeError(f"nutcracker rejects {config}: {check.stderr.strip()}")
        proc = subprocess.Popen(
            [
                binary,
                "--conf-file",
                str(config),
                "--stats-addr",
                host,
                "--stats-port",
                str(stats_port),
                "--stats-interval",
                str(stats_interval_ms),
                "--pid-file",
                str(workdir / "nutcracker.pid"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            _wait_listening(proc, host, listen_port, START_TIMEOUT)
        except BaseException:
            stop_process(proc, sig=signal.SIGKILL)
            if attempt + 1 < attempts:
                continue
            raise
        return Proxy(proc, host, listen_port, stats_port, config)
    raise AssertionError("unreachable")


@dataclass
class Cluster:
    nodes: list[Node]
    proxy: Proxy
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://{self.proxy.host}:{self.proxy.port}"


@contextlib.contextmanager
def open_cluster(
    workdir: Path,
    *,
    host: str = HOST,
    proxy_port: int = 0,
    node_args: Sequence[str] = (),
    retry_timeout_ms: int = RETRY_TIMEOUT_MS,
    stats_interval_ms: int = 1000,
    stderr: Output = None,
) -> Iterator[Cluster]:
    """Three nodes and nutcracker in front of them; everything stopped on exit."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(NODES):  # all at once: they start in parallel
            processes.append(spawn_node(host=host, args=node_args, stderr=stderr))
        nodes = [node_ready(f"kvmemo-{i}", proc) for i, proc in enumerate(processes, 1)]
        proxy = start_proxy(
            nodes,
            workdir,
            host=host,
            port=proxy_port,
            retry_timeout_ms=retry_timeout_ms,
            stats_interval_ms=stats_interval_ms,
            stderr=stderr,
        )
        processes.append(proxy.proc)
        yield Cluster(nodes, proxy, workdir, processes)
    finally:
        # SIGTERM to all (the proxy first: no new requests), then wait for each in turn.
        for proc in reversed(processes):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(processes):
            stop_process(proc)


class _Stop(Exception):
    """SIGTERM or SIGINT arrived."""


def _raise_stop(signum: int, frame: object) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=HOST, help="address of the nodes and the proxy")
    parser.add_argument("--proxy-port", type=int, default=0, help="proxy port (0: a free one)")
    parser.add_argument("--shards", type=int, default=16, help="shards per node")
    parser.add_argument(
        "--retry-timeout-ms",
        type=int,
        default=RETRY_TIMEOUT_MS,
        help="how long an ejected node stays out of the ring",
    )
    args = parser.parse_args(argv)
    if find_nutcracker() is None:
        print("nutcracker is not installed: apt-get install -y nutcracker", file=sys.stderr)
        return 1
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="kvmemo-cluster-") as tmp,
            open_cluster(
                Path(tmp),
                host=args.host,
                proxy_port=args.proxy_port,
                node_args=["--shards", str(args.shards)],
                retry_timeout_ms=args.retry_timeout_ms,
            ) as cluster,
        ):
            for node in cluster.nodes:
                print(f"{node.name}: redis://{node.address}  {node.ws_url}  pid {node.proc.pid}")
            proxy = cluster.proxy
            print(
                f"nutcracker: pid {proxy.proc.pid}, config {proxy.config},"
                f" stats {proxy.host}:{proxy.stats_port} (JSON)"
            )
            print(f"KVMemo cluster listening on {cluster.url}", flush=True)
            print("Ctrl-C to stop", flush=True)
            dead: set[str] = set()
            while True:
                if cluster.proxy.proc.poll() is not None:
                    print(f"nutcracker exited ({cluster.proxy.proc.returncode})", file=sys.stderr)
                    return 1
                for node in cluster.nodes:
                    if node.name not in dead and node.proc.poll() is not None:
                        dead.add(node.name)
                        print(
                            f"{node.name} exited ({node.proc.returncode}); nutcracker ejects it",
                            file=sys.stderr,
                            flush=True,
                        )
                time.sleep(0.5)
    except _Stop as stop:
        print(f"{stop}: stopping", flush=True)
    except RuntimeError as exc:
        print(f"run_cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
