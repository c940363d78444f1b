"""``kvmemo serve`` and SIGHUP: a closed terminal stops it gracefully, ``nohup`` keeps it.

Was: SIGHUP's default action ended the process on the spot, without the
drain or the shards' final snapshots (the next start replayed the whole log).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from test_cli import EXIT_TIMEOUT, START_TIMEOUT, env, finish, serve_command

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")


def _start(data: Path, *, hangup_ignored: bool = False) -> tuple[subprocess.Popen[str], int]:
    """A node on free ports with one shard in ``data``; the process and its Redis port."""

    def ignore_hangup() -> None:  # what nohup does before it execs the command
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    process = subprocess.Popen(
        serve_command("--port", "0", "--resp-port", "0", "--shards", "1", "--dir", str(data)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        preexec_fn=ignore_hangup if hangup_ignored else None,
    )
    assert process.stdout is not None
    process.stdout.readline()  # KVMemo listening on ws://...
    second = process.stdout.readline()  # KVMemo listening on redis://HOST:PORT
    assert second.startswith("KVMemo listening on redis://"), second
    return process, int(second.rsplit(":", 1)[1])


def _set(port: int, key: str, value: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT) as conn:
        conn.sendall(f"SET {key} {value}\r\n".encode())
        assert conn.recv(16) == b"+OK\r\n"


def _stop_messages(process: subprocess.Popen[str]) -> tuple[int, list[str]]:
    try:
        code, _, err = finish(process, EXIT_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return code, [json.loads(line)["msg"] for line in err.splitlines() if line.strip()]


def test_sighup_stops_the_node_gracefully_with_its_final_snapshot(tmp_path: Path) -> None:
    data = tmp_path / "data"
    process, port = _start(data)
    _set(port, "k", "v")
    assert not list((data / "shard-0").glob("snap-*"))
    process.send_signal(signal.SIGHUP)
    code, messages = _stop_messages(process)
    assert code == 0, messages
    assert "SIGHUP: shutting down" in messages
    assert messages[-1] == "stopped"
    assert len(list((data / "shard-0").glob("snap-*"))) == 1  # the final snapshot


def test_a_node_started_with_sighup_ignored_outlives_a_hangup(tmp_path: Path) -> None:
    process, port = _start(tmp_path / "data", hangup_ignored=True)
    process.send_signal(signal.SIGHUP)  # dropped by the kernel: ignored
    _set(port, "k", "v")  # still serving
    process.send_signal(signal.SIGTERM)
    code, messages = _stop_messages(process)
    assert code == 0, messages
    assert "SIGTERM: shutting down" in messages
    assert not any("SIGHUP" in m for m in messages), messages
