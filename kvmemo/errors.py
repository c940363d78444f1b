"""The errors KVMemo reports to its callers.

Every error a client can cause is a :class:`KVMemoError` subclass whose
``kind`` is the stable machine-readable name of ``PROTOCOL.md`` ("Errors"), and
whose ``code`` is the matching JSON-RPC error code. Front ends translate these
classes, never message texts. A bug of ours is :class:`InternalError`: a
different class, so that it becomes a different wire error (STYLE.md rule 11).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ERROR_KINDS",
    "ArityError",
    "BusyKeyError",
    "CommandSyntaxError",
    "DisabledError",
    "InternalError",
    "KVMemoError",
    "NoAuthError",
    "NotIntegerError",
    "OutOfMemoryError",
    "OverloadedError",
    "PersistenceIOError",
    "RequestTimeoutError",
    "TooLargeError",
    "UnavailableError",
    "UnknownCommandError",
    "WrongTypeError",
]


class KVMemoError(Exception):
    """Base class of every error a KVMemo command can report.

    Attributes:
        kind: the protocol's error kind (``"SYNTAX"``, ``"OOM"``, ...).
        code: the JSON-RPC error code for that kind.
        data: extra machine-readable fields sent as ``error.data``
            (``kind`` is always added by the codec).
    """

    kind: ClassVar[str] = "INTERNAL"
    code: ClassVar[int] = -32603

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ArityError(KVMemoError):
    """Wrong number of arguments for a command."""

    kind = "ARITY"
    code = -32602


class CommandSyntaxError(KVMemoError):
    """Unknown option, conflicting options, malformed argument."""

    kind = "SYNTAX"
    code = -32602


class BusyKeyError(CommandSyntaxError):
    """The command would create a key that exists (RESTORE without REPLACE).

    Kind ``SYNTAX``, as the protocol's kinds have no "key exists" (RENAME's
    missing source is a ``SYNTAX`` error too): a request the client must
    change (add REPLACE, or delete the key first) before it can succeed. A
    class of its own so that the Redis port can answer Redis's ``BUSYKEY``
    error instead of an ``ERR`` one, and embedded callers can catch it.
    """


class UnknownCommandError(KVMemoError):
    """No such command (or method)."""

    kind = "UNKNOWN_METHOD"
    code = -32601


class NotIntegerError(KVMemoError):
    """A value or argument is not an integer, or the result would overflow."""

    kind = "NOT_INTEGER"
    code = -32000


class NoAuthError(KVMemoError):
    """Authentication is required and has not been given, or the token is wrong."""

    kind = "NOAUTH"
    code = -32001


class OutOfMemoryError(KVMemoError):
    """A write was refused: memory is at its limit and nothing can be evicted."""

    kind = "OOM"
    code = -32002


class UnavailableError(KVMemoError):
    """The actor that owns the key is restarting; nothing was applied.

    ``data["retry_after_ms"]`` says when a retry is likely to succeed.
    """

    kind = "UNAVAILABLE"
    code = -32003


class TooLargeError(KVMemoError):
    """A key, value, message or batch is over its configured limit."""

    kind = "TOO_LARGE"
    code = -32004


class OverloadedError(KVMemoError):
    """The session has too many requests in flight; nothing was applied."""

    kind = "OVERLOADED"
    code = -32005


class RequestTimeoutError(KVMemoError):
    """The request did not finish within the deadline.

    ``data["applied"]`` is ``False`` when it certainly did not happen and
    ``None`` when it may have happened.
    """

    kind = "TIMEOUT"
    code = -32006


class DisabledError(KVMemoError):
    """The feature the command needs is not enabled on this server."""

    kind = "DISABLED"
    code = -32007


class PersistenceIOError(KVMemoError):
    """A write could not be made durable; ``data["applied"]`` as for TIMEOUT."""

    kind = "IO"
    code = -32008


class InternalError(KVMemoError):
    """A bug of ours. The session stays open and nothing else is affected."""

    kind = "INTERNAL"
    code = -32603


class WrongTypeError(KVMemoError):
    """Reserved for non-string types (Redis's WRONGTYPE); never raised in version 1."""

    kind = "WRONGTYPE"
    code = -32602


ERROR_KINDS: dict[str, type[KVMemoError]] = {
    cls.kind: cls
    for cls in (
        ArityError,
        CommandSyntaxError,
        UnknownCommandError,
        NotIntegerError,
        NoAuthError,
        OutOfMemoryError,
        UnavailableError,
        TooLargeError,
        OverloadedError,
        RequestTimeoutError,
        DisabledError,
        PersistenceIOError,
        InternalError,
        WrongTypeError,
    )
}
"""Error class by protocol kind, for clients that turn wire errors back into exceptions."""
