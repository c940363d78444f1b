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
from .table import ParseContext, ServerCall, command, container, fixed_reply, subcommand

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


container(
    "pubsub",
    "",
    "inspect the state of the pub/sub channels (subcommands)",
    "1.4",
    [
        subcommand(
            "channels",
            -2,
            "",
            NOKEYS,
            _channels,
            "active channels, those matching a pattern if given",
        ),
        subcommand("help", 2, "", NOKEYS, fixed_reply(PUBSUB_HELP), "show helpful text"),
        subcommand("numpat", 2, "", NOKEYS, _numpat, "the number of pattern subscriptions"),
        subcommand(
            "numsub",
            -2,
            "",
            NOKEYS,
            _numsub,
            "the subscribers of each channel (patterns not counted)",
        ),
    ],
)
