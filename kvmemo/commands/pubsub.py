"""PUBLISH, SPUBLISH and PUBSUB (CHANNELS / NUMSUB / NUMPAT / SHARDCHANNELS /
SHARDNUMSUB / HELP): the table's pub/sub commands.

Both are answered by the engine from its :class:`~kvmemo.engine.pubsub.PubSubHub`
(a :class:`~.table.ServerCall`: no shard takes part). Subscribing is not a
command of the table: SUBSCRIBE and its kin change the state of one client
(a Redis connection, a WebSocket session, an embedded subscriber), so each
front end answers them itself, on its own subscriber of the same hub.

Shard channels (SPUBLISH, PUBSUB SHARD*) are the hub's separate namespace of
Redis 7's sharded pub/sub (see :mod:`kvmemo.engine.pubsub`); only the Redis
port subscribes to them (SSUBSCRIBE). The channel of SPUBLISH is not a key:
it is routed to no shard (Redis's COMMAND INFO shows it as a ``not_key``
key spec, which the Redis port adds).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import CommandSyntaxError
from .table import ParseContext, Parser, ServerCall, command, container, fixed_reply, subcommand

NOKEYS = (0, 0, 0)

# Redis 7.0's PUBSUB HELP, word for word.
PUBSUB_HELP = [
    "PUBSUB <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "CHANNELS [<pattern>]",
    "    Return the currently active channels matching a <pattern> (default: '*').",
    "NUMPAT",
    "    Return number of subscriptions to patterns.",
    "NUMSUB [<channel> ...]",
    "    Return the number of subscribers for the specified channels, excluding",
    "    pattern subscriptions(default: no channels).",
    "SHARDCHANNELS [<pattern>]",
    "    Return the currently active shard level channels matching a <pattern> (default: '*').",
    "SHARDNUMSUB [<shardchannel> ...]",
    "    Return the number of subscribers for the specified shard level channel(s)",
    "HELP",
    "    Prints this help.",
]


@command("publish", 3, "fast ordered", NOKEYS, "post a message to a channel", "1.4")
def _publish(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
    return ServerCall("publish", (args[0], args[1]))


@command("spublish", 3, "fast ordered", NOKEYS, "post a message to a shard channel", "1.5")
def _spublish(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
    return ServerCall("spublish", (args[0], args[1]))


def _one_pattern(name: str) -> Parser:
    """CHANNELS / SHARDCHANNELS ``[pattern]``: Redis's arity is -2, but its handler
    takes one pattern at most, and says so in its own words."""

    def parse_one_pattern(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
        if len(args) > 1:
            raise CommandSyntaxError(
                f"unknown subcommand or wrong number of arguments for '{name}'. Try PUBSUB HELP."
            )
        return ServerCall(f"pubsub|{name}", tuple(args))

    return parse_one_pattern


def _numsub(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
    return ServerCall("pubsub|numsub", tuple(args))


def _shardnumsub(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
    return ServerCall("pubsub|shardnumsub", tuple(args))


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
            _one_pattern("channels"),
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
        subcommand(
            "shardchannels",
            -2,
            "",
            NOKEYS,
            _one_pattern("shardchannels"),
            "active shard channels, those matching a pattern if given",
        ),
        subcommand(
            "shardnumsub",
            -2,
            "",
            NOKEYS,
            _shardnumsub,
            "the subscribers of each shard channel",
        ),
    ],
)
