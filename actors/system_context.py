"""``async with open_actor_system(root)``: run a supervision tree for a block."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .supervisor import Supervisor
from .system import ActorSystem


@asynccontextmanager
async def open_actor_system(root: Supervisor) -> AsyncIterator[ActorSystem]:
    """Start ``root`` (every child started, in order) and stop it on exit.

    On exit the tree shuts down in reverse order and every mailbox is closed;
    no task outlives the block. Callers that own a nursery can instead
    ``system = await nursery.start(root.run)``.
    """
    async with trio.open_nursery() as nursery:
        system: ActorSystem = await nursery.start(root.run)
        try:
            yield system
        finally:
            nursery.cancel_scope.cancel()
