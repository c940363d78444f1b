"""How a supervisor starts, restarts and stops its children (OTP's child specs)."""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from .actor import Actor, ActorContext
    from .supervisor import Supervisor

# Messages; enough to absorb a burst of asks, small enough to push back on a flood.
DEFAULT_MAILBOX_CAPACITY = 1024
DEFAULT_SHUTDOWN_TIMEOUT = 5.0  # seconds a child gets to stop gracefully before it is cancelled


class Strategy(enum.Enum):
    """Which children a supervisor restarts when one fails."""

    ONE_FOR_ONE = "one_for_one"  # only the failed child
    ONE_FOR_ALL = "one_for_all"  # every child
    REST_FOR_ONE = "rest_for_one"  # the failed child and those started after it


class RestartType(enum.Enum):
    """When a child that exited is restarted."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after an abnormal exit (crash or kill)
    TEMPORARY = "temporary"  # never


def _positive(name: str) -> Callable[[Any, attrs.Attribute[Any], float], None]:
    def check(_: Any, __: attrs.Attribute[Any], value: float) -> None:
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")

    return check


@attrs.frozen
class Intensity:
    """Restart intensity: more than ``max_restarts`` restarts within ``period`` seconds
    makes the supervisor give up (stop its children and fail, escalating to its parent).
    """

    max_restarts: int = 3
    period: float = attrs.field(default=5.0, validator=_positive("period"))

    def __attrs_post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")


@attrs.frozen
class Backoff:
    """Delay before a restart: exponential in the child's consecutive failures,
    capped, with multiplicative jitter.

    ``delay(n) = min(maximum, initial * factor ** (n - 1)) * (1 + jitter * u)``
    with ``u`` uniform in [-1, 1]; a child that ran for ``reset_after`` seconds
    without failing starts again from ``n = 1``.
    """

    initial: float = 0.005  # seconds
    maximum: float = 1.0  # seconds
    factor: float = 2.0
    jitter: float = 0.1  # fraction of the delay
    reset_after: float = 5.0  # seconds of stable running

    def __attrs_post_init__(self) -> None:
        if self.initial < 0:
            raise ValueError(f"initial must be >= 0, got {self.initial}")
        if self.maximum < self.initial:
            raise ValueError(f"maximum must be >= initial, got {self.maximum}")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait before restart number ``failures`` (>= 1)."""
        base = min(self.maximum, self.initial * self.factor ** max(0, failures - 1))
        if self.jitter:
            base *= 1 + self.jitter * rng.uniform(-1.0, 1.0)
        return min(base, self.maximum * (1 + self.jitter))


@attrs.frozen
class StateHooks:
    """State that outlives an actor's incarnations (like an ETS table with an heir).

    Attributes:
        initial: builds the state before the first start.
        check: the invariant check run before a restart hands the state over;
            it returns False (or raises) when the state cannot be trusted.
        rebuild: builds a trustworthy state after ``check`` rejected one; it
            gets the rejected state (to salvage what it can, or to rebuild from
            persistence or peers).
    """

    initial: Callable[[], Any]
    check: Callable[[Any], bool]
    rebuild: Callable[[Any], Any]


@attrs.frozen
class ChildSpec:
    """How to run one child of a supervisor.

    Attributes:
        name: unique in the whole actor system.
        start: builds a fresh actor for each incarnation from its context
            (``None`` when ``supervisor`` is given).
        supervisor: a nested supervisor to run as this child instead.
        restart: when to restart it.
        mailbox_capacity: bound of its mailbox (messages).
        shutdown_timeout: seconds it gets to stop gracefully.
        state: optional state that outlives incarnations.
    """

    name: str
    start: Callable[[ActorContext], Actor] | None = None
    supervisor: Supervisor | None = None
    restart: RestartType = RestartType.PERMANENT
    mailbox_capacity: int = DEFAULT_MAILBOX_CAPACITY
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    state: StateHooks | None = None

    def __attrs_post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if (self.start is None) == (self.supervisor is None):
            raise ValueError(f"child {self.name!r} needs exactly one of start or supervisor")
        if self.mailbox_capacity < 1:
            raise ValueError(f"mailbox_capacity must be >= 1, got {self.mailbox_capacity}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")

    @classmethod
    def for_supervisor(
        cls, supervisor: Supervisor, *, restart: RestartType = RestartType.PERMANENT
    ) -> ChildSpec:
        """A child spec that runs a nested supervisor under its own name."""
        return cls(supervisor.name, supervisor=supervisor, restart=restart)
