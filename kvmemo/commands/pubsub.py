"""PUBLISH and PUBSUB (CHANNELS / NUMSUB / NUMPAT / HELP): the table's pub/sub commands.

Both are answered by the engine from its :class:`~kvmemo.engine.pubsub.PubSubHub`
(a :class:`~.table.ServerCall`: no shard takes part). Subscribing is not a
command of the table: SUBSCRIBE and its kin change the state of one client
(a Redis connection, a WebSocket session, an embedded subscriber), so each
front end answers them itself, on its own subscriber of the same hub.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import CommandSyntaxError
from .table import FixedReply, ParseContext, Parser, ServerCall, Subcommand, command, container

NOKEYS = (0, 0, 0)

# Redis 7.0's PUBSUB HELP, less the shard channels KVMemo does not have.
PUBSUB_HELP = [
    "PUBSUB <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "CHANNELS [<pattern>]",
    "    Return the currently active channels matching a <pattern> (default: '*').",
    "NUMPAT",
    "    Return number of subscriptions to patterns.",
    "NUMSUB [<channel> ...]",
    "    Return the number of subscribers for the specified channels, excluding",
    "    pattern subscriptions(default: no channels).",
    "HELP",
    "    Prints this help.",
]


@command("publish", 3, "fast ordered", NOKEYS, "post a message to a channel", "1.4")
def _publish(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
    return ServerCall("publish", (args[0], args[1]))


def _help(args: Sequence[bytes], ctx: ParseContext) -> FixedReply:
    return FixedReply("reply", (), PUBSUB_HELP)


def _channels(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
    if len(args) > 1:  # Redis's arity is -2, but its handler takes one pattern at most
        raise CommandSyntaxError(
            "unknown subcommand or wrong number of arguments for 'channels'. Try PUBSUB HELP."
        )
    return ServerCall("pubsub|channels", tuple(args))


def _numsub(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
    return ServerCall("pubsub|numsub", tuple(args))


def _numpat(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
    return ServerCall("pubsub|numpat", ())


def _sub(name: str, arity: int, parse: Parser, summary: str) -> Subcommand:
    return Subcommand(name, arity, frozenset(), 0, 0, 0, parse=parse, summary=summary)


container(
    "pubsub",
    "",
    "inspect the state of the pub/sub channels (subcommands)",
    "1.4",
    [
        _sub("channels", -2, _channels, "active channels, those matching a pattern if given"),
        _sub("help", 2, _help, "show helpful text"),
        _sub("numpat", 2, _numpat, "the number of pattern subscriptions"),
        _sub("numsub", -2, _numsub, "the subscribers of each channel (patterns not counted)"),
    ],
)
