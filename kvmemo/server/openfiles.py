"""The open-file budget: how many clients the Redis port can promise to take.

Design
------
Problem: every connection holds one file descriptor, and a process holds at
most its soft ``RLIMIT_NOFILE`` (``ulimit -n``) of them. Past it accept(2)
fails (``EMFILE``) and a client waits in the kernel's backlog (both ports
retry the accept), however far the port is from ``maxclients``: a
``maxclients`` above the limit promises connections the process cannot open.

Approach: as Redis's ``adjustOpenFilesLimit`` (server.c) does, the Redis
port's ``maxclients`` stays within the limit less the descriptors the
process keeps for itself (:func:`reserved_fds`):

- ``RESERVED_FDS`` (Redis's ``CONFIG_MIN_RESERVED_FDS``): the standard
  streams, both ports' listening sockets, trio's epoll and wake-up sockets,
  a certificate or a static file being read, the data directory's ``LOCK``
  and intents log (a node without persistence holds about 12);
- with persistence, ``FDS_PER_DURABLE_SHARD`` per shard: its log, and while
  it saves, the snapshot being written and its directory (opened to sync).

At start (:func:`serve_resp`) a larger ``maxclients`` is lowered to that
budget with a warning; ``CONFIG SET maxclients`` above it fails with Redis's
words (config.c's ``updateMaxclients``). The limit is read at each use, so
one raised while the node runs (``prlimit --pid``) counts at the next CONFIG
SET. Unlike Redis, KVMemo never raises its own soft limit toward the hard
one: it runs within the limit it was given.

The WebSocket port's connections (sessions and plain HTTP requests) draw on
the same descriptors, first come first served: the budget is the process's,
which the Redis port may have to itself when the WebSocket port is idle.
Taking ``--max-sessions`` out of it instead would leave the Redis port
nothing under the common ``ulimit -n`` of 1024 with the default 10,000
sessions. For both ports to keep their limits at once, the limit must be at
least the reserve plus ``maxclients`` plus ``--max-sessions`` (README).

Invariant: after the start of the Redis port with a budget, its
``max_clients`` is at most :meth:`OpenFiles.clients_allowed` as read then,
and no CONFIG SET takes it above the budget read at that CONFIG SET.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import attrs

RESERVED_FDS: Final = 32  # descriptors kept for the process itself (Redis: the same 32)
FDS_PER_DURABLE_SHARD: Final = 3  # with persistence: a log, a snapshot and its directory


def soft_limit() -> int | None:
    """The process's soft ``RLIMIT_NOFILE`` (``ulimit -n``); None: unlimited, or no such limit."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def reserved_fds(shards: int, persistent: bool) -> int:
    """Descriptors a node keeps for itself: ``RESERVED_FDS``, plus its shards' files
    when persistence is on (``FDS_PER_DURABLE_SHARD`` each)."""
    return RESERVED_FDS + (FDS_PER_DURABLE_SHARD * shards if persistent else 0)


@attrs.frozen
class OpenFiles:
    """The file descriptors the Redis port's clients may hold.

    Attributes:
        reserved: descriptors kept for the process itself (:func:`reserved_fds`).
        read_limit: reads the open-file limit now (None: none); tests inject one.
    """

    reserved: int = RESERVED_FDS
    read_limit: Callable[[], int | None] = soft_limit

    def clients_allowed(self) -> int | None:
        """The most clients the limit allows now (its value less ``reserved``;
        0 or less: none); None when there is no limit."""
        limit = self.read_limit()
        return None if limit is None else limit - self.reserved

    def lowered(self, wanted: int, allowed: int) -> str:
        """The start warning of a ``maxclients`` of ``wanted`` lowered to ``allowed``."""
        limit = allowed + self.reserved
        return (
            f"maxclients lowered from {wanted} to {allowed}: the open-file limit (ulimit -n)"
            f" is {limit} and {self.reserved} descriptors are kept for the process; for"
            f" {wanted} Redis clients raise it to at least {wanted + self.reserved}, plus"
            " --max-sessions for the WebSocket port's connections, which use the same"
            " descriptors (KVMemo does not raise it itself)"
        )


def too_many_clients(allowed: int) -> str:
    """CONFIG SET maxclients' reason past the budget, in Redis's words."""
    return (
        "The operating system is not able to handle the specified number of clients,"
        f" try with {max(allowed, 0)}"
    )
