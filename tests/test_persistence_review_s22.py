"""Review of the torn-tail checks: a bounded search; covered segments removed past a stuck one."""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from kvmemo.persistence import records
from kvmemo.persistence.records import Torn, decode_stream, encode_set


class _CountingZlib:
    """``zlib`` with a count of the bytes ``crc32`` was given."""

    def __init__(self) -> None:
        self.crc_bytes = 0

    def crc32(self, data: Any, value: int = 0) -> int:
        self.crc_bytes += len(data)
        return zlib.crc32(data, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(zlib, name)


def _torn_with_key(key: bytes) -> bytes:
    """A whole record, then a SET of ``key`` cut inside its key (a crash mid-append)."""
    whole = encode_set(b"a", b"1")
    torn = encode_set(key, b"v")[: 14 + len(key) - 10]
    return whole + torn


def _header_lookalikes(size: int) -> bytes:
    unit = b"\0\0\0\0\x01\x01" + struct.pack("<I", 1 << 20)
    return (unit * (size // len(unit) + 1))[:size]


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(_header_lookalikes(2 << 20), id="header-lookalikes"),
        pytest.param(b"\x01" * (1 << 20), id="version-bytes"),
        pytest.param(random.Random(7).randbytes(4 << 20), id="random"),
    ],
)
def test_the_torn_key_search_costs_no_more_than_the_torn_key_is_long(
    key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: every 0x01 byte whose payload length fitted the rest was CRC'd to
    # the end: 43 s for the 2 MiB lookalike key, hours for larger ones.
    counting = _CountingZlib()
    monkeypatch.setattr(records, "zlib", counting)
    data = _torn_with_key(key)
    result = decode_stream(data)
    assert len(result.records) == 1
    assert result.problem == Torn(len(encode_set(b"a", b"1")))
    assert counting.crc_bytes <= 2 * len(data)


def test_a_burst_over_both_lengths_is_still_found_with_a_record_after() -> None:
    # The search still does its job: a whole record after the damaged one.
    first = encode_set(b"k1", b"v1")
    hit = bytearray(encode_set(b"k2", b"v2"))
    hit[6:14] = struct.pack("<II", 0x00400030, 0x00400000)  # payload and key lengths
    after = encode_set(b"k3", b"v3")
    result = decode_stream(first + bytes(hit) + after)
    assert len(result.records) == 1
    assert not isinstance(result.problem, Torn)
    assert result.problem is not None
    assert result.problem.offset == len(first)


def _segment(tmp_path: Path, body: bytes) -> Path:
    shard = tmp_path / "shard-0"
    shard.mkdir()
    (shard / "wal-00000001.log").write_bytes(body)
    return shard


def test_one_undeletable_covered_segment_does_not_keep_the_later_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: remove_through stopped at its first OSError, oldest first: one
    # segment that could not be deleted kept every later covered one forever.
    from kvmemo.persistence import wal
    from kvmemo.persistence.records import Op, Record

    with wal.SegmentedLog(tmp_path / "shard") as log:
        numbers = []
        for i in range(4):
            log.append([Record(Op.SET, b"k%d" % i, b"v")])
            numbers.append(log.rotate())
        stuck = log.path(numbers[0])
        real_unlink = os.unlink

        def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            if Path(path) == stuck:
                raise PermissionError(1, "Operation not permitted", str(path))
            real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(wal.os, "unlink", unlink)
        log.failed_syncs.add(numbers[0])
        with pytest.raises(PermissionError):
            log.remove_through(numbers[-1])
        assert stuck.exists()
        assert [log.path(n).exists() for n in numbers[1:]] == [False] * 3
        assert log.count_through(numbers[-1]) == 1  # the one left, retried later
        assert numbers[0] not in log.failed_syncs  # covered: its sync no longer matters
        monkeypatch.setattr(wal.os, "unlink", real_unlink)
        log.remove_through(numbers[-1])
        assert not stuck.exists()
        assert log.count_through(numbers[-1]) == 0


def test_a_burst_before_a_long_run_of_version_bytes_is_still_found() -> None:
    # A SET whose value is 300 KiB of 0x01 (a bitmap), both its length fields
    # hit, then a whole record: the search must reach it (a cap of 2**18
    # candidates, counted from the damaged key, did not).
    first = encode_set(b"k1", b"v1")
    hit = bytearray(encode_set(b"k2", b"\x01" * (300 << 10)))
    hit[6:14] = struct.pack("<II", 0x00400030, 0x00400000)
    after = encode_set(b"k3", b"v3")
    result = decode_stream(first + bytes(hit) + after)
    assert not isinstance(result.problem, Torn)
    assert result.problem is not None
    assert result.problem.offset == len(first)
