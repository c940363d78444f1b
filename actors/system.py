"""The actor system: the registry of a supervision tree, its events, its chaos API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .actor import ActorInfo, ActorRef, ActorState
from .deadlines import Deadlines
from .errors import InjectedFault, UnknownActor
from .events import EventLog

if TYPE_CHECKING:
    from ._cell import ChildCell
    from .supervisor import Supervisor


class ActorSystem:
    """Every actor and supervisor of one tree, by name.

    Created by the root supervisor's ``run``; nested supervisors register
    their children in their root's system. Names are unique system-wide.
    """

    def __init__(self, root: Supervisor) -> None:
        self.root = root
        self.events = EventLog()
        self.deadlines = Deadlines()
        self._cells: dict[str, ChildCell] = {}

    def check_new_names(self, names: list[str]) -> None:
        """Raise ``ValueError`` unless every name is new to the system and unique."""
        seen = set(self._cells)
        for name in names:
            if name in seen:
                raise ValueError(f"an actor named {name!r} already exists")
            seen.add(name)

    def register(self, cell: ChildCell) -> None:
        """Add a child; its name must be new to the system."""
        if cell.name in self._cells:
            raise ValueError(f"an actor named {cell.name!r} already exists")
        self._cells[cell.name] = cell

    def _cell(self, name: str) -> ChildCell:
        try:
            return self._cells[name]
        except KeyError:
            raise UnknownActor(name) from None

    def ref(self, name: str) -> ActorRef:
        """A reference to the actor named ``name``.

        Raises:
            UnknownActor: no such actor.
        """
        return ActorRef(self._cell(name))

    def names(self, *, supervisors: bool = True) -> list[str]:
        """Every registered name, in registration order."""
        return [n for n, c in self._cells.items() if supervisors or not c.is_supervisor]

    def state(self, name: str) -> ActorState:
        """The current lifecycle state of ``name``."""
        return self._cell(name).state

    def actors(self) -> list[ActorInfo]:
        """A snapshot of every actor and supervisor (name, state, restarts, mailbox)."""
        return [
            ActorInfo(c.name, c.state, c.restarts, c.mailbox_depth(), c.is_supervisor)
            for c in self._cells.values()
        ]

    def kill(self, name: str) -> bool:
        """Kill ``name`` now, as a crash: its supervisor applies its restart policy.

        The message it was handling (if any) fails with ``ActorCrashed``;
        queued messages wait for the next incarnation.

        Returns:
            False when the actor was not running (restarting or stopped).
        """
        return self._cell(name).kill()

    def inject_fault(self, name: str, error: BaseException | None = None) -> None:
        """Make ``name`` crash with ``error`` before it handles its next message.

        That message's asker gets ``ActorCrashed`` with ``handler_started``
        False: the message had no effect.
        """
        self._cell(name).fault = (
            error if error is not None else InjectedFault(f"fault injected into {name}")
        )

    def info(self) -> dict[str, Any]:
        """A JSON-ready snapshot of every actor."""
        return {
            a.name: {"state": a.state.value, "restarts": a.restarts, "mailbox": a.mailbox}
            for a in self.actors()
        }
