"""Redis port, stop 23: COMMAND INFO's flags that clients route on agree with Redis."""

from __future__ import annotations

from typing import Any

from test_redis_differential import Pair, _plain, pair, servers  # noqa: F401 (fixtures)

ROUTED_FLAGS = (b"write", b"readonly", b"denyoom")


def test_write_readonly_and_denyoom_flags_agree_with_redis(pair: Pair) -> None:  # noqa: F811
    """A client that refuses ``denyoom`` commands under memory pressure must still
    send DEL, EXPIRE, RENAME, FLUSHALL... (Redis does not flag them so)."""
    names = [item[1] for item in pair.kvmemo.call("COMMAND", "LIST")[1][1]]
    r, k = pair.both("COMMAND", "INFO", *names)
    compared = 0
    for name, ri, ki in zip(names, _plain(r[1]), _plain(k[1]), strict=True):
        if ri is None or ki is None:  # a command only one of them has
            continue
        compared += 1
        assert _routed(ki) == _routed(ri), name
    assert compared >= 60


def _routed(info: list[Any]) -> set[bytes]:
    return {flag for flag in info[2] if flag in ROUTED_FLAGS}
