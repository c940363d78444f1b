"""A fair readers-writer lock for multi-shard atomicity.

Atomic multi-shard writes (MSET, MSETNX) take it exclusively, so two of them
never hold shards in conflicting orders (no deadlock); multi-shard reads
(MGET) share it, so they run in parallel with each other but never see a
write in part. Waiters are served in arrival order (a writer is not starved
by a stream of readers). Single-shard commands never touch it.
"""

from __future__ import annotations

import collections

import trio


class RWLock:
    """Readers share, a writer is alone; FIFO between them.

    Invariant: ``writer`` implies ``readers == 0``; a waiter is granted only
    by :meth:`_grant`, which pops it from the queue first.
    """

    def __init__(self) -> None:
        self.readers = 0
        self.writer = False
        self._queue: collections.deque[tuple[bool, trio.Event]] = collections.deque()

    async def acquire(self, *, write: bool) -> None:
        """Acquire for writing (exclusive) or reading (shared).

        Raises:
            trio.Cancelled: and then the lock was not taken (a cancelled
                acquire never leaves it held: the caller would not release it).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._queue and not self.writer and (not write or self.readers == 0):
            self._take(write)
            # Yield without a cancellation point: the lock is taken now.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        event = trio.Event()
        entry = (write, event)
        self._queue.append(entry)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release(write=write)
            else:
                self._queue.remove(entry)
                self._grant()
            raise

    def _take(self, write: bool) -> None:
        if write:
            self.writer = True
        else:
            self.readers += 1

    def release(self, *, write: bool) -> None:
        """Release what :meth:`acquire` took."""
        if write:
            self.writer = False
        else:
            self.readers -= 1
        self._grant()

    def _grant(self) -> None:
        while self._queue and not self.writer:
            write, event = self._queue[0]
            if write and self.readers:
                return
            self._queue.popleft()
            self._take(write)
            event.set()
            if write:
                return
