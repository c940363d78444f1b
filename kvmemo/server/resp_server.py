"""The Redis-protocol port: RESP2/RESP3 in front of the engine.

Design
------
Problem: Redis clients (redis-cli, redis-benchmark, redis-py, twemproxy) must
be able to use KVMemo as they use Redis (PROTOCOL.md, "Transport"): the same
commands from the same command table, Redis's replies and Redis's error
wording, pipelining, ``HELLO 3``, ``AUTH``, and the connection commands those
clients send on their own (``CLIENT SETINFO``, ``COMMAND DOCS``, ``CONFIG
GET save``, ``INFO``). Like the WebSocket port this is a Server-layer
component: it never touches storage or shards, it only calls the engine.

Approach: :func:`serve_resp` accepts connections, each served in a task of a
nursery it owns, by a :class:`_Connection` that glues the sans-IO codec
(:mod:`kvmemo.server.resp`) to the socket and the engine.

* **Reading and pipelining.** The reader receives what is available (at most
  ``RECEIVE_SIZE`` bytes; bytes already waiting are taken from the socket
  without a scheduler pass, and every read still yields at least once, so a
  busy client cannot starve the others), parses every complete request (the
  codec's fast path) and runs them in order. Consecutive data commands run
  as one ``engine.execute_many`` call (``engine.execute`` for a lone one,
  which costs less than a batch of one), which groups them per shard and
  keeps per-key order; the pipelines of the connections served in one
  scheduler pass run as one such call (:mod:`kvmemo.server.coalesce`:
  shard messages of several commands instead of one or two); a connection command
  (``HELLO``, ``AUTH``, ``CLIENT``, ``CONFIG``, ``INFO``, ...) first finishes
  the commands before it, then runs by itself, so connection state and
  replies stay in sending order. ``PING`` and early errors (unknown command,
  arity, ``NOAUTH``) have no effect to order and are answered in place: kept
  aside with their place and merged with the engine's replies.
* **Cost per read and per command.** Measured with an engine stub that
  only yields, the front end's own CPU is most of a ``-P 1`` request (a
  read, a parse, a send and trio's wake-ups for one command) and a small
  part of a ``-P 16`` one. So: a read that finds bytes waiting is one
  ``recv`` in the reader loop, with no call to :meth:`_Connection._receive`;
  a lone data command from an authenticated client (``-P 1``) goes from the
  parser to ``engine.execute`` and its reply to the stage without the batch
  machinery; a data command is known by one dict lookup of its spelling,
  which also gives its argument range; a batch's replies are encoded by
  ``encode_replies`` (no call per common reply) and staged as one piece
  when they fit under the output limit; the clock is read through the
  run's clock object. Every shortcut keeps the replies, counters, limits
  and errors of the general path (``tests/test_resp_perf.py``).
* **Writing and the output limit.** Replies are staged during a read and
  written once per read (one ``send`` for a typical pipeline), or earlier
  when ``FLUSH_THRESHOLD`` bytes pile up: directly, with one non-blocking
  ``send``, when the writer task is idle; what the kernel does not take
  goes to the writer task, which sends in pieces of at most ``WRITE_PIECE``
  bytes so that progress is observable. ``pending`` counts reply bytes not
  yet taken by the kernel.
  When a new reply would take ``pending`` over
  ``RespLimits.max_output_buffer``, the reader stops (no more reading, no
  more executing) until the writer makes room; if the writer makes no
  progress for ``RespLimits.output_timeout`` seconds (the client does not read
  its replies) the client is disconnected and logged, as Redis does past its
  ``client-output-buffer-limit``. A single reply is always accepted when
  nothing is pending, so a value bigger than the limit can still be read.
  A batch whose replies would not fit under the limit (a pipeline of GETs
  of a big value) is encoded one reply at a time, each when the one before
  it is staged. The engine computes a batch's results together, before
  the first of them is staged, so the commands of one read run in chunks
  of at most ``PIPELINE_CHUNK`` (one engine call each), the next chunk only
  once every reply of the one before is staged: without it, 64 KiB of
  ``GETRANGE k 0 -2`` on a 100 KB value made some 3,800 fresh copies
  (370 MB) held at once for a client that reads nothing, whatever the
  limit. Memory per connection, for a client that reads nothing:
  ``pending`` is at most ``max_output_buffer`` (or one reply, when nothing
  else is pending), plus the results of the chunk being staged (at most
  ``PIPELINE_CHUNK`` replies), plus ``max_query_buffer`` of input. One
  reply is one command's: an EXEC's array (at most
  ``max_transaction_commands`` results), an MGET's, a KEYS's.
* **Failure isolation.** A connection's crash (any bug) is logged and ends
  that connection only; protocol errors are answered in Redis's wording and
  close the connection after the replies before them are sent, as Redis does.
* **Slow log.** ``SLOWLOG`` (:mod:`kvmemo.server.slowlog`) times the engine
  call only: a lone command's ``engine.execute``, and a batch's one engine
  call (pipelined data commands, a pipeline coalesced with other clients',
  an EXEC's transaction) as a whole, logged as one entry naming its first
  command and how many more ran with it. Cost when nothing is slow: two reads
  of ``time.perf_counter_ns`` and one comparison per engine call.
* **INFO commandstats and errorstats.** Commandstats are read from the
  engine's counters (:meth:`KVEngine.command_stats`): the latency histogram
  per command counts the calls that succeeded, and the failed and rejected
  counters the others, for every front end (a data command costs this port
  nothing more). What the engine never sees is counted into the same
  counters here: this port's own refusals before a call reaches the engine
  (arity, NOAUTH, subscribed mode, MULTI's queueing: ``engine.count_rejected``)
  and its connection commands (``engine.record_call``: two clock reads
  around the handler, under Redis's names, ``client|list``). Errorstats count
  the error replies this port sends, by their first word, where they are
  made: ``_Connection._encode`` (early errors, connection commands' replies),
  the engine results' conversion (:meth:`_Server.reply_of`, error path only)
  and EXEC's array. ``CONFIG RESETSTAT`` clears errorstats and keeps the
  engine's counts of that moment as commandstats' base (the counters
  themselves never go back: Prometheus reads them too).
* **INFO latencystats.** The same design: the engine's latency histograms
  per command (:meth:`KVEngine.command_latencies`, the calls that succeeded)
  less a base per command, read at ``CONFIG RESETSTAT``; ``CONFIG SET
  latency-tracking no`` reads them again and ``yes`` adds what they counted
  meanwhile to the base (Redis records nothing while it is off). The
  percentiles (``latency-tracking-info-percentiles``, parsed as Redis's
  ``string2d``) are HdrHistogram's rule over the histograms' buckets
  (:meth:`~kvmemo.observability.metrics.BucketCounts.value_at_percentile`):
  the upper bound of the bucket holding the rank, precise to a 1-2-5 bucket,
  not to Redis's 2 significant digits. Both settings live in
  :class:`RespSettings`. Cost: nothing per command; a read-out is one pass
  over the commands' buckets.
* **MULTI over maxmemory.** As Redis's ``processCommand``: while the
  tracker's usage is over ``maxmemory`` and eviction cannot end it
  (:meth:`KVEngine.out_of_memory`), a client in MULTI gets ``OOM`` for any
  command but EXEC, DISCARD, QUIT and RESET (after the unknown, arity,
  NOAUTH and ``no_multi`` checks, before a pause holds it), which marks the
  transaction for EXECABORT; an EXEC whose transaction queued a ``denyoom``
  command is refused then too, discarding it (``EXECABORT Transaction
  discarded because of: OOM ...``). Cost under the limit: one comparison
  per command queued (:attr:`MemoryTracker.over_limit`).
* **Pub/sub.** ``SUBSCRIBE``, ``PSUBSCRIBE``, ``SSUBSCRIBE`` and their ``UN``
  forms are connection commands on a :class:`~kvmemo.engine.pubsub.Subscriber`
  of the engine's hub, made on the first subscribe; so is the task that writes the
  messages (the *pusher*), started then in the connection's nursery, so it
  ends with the connection, whose end (QUIT, EOF, CLIENT KILL, a crash)
  also closes the subscriber. A confirmation is staged by its command with
  no wait in between, so it precedes every message of what it subscribed.
  Messages leave the hub's outbox one at a time and only while fewer than
  ``PUSH_WINDOW`` reply bytes are pending (not taken by the kernel), so a
  slow reader's messages wait in the outbox, which ``pubsub_buffer_limit``
  bounds: past it the hub ends the subscriber and the connection is closed
  (Redis's ``client-output-buffer-limit pubsub``). Before a reply is staged,
  the messages queued before it are staged first (waiting for room as the
  pusher does), as Redis writes a message when it is published: a
  connection's ``PUBLISH`` to a channel it listens to gets the message, then
  the count (``SPUBLISH`` likewise). RESP2 clients with a subscription of
  any kind may only run (P|S)(UN)SUBSCRIBE, PING (``pong`` array), QUIT and
  RESET, as in Redis; RESP3 clients run anything. A connection that never
  subscribed pays one attribute test on the lone-command path.
* **Sharded pub/sub.** Shard channels (``SSUBSCRIBE``, ``SUNSUBSCRIBE``,
  ``SPUBLISH``, ``PUBSUB SHARDCHANNELS | SHARDNUMSUB``) are the hub's own
  namespace, as on one Redis Cluster node: messages arrive as ``smessage``,
  and the S(UN)SUBSCRIBE confirmations count shard channels only (Redis
  7.0's counts). KVMemo is one node holding every slot, so one SSUBSCRIBE may
  name channels of different slots, as Redis allows outside cluster mode
  (no ``CROSSSLOT``). They count against ``pubsub_max_subscriptions`` and
  their messages against ``pubsub_buffer_limit`` like the others.
* **CLIENT PAUSE.** The pause is the server's state (:class:`_Server`: a
  :class:`PauseMode` and an end in trio time, no task of its own: it runs out
  by its end time, and ``CLIENT UNPAUSE`` sets an event). Each command, once
  its early errors are known not to apply and before it is queued in MULTI
  (Redis's ``processCommand`` order), is held if the pause holds its kind
  (:meth:`_Connection._hold_if_paused`): the commands before it run and their
  replies go out, then the reader waits (cancellable, trio time), so the
  client's later commands wait behind it and all run in order. Meanwhile the
  socket is still read (a client that leaves is dropped at once, what it sends
  is parsed after). The lone-command fast path pays one attribute test for it.
* **CLIENT NO-TOUCH.** A NO-TOUCH client's data calls go to the engine as the
  command table's variants of the reads that record no access
  (``commands.table.NO_TOUCH``), mapped once per engine call; the fast path
  pays one attribute test, the other clients' calls nothing else.
* **Idle clients and runtime limits.** Redis's ``timeout`` is
  ``RespLimits.idle_timeout`` and is checked as Redis's ``clientsCron`` does:
  not by a deadline on each read (a cancel scope per wait costs more than a
  scheduler pass, on every request of ``-P 1``) but by one task of the
  port's nursery, the idle sweep (:func:`_sweep_idle`), which closes each
  client that waits for its next request (``reading``) and whose last
  traffic (``last_activity``: a read, or reply bytes the socket took) is
  ``timeout`` seconds old; subscribed clients, and clients whose command
  runs, that a pause holds or that wait for room for their replies, are not
  idle (Redis spares pub/sub and blocked clients). The sweep sleeps until
  the first client may be due (at most ``IDLE_SWEEP_PERIOD`` late), and
  ``CONFIG SET timeout`` wakes it, so a new timeout applies at once to the
  clients already open: a lower one closes those silent for longer, 0 spares
  them all. A reader whose wait ends as the sweep closes it runs nothing of
  what it read. ``CONFIG SET maxclients`` counts from the next accepted
  connection; those open stay open, as in Redis. With an open-file budget
  (:mod:`kvmemo.server.openfiles`, the node's), ``maxclients`` never exceeds
  what the process's ``ulimit -n`` allows: lowered at start with a warning,
  refused by CONFIG SET with Redis's words. Both change this port's
  limits only: the WebSocket port's ``--idle-timeout`` and
  ``--max-sessions`` are separate settings, fixed at start.
* **Operations.** ``SHUTDOWN`` asks the program to stop through the owner's
  callback (``serve_resp(shutdown=...)``, or the node's stop request:
  ``kvmemo serve`` exits 0) and closes the connection without a reply;
  ``CLIENT KILL`` drops the clients it names at once; ``ROLE`` is a master
  without replicas; ``MOVE`` and ``SWAPDB`` answer as Redis with
  ``databases 1``.

Deliberate differences from Redis: one database (``SELECT 0`` only); no
``AUTH``/``HELLO``/``CLIENT REPLY`` nor (P|S)UNSUBSCRIBE, SUBSCRIBE and
PSUBSCRIBE inside ``MULTI`` (Redis 7.0 queues them and EXEC's array then
miscounts its elements, redis#12207; SSUBSCRIBE is queued and refused by
EXEC, as in Redis); no scripting nor ACL users (the only user is
``default``, whose passwords are the server's tokens: ``ACL WHOAMI`` and
``ACL USERS`` answer it, other ACL subcommands are unknown); no latency
monitor (``LATENCY`` answers as Redis does when no event was recorded, and
says why); ``BGREWRITEAOF`` compacts the shards' logs with a snapshot (and,
without persistence, is refused as BGSAVE is); ``INFO`` adds a ``# Actors``
section; ``WAIT`` answers 0 at once (no replicas; Redis would block until its
timeout); ``CONFIG REWRITE`` is refused, naming the TOML file the node was
started with and why (see :func:`_config_rewrite`); the slow log holds data
commands only (see above); ``CLIENT PAUSE`` holds the clients of this port
only (not the WebSocket port's), and keys still expire and are evicted during
a pause (Redis stops both); INFO commandstats counts the whole store's calls
(both ports), its ``usec`` the calls that succeeded, and the subcommands of
OBJECT, MEMORY and PUBSUB under the command's name (``cmdstat_object``);
INFO latencystats likewise, its values bucket bounds (see above); over
maxmemory, KVMemo's used memory is the tracked bytes of the data, so
evicting every key always ends it (Redis's includes the process's own).
"""

from __future__ import annotations

import enum
import errno
import hmac
import logging
import math
import os
import platform
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from itertools import islice
from typing import Any, Final

import attrs
import trio

from .._version import __version__
from ..commands.args import arity_ok, parse_int
from ..commands.glob import glob_match
from ..commands.longdouble import parse_double
from ..commands.table import COMMANDS, NO_TOUCH
from ..commands.table import Command as TableCommand
from ..commands.table import Subcommand as TableSubcommand
from ..config import parse_size
from ..engine.engine import CommandStats, KVEngine
from ..engine.pubsub import Message, Subscriber
from ..errors import BusyKeyError, KVMemoError
from ..eviction.policies import POLICY_NAMES, make_policy
from ..observability.metrics import BucketCounts
from .app import StopHandler, StopRequest
from .coalesce import COALESCED, Coalescer
from .config import RespLimits as RespLimits
from .openfiles import OpenFiles, too_many_clients
from .resp import (
    NULL_ARRAY,
    ErrorReply,
    InlineArgs,
    ProtocolError,
    RespParser,
    Set,
    Verbatim,
    encode_push,
    encode_replies,
    encode_reply,
)
from .slowlog import LLONG_MAX, SlowLog

__all__ = ["DEFAULT_PORT", "REDIS_VERSION", "RespLimits", "RespSettings", "serve_resp"]

logger = logging.getLogger(__name__)

DEFAULT_PORT: Final = 6380
DEFAULT_LIMITS: Final = RespLimits()  # immutable: safe as a shared default
REDIS_VERSION: Final = "7.2.0-kvmemo"  # what HELLO and INFO report as the Redis version

RECEIVE_SIZE: Final = 64 * 1024  # bytes per receive: Redis reads 16 KiB; more amortises trio
FLUSH_THRESHOLD: Final = 256 * 1024  # staged reply bytes handed to the writer mid-read
WRITE_PIECE: Final = 256 * 1024  # bytes per send_all, the unit of observable progress
# Commands of one read whose replies are made (engine results computed, or
# early replies encoded) before the first of them is staged under the output
# limit: an engine call takes at most this many, so a client that does not
# read holds at most this many replies past max_output_buffer (see "Writing
# and the output limit"). Large enough that a pipeline's engine calls cost
# little per command, small enough that 64 KiB of GETRANGEs is not 3,800
# results held at once.
PIPELINE_CHUNK: Final = 128  # requests
CLOSE_DRAIN_TIMEOUT: Final = 10.0  # seconds to send the last replies before a close
REJECT_TIMEOUT: Final = 1.0  # seconds to tell a client over max_clients why it is refused
# Redis 7's latency-tracking-info-percentiles: INFO latencystats' p50, p99, p99.9.
DEFAULT_LATENCY_PERCENTILES: Final = (50.0, 99.0, 99.9)
UNAUTH_MAX_ARGS: Final = 10  # Redis's limit on multibulk requests of unauthenticated clients
UNAUTH_MAX_BULK: Final = 16 * 1024  # bytes; idem, per argument
# Idle clients (``timeout``): the longest time between two passes over the
# clients that close the idle ones, each pass O(clients) (Redis's clientsCron
# visits each client about once a second too). A pass runs when the first
# client may be due, but never sooner than this (or the timeout, if shorter)
# after the one before: a client is closed between ``timeout`` and ``timeout
# + min(IDLE_SWEEP_PERIOD, timeout)`` seconds after its last traffic.
IDLE_SWEEP_PERIOD: Final = 1.0  # seconds
# Pub/sub messages are taken from the hub's outbox only while fewer reply bytes
# than this are pending (not yet taken by the kernel): enough for a socket
# write's worth, small enough that a slow reader's backlog stays in the
# outbox, where pubsub_buffer_limit bounds it.
PUSH_WINDOW: Final = 64 * 1024  # bytes

# -- Redis's error replies, word for word ------------------------------------------------

NOAUTH: Final = ErrorReply("NOAUTH Authentication required.")
WRONGPASS: Final = ErrorReply("WRONGPASS invalid username-password pair or user is disabled.")
OOM: Final = ErrorReply("OOM command not allowed when used memory > 'maxmemory'.")
NOPROTO: Final = ErrorReply("NOPROTO unsupported protocol version")
SYNTAX_ERROR: Final = ErrorReply("ERR syntax error")
NO_REPLY: Final = object()  # a handler's answer when the command sends nothing (CLIENT REPLY)
NOT_INTEGER: Final = ErrorReply("ERR value is not an integer or out of range")
MAX_CLIENTS: Final = b"-ERR max number of clients reached\r\n"
AUTH_NOT_CONFIGURED: Final = ErrorReply(
    "ERR AUTH <password> called without any password configured for the default user."
    " Are you sure your configuration is correct?"
)
EXECABORT: Final = ErrorReply("EXECABORT Transaction discarded because of previous errors.")
QUEUED: Final = "QUEUED"
NOT_IN_MULTI: Final = ErrorReply("ERR Command not allowed inside a transaction")
HELLO_NOAUTH: Final = ErrorReply(
    "NOAUTH HELLO must be called with the client already authenticated, otherwise the"
    " HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and"
    " select the RESP protocol version at the same time"
)
# Data commands by the bytes a client named them with (b"GET", b"get", ...) ->
# (table name, fewest arguments, most arguments, the name included): one
# lookup and one chained comparison instead of lower(), decode, two tables and
# an arity rule. Bounded: a client could send every spelling of every name.
DATA_NAMES_MAX: Final = 4096  # spellings remembered, process-wide
_DATA_NAMES: dict[bytes, tuple[str, int, int]] = {}
# Commands on one key (GET, SET, INCR, ...): their batches, and lone ones, run
# in the coalescer's shared rounds (shard messages of many commands). Batches
# with multi-key commands run by themselves: MSETs of several connections,
# each in its own task, are grouped by the engine into one round.
_COALESCED: Final = COALESCED
_NO_MOST: Final = 1 << 62  # "any number of arguments", beyond every max_args

_UNAUTH_MBULK: Final = "ERR Protocol error: unauthenticated multibulk length"
_UNAUTH_BULK: Final = "ERR Protocol error: unauthenticated bulk length"

# Our eviction policy names, as Redis spells them.
_POLICY_TO_REDIS: Final = {"lru": "allkeys-lru", "lfu": "allkeys-lfu", "random": "allkeys-random"}


# The slow log's clock: monotonic nanoseconds, one C call (see _Connection._slow).
_clock_ns: Final = time.perf_counter_ns


def _text(data: bytes) -> str:
    """Bytes as text that goes back out byte for byte (see :mod:`.resp`)."""
    return data.decode("utf-8", "surrogateescape")


class _OutputStalled(Exception):
    """The client is over its output limit and not reading: disconnect it."""


class _Overflowed(Exception):
    """The hub ended the client's subscriber (past ``pubsub_buffer_limit``): disconnect it."""


class PauseMode(enum.IntEnum):
    """What CLIENT PAUSE holds back, by increasing strictness: while pauses
    overlap, the strictest one given holds (as Redis's ``pauseClients``)."""

    NONE = 0
    WRITE = 1  # the commands that change data or publish (see _pauses_on_write)
    ALL = 2  # every command


@attrs.define(eq=False)
class RespSettings:
    """What CONFIG SET changes on the Redis port, kept across its restarts.

    Owned by whoever runs :func:`serve_resp` again after a failure (the node,
    for the server actor's restarts): the port reads it at each start and
    writes to it at each CONFIG SET of ``timeout``, ``maxclients``,
    ``latency-tracking`` or ``latency-tracking-info-percentiles``; the slow
    log (its two settings and its entries) is this one object. Without it, a
    restarted port went back to the start values, silently.

    ``open_files``: the descriptors the port's clients may hold (the node
    gives the process's ``ulimit -n``); ``maxclients`` is kept within it
    (:mod:`kvmemo.server.openfiles`). None: unchecked.
    """

    limits: RespLimits
    slowlog: SlowLog = attrs.Factory(SlowLog)
    open_files: OpenFiles | None = None
    # INFO latencystats: Redis's ``latency-tracking`` and
    # ``latency-tracking-info-percentiles`` (0 to 100, in the order given).
    latency_tracking: bool = True
    latency_percentiles: tuple[float, ...] = DEFAULT_LATENCY_PERCENTILES

    def clients_allowed(self) -> int | None:
        """The most clients the open-file budget allows now; None: no budget, or no limit.

        Raises:
            OSError: ``EMFILE``, the budget leaves no client at all (Redis
                exits then too).
        """
        budget = self.open_files
        allowed = None if budget is None else budget.clients_allowed()
        if budget is not None and allowed is not None and allowed < 1:
            raise OSError(
                errno.EMFILE,
                f"the open-file limit (ulimit -n) of {allowed + budget.reserved} leaves no"
                f" descriptor for Redis clients ({budget.reserved} are kept for the"
                f" process): raise it to at least {budget.reserved + self.limits.max_clients}",
            )
        return allowed

    def fit_open_files(self) -> str | None:
        """Lower ``maxclients`` to what the open-file budget allows now; the
        warning to log when it did (None: it fitted, or there is no budget).

        Raises:
            OSError: as :meth:`clients_allowed`; nothing changed.
        """
        allowed = self.clients_allowed()
        if allowed is None or self.limits.max_clients <= allowed:
            return None
        assert self.open_files is not None
        wanted = self.limits.max_clients
        self.limits = attrs.evolve(self.limits, max_clients=allowed)
        return self.open_files.lowered(wanted, allowed)


@attrs.define(eq=False)
class _Server:
    """What the connections of one :func:`serve_resp` share."""

    engine: KVEngine
    tokens: tuple[bytes, ...]
    limits: RespLimits
    host: str = ""
    port: int = 0
    clients: dict[int, _Connection] = attrs.Factory(dict)
    next_id: int = 0
    total_connections: int = 0
    total_commands: int = 0
    rejected_connections: int = 0
    started_at: float = attrs.Factory(time.time)
    run_id: str = attrs.Factory(lambda: secrets.token_hex(20))
    slowlog: SlowLog = attrs.Factory(SlowLog)
    # What outlives this port's restarts (see RespSettings): ``limits`` and
    # ``slowlog`` are its, kept here too for the hot path's one attribute read.
    settings: RespSettings = attrs.field(kw_only=True)
    # How SHUTDOWN asks the process to stop (None: it is refused); see serve_resp.
    stop: StopHandler | None = None
    # The connections' pipelines of one scheduler pass run as one engine call.
    coalescer: Coalescer = attrs.Factory(lambda self: Coalescer(self.engine), takes_self=True)
    # CLIENT PAUSE: what is held back, until when (trio time; past it, nothing
    # is, whatever ``pause_mode`` still says), how many clients wait for it
    # (INFO's blocked_clients), and the event CLIENT UNPAUSE sets (then replaced).
    pause_mode: PauseMode = PauseMode.NONE
    pause_end: float = 0.0
    paused_clients: int = 0
    unpaused: trio.Event = attrs.Factory(trio.Event)
    # INFO errorstats: the error replies sent, by their first word (Redis's
    # error code, "ERR" when there is none), since the start or CONFIG
    # RESETSTAT. The words are KVMemo's own (a fixed set), so unlike Redis
    # (128 codes at most) no bound is needed.
    error_replies: dict[str, int] = attrs.Factory(dict)
    # INFO commandstats: the engine's counts (store-wide, never reset: they
    # are Prometheus counters too) at the last CONFIG RESETSTAT; INFO shows
    # what was counted since.
    commandstats_base: dict[str, CommandStats] = attrs.Factory(dict)
    # INFO latencystats, the same way: the engine's latency histograms (never
    # reset) less this base, per command; the base is their read at the last
    # CONFIG RESETSTAT, plus what they counted while latency-tracking was off
    # (Redis records nothing then). ``latency_off_since``: their read when it
    # was turned off (None while it is on).
    latencystats_base: dict[str, BucketCounts] = attrs.Factory(dict)
    latency_off_since: dict[str, BucketCounts] | None = None
    # The TOML file the node's settings came from (INFO, CONFIG REWRITE); None: none.
    config_file: str | None = None
    # Set (then replaced) when ``limits.idle_timeout`` changes: the idle sweep looks again.
    idle_changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def auth_required(self) -> bool:
        return bool(self.tokens)

    def count_error(self, message: str) -> None:
        """Count one error reply in INFO errorstats, as Redis's ``afterErrorReply``:
        by the word before the first space (within Redis's 32 bytes of
        ``-``-prefixed error), else as ``ERR``."""
        end = message.find(" ", 0, 31)
        code = message[:end] if end >= 0 else "ERR"
        self.error_replies[code] = self.error_replies.get(code, 0) + 1

    def error_reply(self, exc: KVMemoError) -> ErrorReply:
        """:func:`redis_error`, counted in INFO errorstats (an engine error about to be sent)."""
        reply = redis_error(exc)
        self.count_error(reply.message)
        return reply

    def reply_of(self, value: object) -> object:
        """An engine result as a reply: a :class:`KVMemoError` becomes Redis's error,
        counted in errorstats (the engine counted it already in commandstats)."""
        if isinstance(value, KVMemoError):
            return self.error_reply(value)
        return value

    def reject(self, name: str) -> None:
        """Count a call of ``name`` refused before it ran (Redis's ``rejected_calls``)."""
        self.engine.count_rejected(name)

    def set_latency_tracking(self, on: bool) -> None:
        """CONFIG SET latency-tracking: INFO latencystats counts calls again, or stops.

        The engine's histograms go on (Prometheus reads them), so turning it
        off reads them (``latency_off_since``) and turning it on adds what
        they counted meanwhile to ``latencystats_base``: INFO then shows
        what was counted while it was on, as Redis, which records nothing
        while it is off and shows its histograms again once it is back on.
        """
        settings = self.settings
        if on == settings.latency_tracking:
            return
        now = self.engine.command_latencies()
        if on:
            off = self.latency_off_since or {}
            base = dict(self.latencystats_base)
            for name, counts in now.items():
                base[name] = counts.since(off.get(name)).plus(base.get(name))
            self.latencystats_base = base
            self.latency_off_since = None
        else:
            self.latency_off_since = now
        settings.latency_tracking = on

    def reset_stats(self) -> None:
        """CONFIG RESETSTAT: INFO's counters, commandstats, errorstats and
        latencystats start again from 0 (the engine's own counters go on)."""
        self.total_commands = 0
        self.total_connections = 0
        self.rejected_connections = 0
        self.error_replies.clear()
        self.commandstats_base = self.engine.command_stats()
        self.latencystats_base = self.engine.command_latencies()
        if self.latency_off_since is not None:
            self.latency_off_since = self.latencystats_base

    def set_limits(
        self, *, idle_timeout: float | None = None, max_clients: int | None = None
    ) -> None:
        """CONFIG SET timeout / maxclients: the port's new limits, from now on.

        ``max_clients`` counts at the next accepted connection (those open
        stay open, as in Redis); a new ``idle_timeout`` wakes the idle sweep
        (:func:`_sweep_idle`), which applies it to every client at once, those
        open included: one silent for longer is closed at its next pass.

        Raises:
            ValueError: a value :class:`RespLimits` refuses (nothing changed).
        """
        limits = self.limits
        if max_clients is not None:
            limits = attrs.evolve(limits, max_clients=max_clients)
        if idle_timeout is not None:
            limits = attrs.evolve(limits, idle_timeout=idle_timeout)
        changed = limits.idle_timeout != self.limits.idle_timeout
        self.limits = self.settings.limits = limits
        if changed:
            self.idle_changed.set()
            self.idle_changed = trio.Event()

    def close_idle_clients(self, now: float) -> float:
        """One pass of the idle sweep: close every client idle for ``timeout`` seconds
        at ``now``; return when the next pass is due (trio time; ``inf``: only
        when the timeout changes).

        Only a client waiting for its next request (:attr:`_Connection.reading`)
        and not subscribed is closed, as Redis's ``clientsCronHandleTimeout``
        spares pub/sub and blocked clients: a client whose command runs, that
        CLIENT PAUSE holds, or that waits for room in its output buffer is
        never dropped here, and is looked at again at the next pass.

        Invariant: every client's ``last_activity`` only grows, and one accepted
        after this pass has it past ``now``, so none is due before the time
        returned but those this pass saw (at most ``now + timeout``).
        """
        idle = self.limits.idle_timeout
        if not idle:
            return math.inf
        wake = now + idle
        for conn in list(self.clients.values()):
            due = conn.last_activity + idle
            if due > now:
                wake = min(wake, due)
            elif conn.reading and not conn.subscribed:
                conn.close_idle(now)
            elif not conn.subscribed:  # busy: look again at the next pass
                wake = now
        return max(wake, now + min(IDLE_SWEEP_PERIOD, idle))

    def pause(self, mode: PauseMode, end: float) -> None:
        """CLIENT PAUSE: hold back ``mode``'s commands until ``end`` (trio time).

        Over a pause still running, the later end and the stricter mode win,
        as in Redis (PAUSE ALL for 200 ms then WRITE for 10 ms is ALL for
        200 ms; WRITE for a minute then ALL for 10 ms is ALL for a minute).
        """
        if self.pause_mode and trio.current_time() < self.pause_end:
            mode = max(mode, self.pause_mode)
            end = max(end, self.pause_end)
        self.pause_mode = mode
        self.pause_end = end

    def unpause(self) -> None:
        """CLIENT UNPAUSE: end the pause now; the clients it held resume."""
        self.pause_mode = PauseMode.NONE
        self.pause_end = 0.0
        self.unpaused.set()
        self.unpaused = trio.Event()

    def paused_for(self, write: bool) -> bool:
        """Whether a command is held back now (``write``: it changes data or publishes)."""
        mode = self.pause_mode
        if not mode:
            return False
        if trio.current_time() >= self.pause_end:
            self.pause_mode = PauseMode.NONE  # ran out: the fast path is open again
            return False
        return write or mode is PauseMode.ALL

    def check_password(self, password: bytes) -> bool:
        """Whether ``password`` is one of the tokens (constant time per token)."""
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(password, token)
        return ok


# -- how connection commands are declared -----------------------------------------------

Handler = Callable[["_Connection", tuple[bytes, ...]], Awaitable[object]]


@attrs.frozen
class _ConnCommand:
    """A command the connection answers itself (its state, or the server's)."""

    name: str
    arity: int
    flags: tuple[str, ...]
    handler: Handler
    summary: str
    no_auth: bool = False  # allowed before authentication


@attrs.frozen
class _SubCommand:
    """A container's subcommand: its arity and handler, and for COMMAND INFO and
    DOCS, Redis's flags for it, a summary and the Redis version that added it."""

    arity: int
    handler: Handler
    flags: str = ""
    summary: str = ""
    since: str = ""


_CONNECTION_COMMANDS: dict[str, _ConnCommand] = {}
# The subcommands of each container handler (CLIENT, CONFIG, ...) made by _dispatch.
_DISPATCHED: dict[Handler, dict[str, _SubCommand]] = {}


def _unknown_subcommand(argv: tuple[bytes, ...]) -> ErrorReply:
    return ErrorReply(
        f"ERR unknown subcommand '{_text(argv[1][:128])}'. Try {_text(argv[0]).upper()} HELP."
    )


def _dispatch(subcommands: dict[str, _SubCommand]) -> Handler:
    """A handler for a container command (CLIENT, CONFIG, ...) by subcommand."""

    async def handle(conn: _Connection, argv: tuple[bytes, ...]) -> object:
        sub = subcommands.get(_text(argv[1].lower()))
        if sub is None:
            return _unknown_subcommand(argv)
        full = f"{_text(argv[0].lower())}|{_text(argv[1].lower())}"
        if conn.executing is None:  # in EXEC, Redis's cmd= stays exec
            conn.last_cmd = full
        if not arity_ok(sub.arity, len(argv)):
            return _arity_error(full)
        return await sub.handler(conn, argv)

    _DISPATCHED[handle] = subcommands
    return handle


def _subcommand_error(
    name: str, command: _ConnCommand, argv: tuple[bytes, ...]
) -> ErrorReply | None:
    """A container's (CLIENT, CONFIG, ...) unknown subcommand or wrong subcommand
    arity, found before the command runs or is queued, as Redis's
    ``processCommand`` finds it: in MULTI it is refused (EXEC then aborts),
    not queued. None for a command without subcommands (or a bare ``COMMAND``),
    or a valid call."""
    subcommands = _DISPATCHED.get(command.handler)
    if subcommands is None or len(argv) < 2:
        return None
    sub_name = _text(argv[1].lower())
    sub = subcommands.get(sub_name)
    if sub is None:
        return _unknown_subcommand(argv)
    if not arity_ok(sub.arity, len(argv)):
        return _arity_error(f"{name}|{sub_name}")
    return None


def _stat_name(name: str, handler: Handler, argv: Sequence[bytes]) -> str | None:
    """A connection command's name in INFO commandstats, as Redis names it: a
    container's subcommand is ``client|list``; None for an unknown subcommand
    (Redis counts it in errorstats only, as an unknown command)."""
    subcommands = _DISPATCHED.get(handler)
    if subcommands is None or len(argv) < 2:
        return name
    sub = _text(argv[1].lower())
    return f"{name}|{sub}" if sub in subcommands else None


def _arity_range(arity: int) -> tuple[int, int]:
    """The fewest and most arguments ``arity`` allows: ``lo <= argc <= hi`` is ``arity_ok``."""
    return (arity, arity) if arity > 0 else (-arity, _NO_MOST)


def _arity_error(name: str) -> ErrorReply:
    return ErrorReply(f"ERR wrong number of arguments for '{name}' command")


def unknown_command(argv: Sequence[bytes]) -> ErrorReply:
    """Redis's reply to an unknown command (``processCommand``'s wording)."""
    shown = b""
    for arg in argv[1:]:
        if len(shown) >= 128:
            break
        shown += b"'" + arg[: 128 - len(shown)] + b"' "
    return ErrorReply(
        f"ERR unknown command '{_text(argv[0][:128])}', with args beginning with: {_text(shown)}"
    )


def redis_error(exc: KVMemoError) -> ErrorReply:
    """The Redis error reply for an engine error, by its kind."""
    kind = exc.kind
    if kind == "OOM":
        return OOM
    if kind == "NOAUTH":
        return NOAUTH
    if kind == "UNAVAILABLE":
        retry = exc.data.get("retry_after_ms")
        after = f", retry after {retry} ms" if retry is not None else ""
        return ErrorReply(f"TRYAGAIN {exc.message}; nothing was applied{after}")
    if kind == "TIMEOUT":
        applied = exc.data.get("applied")
        effect = "was not applied" if applied is False else "may have been applied"
        return ErrorReply(f"ERR timeout: {exc.message}; the command {effect}")
    if kind == "WRONGTYPE":
        return ErrorReply("WRONGTYPE Operation against a key holding the wrong kind of value")
    if kind == "IO":
        return ErrorReply(f"MISCONF {exc.message}")
    if kind == "INTERNAL":
        return ErrorReply(f"ERR internal error: {exc.message}")
    if isinstance(exc, BusyKeyError):  # RESTORE onto a live key without REPLACE
        return ErrorReply(f"BUSYKEY {exc.message}")
    return ErrorReply(f"ERR {exc.message}")


# -- the connection ------------------------------------------------------------------------


class _Connection:
    """One client of the Redis port: a reader task and a writer task.

    Invariant: ``pending`` is the number of reply bytes in ``_stage`` and
    ``_queue`` plus those of the piece being sent; replies leave in the order
    they were pushed. The request parser (``_parser``) is fed and read by
    the reader task only; others only read its ``buffered`` count. Pub/sub:
    ``subscriber`` is None until the first (P)SUBSCRIBE, then the
    connection's until it ends (closed then, however it ends), with one
    pusher task running for it; a message is taken from its outbox only
    when ``pending`` is under ``PUSH_WINDOW``.
    """

    def __init__(self, server: _Server, stream: trio.SocketStream, client_id: int) -> None:
        self.server = server
        self.stream = stream
        self.id = client_id
        self.addr = _address(stream, peer=True)
        self.laddr = _address(stream, peer=False)
        self.created = trio.current_time()
        # When the client last sent bytes or took reply bytes (trio time): its
        # idle time (CLIENT LIST's idle=, the idle sweep) counts from here.
        self.last_activity = self.created
        # The reader waits for the client's next bytes (in _receive): only
        # then may the idle sweep close it (see _Server.close_idle_clients).
        self.reading = False
        self.name = b""
        self.lib_name = b""
        self.lib_ver = b""
        self.last_cmd = "NULL"
        self.protocol = 2
        self.authenticated = not server.auth_required
        self.closing = False  # QUIT, or a request too big before AUTH: close after the replies
        self.pending = 0
        # MULTI: the queued calls (None outside a transaction), and whether one
        # was refused (EXEC then answers EXECABORT); WATCH: what the engine
        # counts for this client (given back at EXEC, DISCARD, UNWATCH, close).
        # Each queued call: (name, the whole request, None) for a data command,
        # run by the engine as one transaction; (name, the whole request, its
        # handler) for a connection command, answered in its place at EXEC.
        self.multi: list[tuple[str, tuple[bytes, ...], Handler | None]] | None = None
        self.multi_dirty = False
        self.watches: list[tuple[int, bytes, int]] = []
        # CLIENT REPLY: OFF drops every reply until ON; SKIP drops the next
        # command's. ``muted`` is either of them (one read on the fast path).
        self.replies_off = False
        self.skip_reply = False
        self.muted = False
        self.killed = False  # CLIENT KILL: stop serving at once (its replies dropped)
        self.no_evict = False  # CLIENT NO-EVICT ON: only shown (flag e), as no client is evicted
        # CLIENT NO-TOUCH ON (flag T): its reads go to the engine as the table's
        # variants that record no access (commands.table.NO_TOUCH).
        self.no_touch = False
        self.paused = False  # held back by CLIENT PAUSE (flag b)
        # EXEC running its queued commands: how many (CLIENT INFO's multi=, as
        # Redis shows it then); None otherwise.
        self.executing: int | None = None
        # Bytes the client sent while a pause held it were parsed after: parse
        # again before reading (see _wait_unpaused).
        self._fed_while_paused = False
        self.subscriber: Subscriber | None = None  # pub/sub: made on the first (P)SUBSCRIBE
        self._nursery: trio.Nursery | None = None  # the reader's, writer's and pusher's
        self._overflow_logged = False
        self._batch: list[tuple[bytes, ...]] = []  # the requests _execute_batch runs
        # Pub/sub: while a reply is being made (_push_holds > 0) the pusher
        # stages nothing, so a message published after the command ran never
        # goes out before its reply; the reader stages what came before.
        self._push_holds = 0
        self._push_released = trio.Event()
        # Message frames staged and not yet sent, as (end offset in the output,
        # size): held against the subscriber's limit until the socket took them.
        self._held_frames: deque[tuple[int, int]] = deque()
        self._sent_total = 0  # bytes of output the socket took so far
        limits = server.limits
        self._parser = RespParser(
            max_bulk_len=limits.max_bulk_len,
            max_args=limits.max_args,
            max_inline_len=limits.max_inline_len,
            max_buffer=limits.max_query_buffer,
        )
        self._clock = trio.lowlevel.current_clock()  # trio.current_time(), one call nearer
        self._stage: list[bytes] = []
        self._staged = 0  # bytes in _stage
        self._queue: deque[bytes | memoryview] = deque()
        self._data = trio.lowlevel.ParkingLot()  # the writer waits here for replies
        self._progress = trio.lowlevel.ParkingLot()  # the reader waits here for room
        self._broken = False
        self._writing = False  # the writer holds a piece it is sending
        self._scope: trio.CancelScope | None = None
        # The stdlib socket under the trio one (non-blocking, as trio keeps
        # it) for the direct write of _flush_stage; None if trio's layout
        # differs, then every reply goes through the writer.
        raw = getattr(stream.socket, "_sock", None)
        self._raw: socket.socket | None = raw if isinstance(raw, socket.socket) else None

    @property
    def query_buffered(self) -> int:
        """Request bytes received and not yet parsed into a command (CLIENT LIST's qbuf)."""
        return self._parser.buffered

    # -- running -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it leaves, breaks the protocol or must be dropped."""
        try:
            await self._run()
        finally:
            self.end_transaction()
            if self.subscriber is not None:
                self.subscriber.close()  # leaves every channel: PUBSUB NUMSUB drops

    def end_transaction(self) -> None:
        """Leave MULTI (its queue dropped) and stop watching (synchronous: safe on close)."""
        self.multi = None
        self.multi_dirty = False
        if self.watches:
            self.server.engine.unwatch(self.watches)
            self.watches = []

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            self._nursery = nursery
            if self.killed:  # killed before it was first served
                nursery.cancel_scope.cancel()
            nursery.start_soon(self._writer)
            try:
                drain = await self._reader()
            except _OutputStalled:
                logger.warning(
                    "closing RESP client id=%d addr=%s: %d reply bytes pending (limit %d)"
                    " and nothing read for %.1f s",
                    self.id,
                    self.addr,
                    self.pending,
                    self.server.limits.max_output_buffer,
                    self.server.limits.output_timeout,
                )
                drain = False
            except _Overflowed:
                self._log_overflow()
                drain = False
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                drain = False
            if drain:
                if self.subscriber is not None:
                    self.subscriber.close()  # QUIT: nothing after its +OK, as Redis
                self._flush_stage()
                with trio.move_on_after(CLOSE_DRAIN_TIMEOUT):
                    while self.pending and not self._broken:
                        await self._progress.park()
            nursery.cancel_scope.cancel()

    async def _receive(self) -> bytes | None:
        """Wait for the next bytes; ``b""`` at end of stream, None when the client
        was closed (idle, CLIENT KILL) as its wait ended: what it read is dropped.

        The reader first takes the bytes already waiting from the stdlib
        socket itself (see :meth:`_reader`), and calls this only when there
        were none: it then waits for readability first and receives after,
        rather than trying a ``recv`` it knows would fail (``receive_some``
        on a trio socket whose layout is unknown). No deadline here: the
        idle timeout is the idle sweep's (:meth:`_Server.close_idle_clients`),
        which closes the client only while it waits here (:attr:`reading`).
        """
        raw = self._raw
        self.reading = True
        try:
            if raw is None:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            else:
                while True:
                    await trio.lowlevel.wait_readable(raw)
                    try:
                        data = raw.recv(RECEIVE_SIZE)
                        break
                    except BlockingIOError:
                        continue
                    except OSError as exc:  # as trio's SocketStream words it
                        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        finally:
            self.reading = False
        # Closed while its wait ended (the cancellation lands at the next
        # checkpoint): none of the commands read now may run.
        return None if self.killed else data

    async def _reader(self) -> bool:
        """Read, parse and execute until the end; return whether to drain replies.

        At one request per read (``-P 1``, many clients) the fixed cost of a
        read is most of the work, so a read that finds bytes waiting costs
        one ``recv`` here, no call to :meth:`_receive` and no scheduler pass
        of its own beyond the fairness rule below.
        """
        parser = self._parser
        direct = self._raw
        clock = self._clock
        task = trio.lowlevel.current_task()
        points = _schedule_points(task)  # so that the first read yields too
        while True:
            # Fairness: every read yields to the other tasks at least once.
            # The engine's replies are waited for (a yield); a read answered
            # without one (PING, errors, a receive that did not wait) gets an
            # explicit one. The count of the task's yields is trio's own, as
            # trio.testing reads it; without it, every read yields here.
            current = _schedule_points(task)
            if current is None or current == points:
                await trio.lowlevel.checkpoint()
                current = _schedule_points(task)
            points = current
            if direct is not None:
                try:
                    data: bytes | None = direct.recv(RECEIVE_SIZE)
                except BlockingIOError:
                    data = await self._receive()
                except OSError as exc:  # as trio's SocketStream words it
                    raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            else:
                data = await self._receive()
            if data is None:  # closed by the idle sweep or CLIENT KILL
                return False
            self.last_activity = clock.current_time()
            if not data:
                return True
            parser.feed(data)
            commands, error = parser.next_commands()
            while commands:
                await self._execute(commands)
                if self.closing:
                    return True
                if not self._fed_while_paused:
                    break
                # What arrived while a pause held the client: its turn now.
                self._fed_while_paused = False
                commands, error = parser.next_commands()
            if error is None and not self.authenticated:
                error = _unauthenticated_limit(parser)
            if error is not None:
                logger.info(
                    "RESP client id=%d addr=%s: %s; closing it", self.id, self.addr, error.message
                )
                if error.reply:
                    await self._deliver([self._encode(ErrorReply(error.message))])
                return error.reply
            self._flush_stage()

    async def _writer(self) -> None:
        """Send the queued replies in order, piece by piece."""
        try:
            while True:
                while not self._queue:
                    await self._data.park()
                piece = self._take_piece()
                self._writing = True
                await self.stream.send_all(piece)
                self._writing = False
                self.pending -= len(piece)
                self._sent_total += len(piece)
                if self._held_frames:
                    self._release_frames()
                self.last_activity = self._clock.current_time()
                self._progress.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._broken = True
            self._progress.unpark_all()
            if self._scope is not None:
                self._scope.cancel()

    def _take_piece(self) -> bytes | memoryview:
        first = self._queue[0]
        if len(first) >= WRITE_PIECE:
            view = memoryview(first)
            if len(view) > WRITE_PIECE:
                self._queue[0] = view[WRITE_PIECE:]
            else:
                self._queue.popleft()
            return view[:WRITE_PIECE]
        parts: list[bytes | memoryview] = []
        size = 0
        while self._queue and size + len(self._queue[0]) <= WRITE_PIECE:
            chunk = self._queue.popleft()
            parts.append(chunk)
            size += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- output --------------------------------------------------------------------

    def _unmuted(self, replies: list[bytes]) -> list[bytes]:
        """The replies of commands to send, after CLIENT REPLY OFF / SKIP (one per command).

        OFF drops them all; SKIP drops the first (the reply of the command
        after it) and ends.
        """
        if not self.muted:
            return replies
        if self.replies_off:
            return []
        self.skip_reply = False
        self.muted = False
        return replies[1:]

    async def _deliver(self, replies: list[bytes], upto: int | None = None) -> None:
        """Stage the replies of commands, in order, as CLIENT REPLY allows.

        A subscribed connection's messages queued before them are staged
        first (Redis writes a message when it is published): all those
        queued now, or with ``upto`` (the subscriber's ``delivered`` count
        when the commands started) only those queued before the commands ran.
        """
        replies = self._unmuted(replies)
        if self.subscriber is not None:
            await self._pump(self.subscriber, wait=True, upto=upto)
        if replies:
            await self._push_all(replies)

    async def _push(self, reply: bytes) -> None:
        """Stage one encoded reply, first waiting for room if over the output limit.

        Raises:
            _OutputStalled: over the limit and the client read nothing for
                ``output_timeout`` seconds.
        """
        limits = self.server.limits
        while self.pending and self.pending + len(reply) > limits.max_output_buffer:
            self._flush_stage()
            if self._broken:
                raise trio.BrokenResourceError("the client went away")
            if not (self.pending and self.pending + len(reply) > limits.max_output_buffer):
                break  # the flush itself made room
            with trio.move_on_after(limits.output_timeout) as scope:
                await self._progress.park()
            if scope.cancelled_caught:
                raise _OutputStalled
        self._stage.append(reply)
        self._staged += len(reply)
        self.pending += len(reply)
        if self._staged >= FLUSH_THRESHOLD:
            self._flush_stage()

    async def _push_all(self, replies: list[bytes]) -> None:
        """:meth:`_push` each reply in order; those that fit are staged without an await.

        When the whole batch fits under the output limit and the flush
        threshold (the common case), it is staged as one piece: no reply of
        it would have waited or flushed.
        """
        limit = self.server.limits.max_output_buffer
        total = sum(map(len, replies))
        if self.pending + total <= limit and self._staged + total < FLUSH_THRESHOLD:
            self._stage.append(replies[0] if len(replies) == 1 else b"".join(replies))
            self._staged += total
            self.pending += total
            return
        stage = self._stage
        for reply in replies:
            size = len(reply)
            if self.pending and self.pending + size > limit:
                await self._push(reply)  # waits for room
                stage = self._stage
                continue
            stage.append(reply)
            self._staged += size
            self.pending += size
            if self._staged >= FLUSH_THRESHOLD:
                self._flush_stage()
                stage = self._stage

    def _flush_stage(self) -> None:
        """Send the staged replies, all in one write (one send for all of them).

        When the writer is idle and has nothing queued, they are written
        here at once, without waking it: one non-blocking ``send`` on the
        socket, which for a typical read takes everything. Whatever the
        kernel does not take (or all of it, on any error, which the writer
        then meets and handles) is queued for the writer, in order.
        """
        stage = self._stage
        if not stage:
            return
        data = stage[0] if len(stage) == 1 else b"".join(stage)
        self._stage = []
        self._staged = 0
        raw = self._raw
        if raw is not None and not self._queue and not self._writing and not self._broken:
            try:
                sent = raw.send(data)
            except OSError:  # would block, or broken: the writer waits or reports
                sent = 0
            if sent:
                self.pending -= sent
                self._sent_total += sent
                if self._held_frames:
                    self._release_frames()
                self.last_activity = self._clock.current_time()
                if self._progress:  # the reader or the pusher waits for room
                    self._progress.unpark_all()
                if sent == len(data):
                    return
                data = data[sent:]
        self._queue.append(data)
        self._data.unpark_all()

    def _encode(self, value: object) -> bytes:
        """One reply's bytes; an error reply (or engine error) is counted in errorstats."""
        if isinstance(value, KVMemoError):
            value = redis_error(value)
        if type(value) is ErrorReply:
            self.server.count_error(value.message)
        return encode_reply(value, protocol=self.protocol)

    # -- pub/sub ---------------------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        """Subscribed to a channel, pattern or shard channel: Redis's pubsub client
        flag (``P``), and RESP2 subscribed mode."""
        return self.subscriber is not None and self.subscriber.total > 0

    async def change_subscriptions(self, kind: str, names: Sequence[bytes]) -> object:
        """(P|S)(UN)SUBSCRIBE: change the subscriptions, stage one confirmation per name.

        Each confirmation is a push (``kind``, the name, the subscription
        count after it: channels and patterns, or for S(UN)SUBSCRIBE shard
        channels, as Redis 7.0 counts; ``kind``, nil, the count when an
        UNSUBSCRIBE of everything finds nothing), staged as any reply is (waiting for room
        under the output limit), with the pusher held back meanwhile, so no
        message of a channel just subscribed can come before it; the
        messages queued before the command are staged first. Confirmations
        are pushes: CLIENT REPLY OFF does not silence them, and SKIP is
        spent on the command, as in Redis 7.0. The first subscribe that
        succeeds makes the subscriber and starts the pusher (a refused one
        leaves nothing). Returns :data:`NO_REPLY` (the confirmations are the
        reply).
        """
        self._push_holds += 1  # no message of a name just subscribed before its confirmation
        try:
            return await self._change_subscriptions(kind, names)
        finally:
            self._release_pushes()

    async def _change_subscriptions(self, kind: str, names: Sequence[bytes]) -> object:
        subscriber = self.subscriber
        made = False
        if subscriber is None and kind in _SUBSCRIBES:
            # on_end: an overflow wakes a wait for room (_wait_push_room) at once.
            subscriber = self.subscriber = self.server.engine.pubsub.subscriber(
                on_end=self._wake_waiters
            )
            made = True
        if subscriber is None:  # nothing subscribed yet: answered as a fresh subscriber would
            counts: Sequence[tuple[bytes | None, int]] = [(name, 0) for name in names] or [
                (None, 0)
            ]
        else:
            await self._pump(subscriber, wait=True)
            try:
                counts = subscriber.change(kind, names)
            except KVMemoError as exc:  # past pubsub_max_subscriptions: nothing changed
                if made:
                    subscriber.close()
                    self.subscriber = None
                return redis_error(exc)
            if made:
                assert self._nursery is not None
                self._nursery.start_soon(self._pusher, subscriber)
        word = kind.encode()
        protocol = self.protocol
        frame = b"".join(encode_push((word, name, n), protocol=protocol) for name, n in counts)
        if self.muted and not self.replies_off:
            self.skip_reply = self.muted = False  # CLIENT REPLY SKIP: spent on this command
        await self._push(frame)  # under the output limit, as any reply
        return NO_REPLY

    def _release_pushes(self) -> None:
        """End one hold of the pusher (see ``_push_holds``)."""
        self._push_holds -= 1
        if not self._push_holds:
            self._push_released.set()
            self._push_released = trio.Event()

    def _release_frames(self) -> None:
        """Give the subscriber back the bytes of the message frames the socket took."""
        frames = self._held_frames
        sent = self._sent_total
        released = 0
        while frames and frames[0][0] <= sent:
            released += frames.popleft()[1]
        if released and self.subscriber is not None:
            self.subscriber.release(released)

    def _wake_waiters(self) -> None:
        """Unpark whoever waits for output room (they look again at what they wait for)."""
        self._progress.unpark_all()

    async def _pump(self, subscriber: Subscriber, *, wait: bool, upto: int | None = None) -> None:
        """Stage queued messages, oldest first, while fewer than ``PUSH_WINDOW`` bytes pend.

        A message is taken from the outbox only when there is room, so a
        slow reader's backlog stays in the outbox (bounded by the hub); a
        staged frame counts against the subscriber's limit until the socket
        took it (``Subscriber.hold``, released by :meth:`_release_frames`).
        With ``wait`` (before a reply or a confirmation is staged) it waits
        for room until every message queued when it was called (or, with
        ``upto``, every one of the first ``upto`` the subscriber ever got)
        is staged: later ones are the pusher's. Without, it stops at the
        first lack of room. ``Subscriber.get`` on a non-empty outbox returns
        without yielding, so the taking itself never waits.

        Raises:
            _Overflowed: the hub ended the subscriber (past its limit).
            _OutputStalled: waiting for room, nothing was written for
                ``output_timeout`` seconds while the output limit was reached.
        """
        target = (subscriber.delivered if upto is None else upto) if wait else -1
        resp3 = self.protocol == 3
        while subscriber.pending_bytes and not subscriber.ended:
            if wait and subscriber.taken >= target:
                break
            if self.pending >= PUSH_WINDOW:
                if not wait:
                    return
                await self._wait_push_room(subscriber)
                continue
            message = await subscriber.get()
            frame = _message_frame(message, resp3)
            size = len(frame)
            if not subscriber.hold(size):
                break  # overflowed: raised below
            self._stage.append(frame)
            self._staged += size
            self.pending += size
            self._held_frames.append((self._sent_total + self.pending, size))
            if self._staged >= FLUSH_THRESHOLD:
                self._flush_stage()
        if subscriber.overflowed:
            raise _Overflowed

    async def _wait_push_room(self, subscriber: Subscriber) -> None:
        """Wait until the socket takes some output (or the subscriber is ended).

        The hub's ``on_end`` hook (given at the first subscribe) unparks the
        wait when it ends the subscriber. Over the output limit with nothing
        written for ``output_timeout`` seconds is a stall, as for replies.
        """
        self._flush_stage()
        if self._broken:
            raise trio.BrokenResourceError("the client went away")
        limits = self.server.limits
        while self.pending >= PUSH_WINDOW and not subscriber.ended:
            with trio.move_on_after(limits.output_timeout) as scope:
                await self._progress.park()
            if not scope.cancelled_caught:
                return  # some output was taken, or the subscriber ended
            if self.pending >= limits.max_output_buffer:
                raise _OutputStalled

    async def _pusher(self, subscriber: Subscriber) -> None:
        """Write the messages the hub delivers to ``subscriber``, as the socket takes them.

        Runs in the connection's nursery from the first subscribe until the
        connection ends. When the hub ends the subscriber (overflow), the
        connection is closed at once, its pending output dropped, as Redis
        frees a client past ``client-output-buffer-limit pubsub``.
        """
        try:
            while not subscriber.closed:
                await subscriber.wait()
                if self._push_holds:  # a reply is being made: the reader stages first
                    await self._push_released.wait()
                    continue
                await self._pump(subscriber, wait=False)
                self._flush_stage()
                if subscriber.pending_bytes and not subscriber.ended:
                    await self._wait_push_room(subscriber)
        except _Overflowed:
            self._log_overflow()
        except _OutputStalled:
            logger.warning(
                "closing RESP client id=%d addr=%s: %d reply bytes pending (limit %d)"
                " and nothing read for %.1f s",
                self.id,
                self.addr,
                self.pending,
                self.server.limits.max_output_buffer,
                self.server.limits.output_timeout,
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        else:
            return
        if self._scope is not None:
            self._scope.cancel()

    def _log_overflow(self) -> None:
        if self._overflow_logged:  # the reader and the pusher may both find it
            return
        self._overflow_logged = True
        logger.warning(
            "closing RESP client id=%d addr=%s: its pub/sub messages passed"
            " pubsub_buffer_limit (%d bytes) while it did not read them",
            self.id,
            self.addr,
            self.subscriber.limit if self.subscriber is not None else 0,
        )

    # -- CLIENT PAUSE ----------------------------------------------------------------

    async def _hold_if_paused(
        self,
        calls: list[tuple[str, Sequence[bytes]]],
        early: list[tuple[int, bytes]],
        name: str,
    ) -> None:
        """Wait out the CLIENT PAUSE that holds back command ``name``, if one does.

        Called for each command once its early errors (unknown, arity,
        NOAUTH, RESP2 subscribed mode) are known not to apply, and before it
        is queued in MULTI, as Redis's ``processCommand`` postpones a client:
        the commands before it run and their replies go out first; it and
        the client's later commands wait. WRITE holds back
        :func:`_pauses_on_write` commands, and an EXEC of a transaction that
        queued one.
        """
        write = _pauses_on_write(name) or (
            name == "exec"
            and self.multi is not None
            and any(_pauses_on_write(queued) for queued, _, _ in self.multi)
        )
        if not self.server.paused_for(write):
            return
        await self._run_calls(calls, early)
        await self._wait_unpaused(write)

    async def _wait_unpaused(self, write: bool) -> None:
        """Wait (trio time, cancellable) until no pause holds back a command of this kind.

        The replies staged so far go out first. Meanwhile the socket is still
        read, as Redis reads a paused client: what arrives is parsed after
        the pause (:attr:`_fed_while_paused`), within ``max_query_buffer``
        (past it the parser fails and the client is closed once the pause
        ends, as for any overflow); a client that leaves ends its connection
        at once, and the commands it sent never run (Redis frees it).
        Nothing is left behind: the count of paused clients is given back
        however the wait ends.
        """
        server = self.server
        if not server.paused_for(write):
            return
        self._flush_stage()
        self.paused = True
        server.paused_clients += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_while_paused)
                while server.paused_for(write):
                    with trio.move_on_at(server.pause_end):
                        await server.unpaused.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.paused = False
            server.paused_clients -= 1
        self.last_activity = self._clock.current_time()  # a paused client was not idle

    async def _watch_while_paused(self) -> None:
        """While a pause holds the reader: take what the client sends and see it leave."""
        raw = self._raw
        if raw is None:
            return  # trio's socket layout unknown: everything is read after the pause
        parser = self._parser
        while not parser.failed:
            await trio.lowlevel.wait_readable(raw)
            try:
                data = raw.recv(RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError:  # reset: gone as well
                data = b""
            if not data:
                logger.info(
                    "RESP client id=%d addr=%s left while paused: its held commands dropped",
                    self.id,
                    self.addr,
                )
                self.killed = True
                if self._scope is not None:
                    self._scope.cancel()
                return
            parser.feed(data)
            self._fed_while_paused = True

    # -- executing -----------------------------------------------------------------

    async def _execute(self, commands: list[tuple[bytes, ...]]) -> None:
        """Run the commands of one read in order and stage their replies.

        A lone data command from an authenticated client (one request per
        read, as at ``-P 1``) goes straight to ``engine.execute``; anything
        else goes through :meth:`_execute_batch`. Both give the replies,
        counters and errors the batch path gives. A CLIENT NO-TOUCH client,
        and every client while a CLIENT PAUSE is set, take the batch path,
        which maps the calls to their variants and waits out the pause.
        """
        server = self.server
        if (
            len(commands) == 1
            and self.authenticated
            and self.multi is None
            and not self.muted
            and self.subscriber is None
            and not self.no_touch
            and not server.pause_mode
        ):
            argv = commands[0]
            known = _DATA_NAMES.get(argv[0])
            if known is not None and known[1] <= len(argv) <= known[2]:
                name = known[0]
                server.total_commands += 1
                self.last_cmd = name
                start = _clock_ns()
                if name in _COALESCED:
                    (result,) = await server.coalescer.execute_many([(name, argv[1:])])
                    if isinstance(result, KVMemoError):
                        result = server.error_reply(result)
                else:
                    try:
                        result = await server.engine.execute(name, argv[1:])
                    except KVMemoError as exc:
                        result = server.error_reply(exc)
                elapsed = _clock_ns() - start
                if elapsed >= server.slowlog.threshold_ns:  # the slow log's one comparison
                    self._slow(elapsed, argv)
                reply = encode_reply(result, protocol=self.protocol)
                size = len(reply)
                if (
                    self.pending + size <= server.limits.max_output_buffer
                    and self._staged + size < FLUSH_THRESHOLD
                ):  # what _push does when nothing waits or flushes
                    self._stage.append(reply)
                    self._staged += size
                    self.pending += size
                else:
                    await self._push(reply)
                return
        await self._execute_batch(commands)

    async def _execute_batch(self, commands: list[tuple[bytes, ...]]) -> None:
        """Run commands in order, data commands gathered into one engine call.

        Data commands are gathered into one ``execute_many`` call until a
        connection command (or the end) comes, or ``PIPELINE_CHUNK``
        replies are gathered (data commands' and early ones): those are run
        and staged (waiting for room under the output limit) before the
        next command is looked at, which bounds what a client that does not
        read makes the server hold (see the module's design notes). Replies known without the
        engine (errors, ``PING``) are kept in ``early`` with their place among
        the replies, and merged with the engine's by :meth:`_run_calls`.
        """
        server = self.server
        self._batch = commands  # for the slow log's entry (read only when a batch is slow)
        calls: list[tuple[str, Sequence[bytes]]] = []
        early: list[tuple[int, bytes]] = []  # (place among the replies, reply)
        authenticated = self.authenticated  # changed only by connection commands
        restricted = self.protocol == 2 and self.subscribed  # idem: RESP2 subscribed mode
        data_names = _DATA_NAMES
        for argv in commands:
            if len(calls) + len(early) >= PIPELINE_CHUNK:  # bounds the replies made at once
                await self._run_calls(calls, early)
            server.total_commands += 1
            if (
                not authenticated
                and type(argv) is not InlineArgs  # Redis limits multibulk requests only
                and (len(argv) > UNAUTH_MAX_ARGS or any(len(a) > UNAUTH_MAX_BULK for a in argv))
            ):
                await self._run_calls(calls, early)
                message = _UNAUTH_MBULK if len(argv) > UNAUTH_MAX_ARGS else _UNAUTH_BULK
                logger.info("RESP client id=%d addr=%s: %s", self.id, self.addr, message)
                await self._push(self._encode(ErrorReply(message)))
                self.closing = True
                return
            known = data_names.get(argv[0])  # a data command, spelled as seen before
            conn_command = None
            if known is None:
                name = _text(argv[0].lower())
                conn_command = _CONNECTION_COMMANDS.get(name)
                if conn_command is None:
                    spec = COMMANDS.get(name)
                    if spec is None:
                        early.append((len(calls) + len(early), self._encode(unknown_command(argv))))
                        if self.multi is not None:
                            self.multi_dirty = True
                        continue
                    known = (name, *_arity_range(spec.arity))
                    if len(data_names) < DATA_NAMES_MAX:
                        data_names[argv[0]] = known
            if known is not None:
                name, least, most = known
                self.last_cmd = name
                if not least <= len(argv) <= most:
                    server.reject(name)
                    early.append((len(calls) + len(early), self._encode(_arity_error(name))))
                    if self.multi is not None:
                        self.multi_dirty = True
                elif not authenticated:
                    server.reject(name)
                    early.append((len(calls) + len(early), self._encode(NOAUTH)))
                elif restricted:
                    server.reject(name)
                    early.append((len(calls) + len(early), self._encode(_pubsub_only(argv))))
                elif self.multi is not None and await self._refused_for_memory(name):
                    server.reject(name)
                    self.multi_dirty = True
                    early.append((len(calls) + len(early), self._encode(OOM)))
                else:
                    if server.pause_mode:
                        await self._hold_if_paused(calls, early, name)
                    if self.multi is not None:
                        early.append(
                            (len(calls) + len(early), self._encode(self._queue_call(name, argv)))
                        )
                    elif name in _PUBLISHES and self.subscriber is not None:
                        # Run by itself: a message it sends this connection goes after
                        # the replies before it and before its own, as Redis writes it.
                        await self._run_calls(calls, early)
                        calls.append((name, argv[1:]))
                        await self._run_calls(calls, early, own_messages_first=True)
                    else:
                        calls.append((name, argv[1:]))
                continue
            assert conn_command is not None
            self.last_cmd = name
            # Its name in INFO commandstats: client|list; None: an unknown subcommand.
            stat = _stat_name(name, conn_command.handler, argv)
            error: ErrorReply | None
            if not arity_ok(conn_command.arity, len(argv)):
                server.reject(name)
                error = self._refuse(name, _arity_error(name))
            else:
                error = _subcommand_error(name, conn_command, argv)
                if error is not None and stat is not None:  # the subcommand's arity
                    server.reject(stat)
            if error is not None:
                early.append((len(calls) + len(early), self._encode(error)))
                if self.multi is not None:
                    self.multi_dirty = True
                continue
            stat = stat or name  # known from here on (else refused above)
            if not authenticated and not conn_command.no_auth:
                server.reject(stat)
                early.append((len(calls) + len(early), self._encode(self._refuse(name, NOAUTH))))
                continue
            if restricted and name not in _PUBSUB_CONTEXT:
                server.reject(stat)
                error = self._refuse(name, _pubsub_only(argv))
                early.append((len(calls) + len(early), self._encode(error)))
                continue
            if (
                self.multi is not None
                and name not in _REDIS_NO_MULTI
                and await self._refused_for_memory(name)
            ):
                server.reject(stat)
                refusal = OOM
                if name == "exec":  # the transaction is discarded, watches too
                    refusal = self._refuse(name, OOM)
                else:
                    self.multi_dirty = True
                early.append((len(calls) + len(early), self._encode(refusal)))
                continue
            if server.pause_mode:
                await self._hold_if_paused(calls, early, name)
            if self.multi is not None and name not in _TRANSACTION_CONTROL:
                # Queued, as Redis queues them; AUTH and HELLO are refused.
                if name in _NO_MULTI or (name == "client" and argv[1].lower() == b"reply"):
                    reply: object = NOT_IN_MULTI
                    self.multi_dirty = True
                    server.reject(stat)
                elif name == "ssubscribe":  # queued; EXEC answers Redis 7.0's refusal
                    reply = self._queue_local(name, argv, _ssubscribe_in_exec)
                else:
                    reply = self._queue_local(name, argv, conn_command.handler)
                early.append((len(calls) + len(early), self._encode(reply)))
                continue
            if name == "ping":  # no effect to keep in order: answer in place
                started = _clock_ns()
                pong = _pubsub_ping(argv) if restricted else _ping(argv)
                self._ran("ping", started, pong)
                early.append((len(calls) + len(early), self._encode(pong)))
                continue
            await self._run_calls(calls, early)
            subscriber = self.subscriber
            if subscriber is None:
                started = _clock_ns()
                reply = await conn_command.handler(self, argv)
                self._ran(stat, started, reply)
                if reply is not NO_REPLY:
                    await self._deliver([self._encode(reply)])
            else:  # its reply before any message published after it ran (EXEC's too)
                mark = subscriber.delivered
                self._push_holds += 1
                try:
                    started = _clock_ns()
                    reply = await conn_command.handler(self, argv)
                    self._ran(stat, started, reply)
                    if reply is not NO_REPLY:
                        await self._deliver([self._encode(reply)], upto=mark)
                finally:
                    self._release_pushes()
            if self.closing:
                return
            authenticated = self.authenticated
            restricted = self.protocol == 2 and self.subscribed
        await self._run_calls(calls, early)

    def _ran(self, stat: str, started_ns: int, reply: object) -> None:
        """Count a connection command that ran, in INFO commandstats (and the
        engine's metrics): its time since ``started_ns``, or, when it answered
        an error, a failed call (as Redis's ``call`` counts them)."""
        elapsed = (_clock_ns() - started_ns) * 1e-9
        self.server.engine.record_call(stat, elapsed, failed=type(reply) is ErrorReply)

    def _refuse(self, name: str, error: ErrorReply) -> ErrorReply:
        """The reply to connection command ``name`` refused before it ran (Redis's
        ``rejectCommand``): ``error``, but a refused EXEC (wrong arity, NOAUTH,
        RESP2 subscribed mode) discards the transaction and every watch, in
        MULTI or not, and answers ``EXECABORT`` with the reason."""
        if name != "exec":
            return error
        self.end_transaction()
        return ErrorReply(
            "EXECABORT Transaction discarded because of: " + error.message.removeprefix("ERR ")
        )

    async def _refused_for_memory(self, name: str) -> bool:
        """Whether command ``name``, sent in MULTI, is refused with ``OOM`` (Redis's
        ``processCommand``, before it queues a command).

        Redis refuses any command of a client in MULTI while used memory is
        over ``maxmemory`` and eviction cannot bring it back (queueing takes
        memory too), not only ``denyoom`` ones, except EXEC, DISCARD, QUIT and
        RESET; and an EXEC whose transaction queued a ``denyoom`` command, at
        EXEC's time (then the transaction is discarded). The same test here:
        :attr:`MemoryTracker.over_limit` (one comparison, all a client pays
        while under the limit), then :meth:`KVEngine.out_of_memory` (under an
        evicting policy, eviction runs first). The caller answers ``OOM`` and
        marks the transaction for EXECABORT, as Redis's ``rejectCommand``.
        """
        assert self.multi is not None
        engine = self.server.engine
        if not engine.tracker.over_limit:
            return False
        if name in _RUN_OVER_MEMORY and (
            name != "exec" or not any(queued in _DENYOOM for queued, _, _ in self.multi)
        ):
            return False
        return await engine.out_of_memory()

    def _queue_call(self, name: str, argv: tuple[bytes, ...]) -> object:
        """Queue a data command of the open transaction: QUEUED, or its error (EXEC will
        abort; the call counts as rejected, as Redis counts a call refused there)."""
        assert self.multi is not None
        full = self._queue_full()
        if full is not None:
            self.server.reject(name)
            return full
        try:
            self.server.engine.check_transaction_call(name, argv[1:])
        except KVMemoError as exc:
            self.multi_dirty = True
            self.server.reject(name)
            return redis_error(exc)
        self.multi.append((name, argv, None))
        return QUEUED

    def _queue_local(self, name: str, argv: tuple[bytes, ...], handler: Handler) -> object:
        """Queue a connection command of the open transaction (run in its place at EXEC)."""
        assert self.multi is not None
        full = self._queue_full()
        if full is not None:
            self.server.reject(_stat_name(name, handler, argv) or name)
            return full
        self.multi.append((name, argv, handler))
        return QUEUED

    def _queue_full(self) -> ErrorReply | None:
        assert self.multi is not None
        most = self.server.limits.max_transaction_commands
        if len(self.multi) < most:
            return None
        self.multi_dirty = True
        return ErrorReply(
            f"ERR a transaction holds at most {most} commands (max_transaction_commands)"
        )

    async def _run_calls(
        self,
        calls: list[tuple[str, Sequence[bytes]]],
        early: list[tuple[int, bytes]],
        *,
        own_messages_first: bool = False,
    ) -> None:
        """Run the gathered data commands, stage every reply in order, empty both lists.

        ``engine.execute`` for one call (it costs less than a batch of one),
        ``engine.execute_many`` for more. The engine call is timed as a whole
        for the slow log (see :meth:`_slow_batch`).

        A subscribed connection (RESP3) holds its pusher meanwhile, and
        stages before the replies only the messages queued before the call:
        one published while the commands ran comes after their replies, never
        before a reply older than it. ``own_messages_first``: a PUBLISH run
        alone, whose message to this connection goes before its count, as
        Redis writes it.
        """
        subscriber = self.subscriber
        if subscriber is None or not calls:
            await self._run_calls_now(calls, early, None)
            return
        self._push_holds += 1
        try:
            await self._run_calls_now(
                calls, early, None if own_messages_first else subscriber.delivered
            )
        finally:
            self._release_pushes()

    async def _run_calls_now(
        self,
        calls: list[tuple[str, Sequence[bytes]]],
        early: list[tuple[int, bytes]],
        mark: int | None,
    ) -> None:
        if calls:
            engine = self.server.engine
            # CLIENT NO-TOUCH: the reads' variants that record no access.
            run = _untouched(calls) if self.no_touch else calls
            start = _clock_ns()
            if len(run) == 1:
                try:
                    result = await engine.execute(*run[0])
                except KVMemoError as exc:
                    result = exc
                results: list[Any] = [result]
            elif all(name in _COALESCED for name, _ in run):
                results = await self.server.coalescer.execute_many(run)
            else:
                results = await engine.execute_many(run)
            elapsed = _clock_ns() - start
            if elapsed >= self.server.slowlog.threshold_ns:  # the slow log's one comparison
                self._slow_batch(elapsed, calls)
            calls.clear()
            if len(results) > 1 and self.pending + _payload(results) > (
                self.server.limits.max_output_buffer
            ):
                await self._deliver_each(results, early, mark)
                return
            replies = encode_replies(results, protocol=self.protocol, convert=self.server.reply_of)
            if early:
                replies = _merge(replies, early)
        elif early:
            replies = [reply for _, reply in early]
        else:
            return
        early.clear()
        await self._deliver(replies, upto=mark)

    async def _deliver_each(
        self, results: list[Any], early: list[tuple[int, bytes]], mark: int | None
    ) -> None:
        """Encode and stage a batch's replies one at a time, in request order.

        For a batch whose replies would not fit under ``max_output_buffer``
        (a pipeline of GETs of a big value): each reply is encoded only once
        the one before it is staged (:meth:`_push` waits for room), so the
        encoded output a connection holds stays ``max_output_buffer`` plus
        one reply, however many replies a few request bytes ask for. The
        results themselves (fresh copies for GETRANGE, LCS, DUMP) are held
        until the last is staged: :meth:`_execute_batch` runs at most
        ``PIPELINE_CHUNK`` commands per engine call for that. Empties ``early``.
        """
        protocol = self.protocol
        reply_of = self.server.reply_of
        place = 0
        waiting = deque(early)
        early.clear()
        for result in results:
            while waiting and waiting[0][0] == place:
                await self._deliver([waiting.popleft()[1]], upto=mark)
                place += 1
            await self._deliver([encode_reply(reply_of(result), protocol=protocol)], upto=mark)
            place += 1
        for _, reply in waiting:
            await self._deliver([reply], upto=mark)

    # -- the slow log -----------------------------------------------------------------

    def _slow(self, elapsed_ns: int, argv: Sequence[bytes], more_commands: int = 0) -> None:
        """Log a call that took at least ``slowlog-log-slower-than`` (the caller compared).

        What is timed is the engine call only (no reading, parsing or
        sending): a lone command's ``engine.execute``, and a batch's (the
        data commands of one read between connection commands, a pipeline
        coalesced with other clients', an EXEC's transaction) one engine call
        as a whole, logged as one entry: its first command, and how many more
        ran with it (:meth:`_slow_batch`).
        """
        self.server.slowlog.record(
            elapsed_ns,
            argv,
            self.addr.encode(),
            self.name,
            time.time(),
            more_commands=more_commands,
        )

    def _slow_batch(self, elapsed_ns: int, calls: Sequence[tuple[str, Sequence[bytes]]]) -> None:
        """Log a slow batch: its first command as the client spelled it (found in
        the requests of the read, :attr:`_batch`), and the number of the others."""
        name, args = calls[0]
        argv: Sequence[bytes] = (name.encode(), *args)
        for request in self._batch:
            known = _DATA_NAMES.get(request[0])
            if known is not None and known[0] == name and request[1:] == tuple(args):
                argv = request
                break
        self._slow(elapsed_ns, argv, len(calls) - 1)

    def close_idle(self, now: float) -> None:
        """The idle sweep's close of a client that waits for its next request
        (:attr:`reading`): as :meth:`kill`, logged."""
        logger.info(
            "closing idle RESP client id=%d addr=%s (silent for %.1f s)",
            self.id,
            self.addr,
            now - self.last_activity,
        )
        self.kill()

    def kill(self) -> None:
        """CLIENT KILL of another client: stop serving it now; pending replies are
        dropped and the connection closed (by :func:`_handle`)."""
        self.killed = True
        if self.subscriber is not None:
            self.subscriber.close()  # at once, as Redis's freeClient: NUMSUB drops now
        if self._scope is not None:
            self._scope.cancel()

    # -- describing the client -------------------------------------------------------

    def info_line(self) -> str:
        """This client as one line of CLIENT LIST."""
        now = trio.current_time()
        fd = self.stream.socket.fileno()
        subscriber = self.subscriber
        sub = psub = ssub = 0
        if subscriber is not None:
            sub, psub = len(subscriber.channels), len(subscriber.patterns)
            ssub = subscriber.shard_count
        # Redis's letters in its order: P (pubsub), x (MULTI, or running EXEC),
        # b (blocked: CLIENT PAUSE), e (no-evict), T (no-touch); N for none.
        queued = self.multi
        executing = self.executing
        multi = len(queued) if queued is not None else -1 if executing is None else executing
        flags = (
            ("P" if sub or psub or ssub else "")
            + ("x" if multi >= 0 else "")
            + ("b" if self.paused else "")
            + ("e" if self.no_evict else "")
            + ("T" if self.no_touch else "")
        )
        return (
            f"id={self.id} addr={self.addr} laddr={self.laddr} fd={fd} name={_text(self.name)}"
            f" age={int(now - self.created)} idle={int(now - self.last_activity)}"
            f" flags={flags or 'N'} db=0"
            f" sub={sub} psub={psub} ssub={ssub}"
            f" multi={multi}"
            f" qbuf={self.query_buffered} qbuf-free=0"
            f" argv-mem=0 multi-mem=0 rbs={RECEIVE_SIZE} rbp=0 obl=0 oll={len(self._queue)}"
            f" omem={self.pending} tot-mem={self.pending + self.query_buffered} events=r"
            f" cmd={self.last_cmd} user=default redir=-1 resp={self.protocol}"
            f" lib-name={_text(self.lib_name)} lib-ver={_text(self.lib_ver)}\n"
        )


def _payload(values: Sequence[object]) -> int:
    """The bytes of the strings in ``values``, arrays looked into: about their encoded size."""
    total = 0
    for value in values:
        if type(value) is bytes:
            total += len(value)
        elif isinstance(value, list | tuple):
            total += _payload(value)
    return total


def _unauthenticated_limit(parser: RespParser) -> ProtocolError | None:
    """Redis's limits on a request an unauthenticated client is sending, checked
    as it is read (as Redis does: the unparsed rest of a request is never held
    past them): more than ``UNAUTH_MAX_ARGS`` arguments, or an argument longer
    than ``UNAUTH_MAX_BULK`` bytes, is a protocol error. Multibulk requests
    only, as Redis's ``processMultibulkBuffer``: an inline one (``reading``
    says ``(0, 0)``; complete, it is :class:`InlineArgs`) is bounded by
    ``max_inline_len`` and goes on to the command checks (unknown command,
    arity, ``NOAUTH``)."""
    count, length = parser.reading
    if count > UNAUTH_MAX_ARGS:
        return ProtocolError(_UNAUTH_MBULK)
    if length > UNAUTH_MAX_BULK:
        return ProtocolError(_UNAUTH_BULK)
    return None


def _untouched(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[tuple[str, Sequence[bytes]]]:
    """A CLIENT NO-TOUCH client's ``calls``: each read that records an access as
    its variant that records none (``commands.table.NO_TOUCH``; TOUCH stays)."""
    variant = NO_TOUCH.get
    return [(variant(name, name), args) for name, args in calls]


def _pauses_on_write(name: str) -> bool:
    """Whether CLIENT PAUSE WRITE holds back command ``name``: Redis's write and
    may-replicate commands, as KVMemo has them (the table's write commands,
    PUBLISH and SPUBLISH, and the connection commands flagged write: MOVE,
    SWAPDB)."""
    if name in _PUBLISHES:
        return True
    conn_command = _CONNECTION_COMMANDS.get(name)
    if conn_command is not None:
        return "write" in conn_command.flags
    spec = COMMANDS.get(name)
    return spec is not None and "write" in spec.flags


def _merge(replies: list[bytes], early: list[tuple[int, bytes]]) -> list[bytes]:
    """``replies`` with each ``(place, reply)`` of ``early`` put at its place.

    The places are increasing and count both kinds of reply, so the result is
    the replies in the order of the requests.
    """
    merged: list[bytes] = []
    rest = iter(replies)
    for place, reply in early:
        merged.extend(islice(rest, place - len(merged)))
        merged.append(reply)
    merged.extend(rest)
    return merged


def _schedule_points(task: trio.lowlevel.Task) -> int | None:
    """How many times ``task`` has yielded to the scheduler; None if trio does not say."""
    points = getattr(task, "_schedule_points", None)
    return points if isinstance(points, int) else None


def _address(stream: trio.SocketStream, *, peer: bool) -> str:
    try:
        where = stream.socket.getpeername() if peer else stream.socket.getsockname()
    except OSError:
        return "?:0"
    if isinstance(where, tuple):
        host = where[0]
        return f"[{host}]:{where[1]}" if ":" in host else f"{host}:{where[1]}"
    return str(where)


# -- connection commands -----------------------------------------------------------------


def _ping(argv: tuple[bytes, ...]) -> object:
    if len(argv) > 2:
        return _arity_error("ping")
    return argv[1] if len(argv) == 2 else "PONG"


def _connection_command(
    name: str, arity: int, flags: str, summary: str, *, no_auth: bool = False
) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _CONNECTION_COMMANDS[name] = _ConnCommand(
            name, arity, tuple(flags.split()), handler, summary, no_auth
        )
        return handler

    return register


async def _ping_handler(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return _ping(argv)


_connection_command("ping", -1, "fast sentinel", "PONG, or the message")(_ping_handler)


@_connection_command("quit", -1, "noscript loading stale fast no_auth", "close", no_auth=True)
async def _quit(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    conn.closing = True
    return "OK"


def _valid_attr(value: bytes) -> bool:
    return all(0x21 <= c <= 0x7E for c in value)


@_connection_command(
    "hello",
    -1,
    "noscript loading stale fast no_auth sentinel",
    "handshake: protocol version, authentication, client name",
    no_auth=True,
)
async def _hello(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    version = 0
    if len(argv) >= 2:
        try:
            version = parse_int(argv[1])
        except KVMemoError:
            return ErrorReply("ERR Protocol version is not an integer or out of range")
        if version not in (2, 3):
            return NOPROTO
    user: bytes | None = None
    password = b""
    name: bytes | None = None
    i = 2
    while i < len(argv):
        opt = argv[i].upper()
        more = len(argv) - 1 - i
        if opt == b"AUTH" and more >= 2:
            user, password = argv[i + 1], argv[i + 2]
            i += 3
        elif opt == b"SETNAME" and more >= 1:
            name = argv[i + 1]
            if not _valid_attr(name):
                return ErrorReply(
                    "ERR Client names cannot contain spaces, newlines or special characters."
                )
            i += 2
        else:
            return ErrorReply(f"ERR Syntax error in HELLO option '{_text(argv[i])}'")
    if user is not None:
        error = _authenticate(conn, user, password)
        if error is not None:
            return error
    if not conn.authenticated:
        return HELLO_NOAUTH
    if name is not None:
        conn.name = name
    if version:
        conn.protocol = version
    return {
        b"server": b"redis",
        b"version": REDIS_VERSION.encode(),
        b"proto": conn.protocol,
        b"id": conn.id,
        b"mode": b"standalone",
        b"role": b"master",
        b"modules": [],
    }


def _authenticate(conn: _Connection, user: bytes, password: bytes) -> ErrorReply | None:
    """AUTH user password: the only user is ``default``; its passwords are the tokens."""
    server = conn.server
    if user != b"default":
        return WRONGPASS
    if server.auth_required and not server.check_password(password):
        return WRONGPASS
    conn.authenticated = True
    return None


@_connection_command(
    "auth", -2, "noscript loading stale fast no_auth sentinel", "authenticate", no_auth=True
)
async def _auth(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    if len(argv) > 3:
        return SYNTAX_ERROR
    if len(argv) == 2:
        if not conn.server.auth_required:
            return AUTH_NOT_CONFIGURED
        error = _authenticate(conn, b"default", argv[1])
    else:
        error = _authenticate(conn, argv[1], argv[2])
    return "OK" if error is None else error


@_connection_command(
    "reset", 1, "noscript loading stale fast no_auth", "reset the connection", no_auth=True
)
async def _reset(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    subscriber = conn.subscriber
    if subscriber is not None:  # leave everything, without confirmations (Redis's RESET)
        await conn._pump(subscriber, wait=True)  # what was published before goes first
        subscriber.unsubscribe()
        subscriber.punsubscribe()
        subscriber.sunsubscribe()
    conn.end_transaction()
    conn.protocol = 2
    conn.name = b""
    conn.no_touch = False  # Redis 7.2's RESET clears NO-TOUCH
    # A CLIENT REPLY SKIP before it is spent on RESET's own reply, as in Redis
    # (which clears OFF, and SKIP for the commands after, before it replies).
    skip = conn.skip_reply and not conn.replies_off
    conn.replies_off = conn.skip_reply = conn.muted = False
    conn.authenticated = not conn.server.auth_required
    return NO_REPLY if skip else "RESET"


# -- pub/sub: (P|S)SUBSCRIBE, (P|S)UNSUBSCRIBE --------------------------------------------------

# The commands that may make a connection's subscriber (the first subscribe).
_SUBSCRIBES: Final = frozenset({"subscribe", "psubscribe", "ssubscribe"})
# The table's publishing commands: run by themselves on a subscribed connection.
_PUBLISHES: Final = frozenset({"publish", "spublish"})
# What a RESP2 client with a subscription may run (Redis's processCommand).
_PUBSUB_CONTEXT: Final = frozenset(
    {
        "subscribe",
        "unsubscribe",
        "psubscribe",
        "punsubscribe",
        "ssubscribe",
        "sunsubscribe",
        "ping",
        "quit",
        "reset",
    }
)


def _pubsub_only(argv: tuple[bytes, ...]) -> ErrorReply:
    """Redis's refusal of a command in RESP2 subscribed mode, naming it as Redis does
    (``client|list``); a container's unknown subcommand or wrong arity is that error."""
    name = _text(argv[0].lower())
    full = name
    subcommands: dict[str, int] | None = None
    spec = COMMANDS.get(name)
    if spec is not None and spec.subcommands:
        subcommands = {sub.name: sub.arity for sub in spec.subcommands}
    conn_command = _CONNECTION_COMMANDS.get(name)
    if conn_command is not None and conn_command.handler in _DISPATCHED:
        subcommands = {n: sub.arity for n, sub in _DISPATCHED[conn_command.handler].items()}
    if subcommands is not None and len(argv) > 1:
        sub_name = _text(argv[1].lower())
        arity = subcommands.get(sub_name)
        if arity is None:
            return _unknown_subcommand(argv)
        full = f"{name}|{sub_name}"
        if not arity_ok(arity, len(argv)):
            return _arity_error(full)
    return ErrorReply(
        f"ERR Can't execute '{full}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT"
        " / RESET are allowed in this context"
    )


def _pubsub_ping(argv: tuple[bytes, ...]) -> object:
    """PING in RESP2 subscribed mode: ``pong`` and the message (empty without one)."""
    if len(argv) > 2:
        return _arity_error("ping")
    return [b"pong", argv[1] if len(argv) == 2 else b""]


def _message_frame(message: Message, resp3: bool) -> bytes:
    """A delivered message as Redis pushes it: ``message ch data``, ``smessage ch data``
    or ``pmessage pat ch data``."""
    protocol = 3 if resp3 else 2
    if message.shard:
        return encode_push((b"smessage", message.channel, message.data), protocol=protocol)
    if message.pattern is None:
        return encode_push((b"message", message.channel, message.data), protocol=protocol)
    return encode_push(
        (b"pmessage", message.pattern, message.channel, message.data), protocol=protocol
    )


async def _subscription(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return await conn.change_subscriptions(_text(argv[0].lower()), argv[1:])


for _name, _arity, _summary in (
    ("subscribe", -2, "listen for messages published to the given channels"),
    ("unsubscribe", -1, "stop listening to the given channels (every channel without one)"),
    ("psubscribe", -2, "listen for messages published to channels matching the patterns"),
    ("punsubscribe", -1, "stop listening to the given patterns (every pattern without one)"),
    ("ssubscribe", -2, "listen for messages published to the given shard channels"),
    (
        "sunsubscribe",
        -1,
        "stop listening to the given shard channels (every shard channel without one)",
    ),
):
    _connection_command(_name, _arity, "pubsub noscript loading stale", _summary)(_subscription)


async def _ssubscribe_in_exec(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """SSUBSCRIBE queued in MULTI, answered by EXEC as Redis 7.0 answers it there (its
    MULTI client is "deny blocking"; SUBSCRIBE is exempted, SSUBSCRIBE is not)."""
    return ErrorReply("ERR SSUBSCRIBE isn't allowed for a DENY BLOCKING client")


# -- transactions: MULTI, EXEC, DISCARD, WATCH, UNWATCH -------------------------------------

# What a client in MULTI runs at once instead of queueing (as Redis).
_TRANSACTION_CONTROL: Final = frozenset({"multi", "exec", "discard", "watch", "quit", "reset"})
# Refused inside MULTI (and the transaction is then discarded).
# (P)(UN)SUBSCRIBE and SUNSUBSCRIBE too: Redis 7.0 queues them, and EXEC's
# array then counts one element for each while it holds one per channel
# (redis#12207). SSUBSCRIBE is queued: Redis's EXEC refuses it (see
# _ssubscribe_in_exec), so its array counts right.
_NO_MULTI: Final = frozenset(
    {
        "auth",
        "hello",
        "shutdown",
        "subscribe",
        "unsubscribe",
        "psubscribe",
        "punsubscribe",
        "sunsubscribe",
    }
)
# Of those, what Redis itself refuses in MULTI (its ``no_multi`` flag), before
# its memory check: over maxmemory, Redis answers OOM to the others (it would
# queue them), and so does KVMemo.
_REDIS_NO_MULTI: Final = frozenset({"shutdown"})
# What a client in MULTI may send over maxmemory (Redis's processCommand):
# EXEC only when its transaction queued no denyoom command.
_RUN_OVER_MEMORY: Final = frozenset({"exec", "discard", "quit", "reset"})


@_connection_command("multi", 1, "noscript loading stale fast allow_busy", "start a transaction")
async def _multi(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    if conn.multi is not None:
        return ErrorReply("ERR MULTI calls can not be nested")
    conn.multi = []
    conn.multi_dirty = False
    return "OK"


@_connection_command(
    "exec", 1, "noscript loading stale skip_slowlog", "run the queued commands as one step"
)
async def _exec(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    queued, dirty, watches = conn.multi, conn.multi_dirty, conn.watches
    if queued is None:
        return ErrorReply("ERR EXEC without MULTI")
    conn.multi = None
    conn.multi_dirty = False
    conn.watches = []
    # While the queued commands run, CLIENT INFO / LIST show the transaction
    # as Redis does inside EXEC: flag x, multi=<queued commands>, cmd=exec.
    conn.executing = len(queued)
    try:
        return await _run_exec(conn, queued, dirty, watches)
    finally:
        conn.executing = None


async def _run_exec(
    conn: _Connection,
    queued: list[tuple[str, tuple[bytes, ...], Handler | None]],
    dirty: bool,
    watches: list[tuple[int, bytes, int]],
) -> object:
    engine = conn.server.engine
    try:
        if dirty:
            return EXECABORT
        data = [(name, argv[1:]) for name, argv, handler in queued if handler is None]
        start = _clock_ns()
        results = await engine.execute_transaction(
            _untouched(data) if conn.no_touch else data, watches
        )
        elapsed = _clock_ns() - start
        if data and elapsed >= conn.server.slowlog.threshold_ns:
            first = next(argv for _, argv, handler in queued if handler is None)
            conn._slow(elapsed, first, len(data) - 1)
    except KVMemoError as exc:
        return redis_error(exc)
    finally:
        if watches:
            engine.unwatch(watches)
    if results is None:
        return NULL_ARRAY  # a watched key was written: nothing ran
    # Connection commands run now, in their places among the replies.
    answers = iter(results)
    replies: list[object] = []
    server = conn.server
    for name, args, handler in queued:
        if handler is None:
            replies.append(server.reply_of(next(answers)))  # counted by the engine
        else:
            started = _clock_ns()
            reply = await handler(conn, args)
            conn._ran(_stat_name(name, handler, args) or name, started, reply)
            if type(reply) is ErrorReply:  # inside EXEC's array: not seen by _encode
                server.count_error(reply.message)
            replies.append(reply)
    return replies


@_connection_command("discard", 1, "noscript loading stale fast allow_busy", "drop the transaction")
async def _discard(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    if conn.multi is None:
        return ErrorReply("ERR DISCARD without MULTI")
    conn.end_transaction()
    return "OK"


@_connection_command(
    "watch", -2, "noscript loading stale fast allow_busy", "abort the next EXEC if keys change"
)
async def _watch(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    if conn.multi is not None:
        return ErrorReply("ERR WATCH inside MULTI is not allowed")
    watched = {key for _, key, _ in conn.watches}
    fresh = list(dict.fromkeys(key for key in argv[1:] if key not in watched))
    if fresh:
        try:
            conn.watches.extend(await conn.server.engine.watch(fresh))
        except KVMemoError as exc:
            return redis_error(exc)
    return "OK"


@_connection_command("unwatch", 1, "noscript loading stale fast allow_busy", "forget every WATCH")
async def _unwatch(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    if conn.watches:
        conn.server.engine.unwatch(conn.watches)
        conn.watches = []
    return "OK"


@_connection_command("select", 2, "loading stale fast", "change the database (only 0)")
async def _select(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    try:
        index = parse_int(argv[1])
    except KVMemoError:
        return NOT_INTEGER
    if not -(1 << 31) <= index < 1 << 31:  # Redis reads the index as a C int
        return ErrorReply(
            "ERR value is out of range, value must between -2147483648 and 2147483647"
        )
    if index != 0:
        return ErrorReply("ERR DB index is out of range")
    return "OK"


def _int_or(raw: bytes, error: ErrorReply) -> int | ErrorReply:
    """``raw`` as a 64-bit integer (Redis's ``string2ll``), or ``error``."""
    try:
        return parse_int(raw)
    except KVMemoError:
        return error


def _c_int(raw: bytes, error: ErrorReply) -> int | ErrorReply:
    """``raw`` as a C ``int``, as Redis's ``getIntFromObjectOrReply`` reads a DB index."""
    value = _int_or(raw, NOT_INTEGER)
    if isinstance(value, ErrorReply):
        return error
    if not -(1 << 31) <= value < 1 << 31:
        if error is NOT_INTEGER:
            return ErrorReply(
                "ERR value is out of range, value must between -2147483648 and 2147483647"
            )
        return error
    return value


@_connection_command("move", 3, "write fast", "move a key to another database (only 0)")
async def _move(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """MOVE key db: KVMemo has one database, so this never moves anything; the
    errors are those of Redis started with ``databases 1``."""
    index = _c_int(argv[2], NOT_INTEGER)
    if isinstance(index, ErrorReply):
        return index
    if index == 0:
        return ErrorReply("ERR source and destination objects are the same")
    return ErrorReply("ERR DB index is out of range")


@_connection_command("swapdb", 3, "write fast", "swap two databases (only 0 with itself)")
async def _swapdb(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """SWAPDB index1 index2: as Redis with ``databases 1``: 0 with 0 is OK (nothing to do)."""
    first = _c_int(argv[1], ErrorReply("ERR invalid first DB index"))
    if isinstance(first, ErrorReply):
        return first
    second = _c_int(argv[2], ErrorReply("ERR invalid second DB index"))
    if isinstance(second, ErrorReply):
        return second
    if first != 0 or second != 0:
        return ErrorReply("ERR DB index is out of range")
    return "OK"


# SHUTDOWN, ROLE, WAIT ---------------------------------------------------------------------

SHUTDOWN_FAILED: Final = ErrorReply("ERR Errors trying to SHUTDOWN. Check logs.")
SHUTDOWN_UNAVAILABLE: Final = ErrorReply(
    "ERR SHUTDOWN is not available: this server runs inside another program, which stops it"
)


@_connection_command(
    "shutdown", -1, "admin noscript loading stale no_multi sentinel allow_busy", "stop the server"
)
async def _shutdown(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """SHUTDOWN [NOSAVE|SAVE] [NOW] [FORCE] [ABORT]: stop the whole server gracefully.

    On success there is no reply: the connection closes (after the replies
    of the commands before it), as redis-cli expects. The stop itself is the
    owner's (:attr:`_Server.stop`: ``kvmemo serve`` drains and exits 0, as on
    SIGTERM); without one the command is refused (:data:`SHUTDOWN_UNAVAILABLE`).

    With persistence on, the default and SAVE keep the final snapshot the
    graceful stop takes; NOSAVE asks to skip it (the logs stay: nothing
    acknowledged is lost either way). Refused, unless FORCE, as Redis
    refuses when its save would fail (:data:`SHUTDOWN_FAILED`, the reason
    logged): SAVE without persistence (nothing to save to), and SAVE or the
    default while a shard's writes are not being made durable. NOW is
    accepted (there are no replicas to wait for); ABORT has no shutdown to
    abort (an accepted one is not pausable).
    """
    flags = set()
    for arg in argv[1:]:
        flag = arg.lower()
        if flag not in (b"nosave", b"save", b"now", b"force", b"abort"):
            return SYNTAX_ERROR
        flags.add(flag)
    if (b"abort" in flags and len(flags) > 1) or {b"save", b"nosave"} <= flags:
        return SYNTAX_ERROR
    if b"abort" in flags:
        return ErrorReply("ERR No shutdown in progress.")
    server = conn.server
    engine = server.engine
    save = b"nosave" not in flags
    if b"force" not in flags:
        problems: list[str] = []
        if b"save" in flags and engine.persistence is None:
            problems = ["persistence is off (no data directory): there is nothing to save to"]
        elif save and engine.persistence is not None:
            problems = engine.persistence_problems()
        if problems:
            logger.warning(
                "SHUTDOWN from RESP client id=%d addr=%s refused (FORCE overrides): %s",
                conn.id,
                conn.addr,
                "; ".join(problems),
            )
            return SHUTDOWN_FAILED
    origin = f"RESP client id={conn.id} addr={conn.addr}"
    if server.stop is None or not server.stop(StopRequest(save=save, origin=origin)):
        return SHUTDOWN_UNAVAILABLE
    conn.closing = True
    return NO_REPLY


@_connection_command("role", 1, "noscript loading stale fast sentinel", "replication role")
async def _role(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """ROLE: a master without replicas (offset 0, no replica)."""
    return [b"master", 0, []]


@_connection_command("wait", 3, "noscript", "wait for replicas (there are none)")
async def _wait(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """WAIT numreplicas timeout: 0 replicas acknowledged, at once.

    Redis blocks until the timeout when asked for more replicas than it
    has; here there are never any, so it answers 0 at once (never a hang).
    The arguments are checked as Redis checks them.
    """
    replicas = _int_or(argv[1], NOT_INTEGER)
    if isinstance(replicas, ErrorReply):
        return replicas
    timeout = _int_or(argv[2], ErrorReply("ERR timeout is not an integer or out of range"))
    if isinstance(timeout, ErrorReply):
        return timeout
    if timeout < 0:
        return ErrorReply("ERR timeout is negative")
    if timeout > LLONG_MAX - int(time.time() * 1000):
        return ErrorReply("ERR timeout is out of range")
    return 0


# SLOWLOG ----------------------------------------------------------------------------------

# Redis's flags for the subcommands of its containers (COMMAND INFO), as most have them.
_ADMIN: Final = "admin loading stale"
_ADMIN_NOSCRIPT: Final = "admin noscript loading stale"
_NOSCRIPT: Final = "noscript loading stale"
_HELP: Final = "loading stale"
_HELP_SUMMARY: Final = "what the subcommands do"

_SLOWLOG_COUNT: Final = ErrorReply("ERR count should be greater than or equal to -1")


async def _slowlog_get(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """SLOWLOG GET [count]: the newest ``count`` entries (10; -1: all)."""
    if len(argv) > 3:
        return ErrorReply(
            f"ERR unknown subcommand or wrong number of arguments for '{_text(argv[1][:128])}'."
            " Try SLOWLOG HELP."
        )
    count = 10
    if len(argv) == 3:
        parsed = _int_or(argv[2], _SLOWLOG_COUNT)
        if isinstance(parsed, ErrorReply) or parsed < -1:
            return _SLOWLOG_COUNT
        count = parsed
    return [list(entry) for entry in conn.server.slowlog.get(count)]


async def _slowlog_len(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return len(conn.server.slowlog.entries)


async def _slowlog_reset(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    conn.server.slowlog.reset()
    return "OK"


async def _slowlog_help(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return [
        "SLOWLOG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
        "GET [<count>]",
        "    Return top <count> entries from the slowlog (default: 10, -1 mean all).",
        "    Entries are made of:",
        "    id, timestamp, time in microseconds, arguments array, client IP and port,",
        "    client name",
        "LEN",
        "    Return the length of the slowlog.",
        "RESET",
        "    Reset the slowlog.",
        "HELP",
        "    Prints this help.",
    ]


_connection_command("slowlog", -2, "admin noscript loading stale", "the slow log")(
    _dispatch(
        {
            "get": _SubCommand(-2, _slowlog_get, _ADMIN, "the newest entries", "2.2.12"),
            "len": _SubCommand(2, _slowlog_len, _ADMIN, "the number of entries", "2.2.12"),
            "reset": _SubCommand(2, _slowlog_reset, _ADMIN, "forget every entry", "2.2.12"),
            "help": _SubCommand(2, _slowlog_help, _HELP, _HELP_SUMMARY, "6.2.0"),
        }
    )
)


# LATENCY ----------------------------------------------------------------------------------
#
# KVMemo has no latency monitor (Redis's ``latency-monitor-threshold``: events
# such as a slow fork or fsync, sampled with their times). LATENCY answers as
# Redis answers when no event was ever recorded, which is always true here,
# and DOCTOR and HELP say so and where the latencies KVMemo does measure are.

_LATENCY_DOCTOR: Final = (
    "KVMemo has no latency monitor: it records no latency events, so LATENCY LATEST and"
    " LATENCY HISTORY are always empty and there is nothing to analyse. What it measures:"
    " each command's engine latency, as the kvmemo_command_duration_seconds histograms of"
    " GET /metrics on the HTTP port, and the slow calls, in SLOWLOG GET.\n"
)


async def _latency_latest(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return []  # no event: Redis's empty array


async def _latency_history(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return []  # no sample of any event, known to Redis or not


async def _latency_reset(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return 0  # the number of event series reset: there are none


async def _latency_graph(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return ErrorReply(f"ERR No samples available for event '{_text(argv[2])}'")


async def _latency_doctor(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return Verbatim(_LATENCY_DOCTOR)


async def _latency_help(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    # Redis 7.0's LATENCY HELP, less HISTOGRAM (per-command histograms in Redis's
    # format: see /metrics), and a word on what KVMemo does not record.
    return [
        "LATENCY <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
        "DOCTOR",
        "    Return a human readable latency analysis report.",
        "GRAPH <event>",
        "    Return an ASCII latency graph for the <event> class.",
        "HISTORY <event>",
        "    Return time-latency samples for the <event> class.",
        "LATEST",
        "    Return the latest latency samples for all events.",
        "RESET [<event> ...]",
        "    Reset latency data of one or more <event> classes.",
        "    (default: reset all data for all event classes)",
        "HELP",
        "    Prints this help.",
        "KVMemo has no latency monitor: no latency event is ever recorded, so LATEST and",
        "HISTORY are empty, GRAPH has no samples and RESET resets none (0). Command",
        "latencies are in GET /metrics (HTTP port) and SLOWLOG.",
    ]


_connection_command("latency", -2, "admin noscript loading stale", "latency diagnostics")(
    _dispatch(
        {
            "doctor": _SubCommand(
                2, _latency_doctor, _ADMIN_NOSCRIPT, "why there is nothing to analyse", "2.8.13"
            ),
            "graph": _SubCommand(
                3, _latency_graph, _ADMIN_NOSCRIPT, "an event's graph (none)", "2.8.13"
            ),
            "history": _SubCommand(
                3, _latency_history, _ADMIN_NOSCRIPT, "an event's samples (none)", "2.8.13"
            ),
            "latest": _SubCommand(
                2, _latency_latest, _ADMIN_NOSCRIPT, "every event's latest sample (none)", "2.8.13"
            ),
            "reset": _SubCommand(
                -2, _latency_reset, _ADMIN_NOSCRIPT, "reset events' samples (none)", "2.8.13"
            ),
            "help": _SubCommand(2, _latency_help, _HELP, _HELP_SUMMARY, "2.8.13"),
        }
    )
)


# ACL --------------------------------------------------------------------------------------
#
# The Redis port has one user, ``default``, whose passwords are the server's
# tokens (AUTH): WHOAMI and USERS name it; there is nothing else to manage, so
# the other subcommands are unknown ones, in Redis's words.


async def _acl_whoami(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return b"default"


async def _acl_users(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return [b"default"]


async def _acl_help(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    # Redis 7.0's ACL HELP, less what KVMemo does not have (users to manage).
    return [
        "ACL <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
        "USERS",
        "    List all the registered usernames.",
        "WHOAMI",
        "    Return the current connection username.",
        "HELP",
        "    Prints this help.",
    ]


_connection_command("acl", -2, "noscript loading stale", "the connection's user (ACL)")(
    _dispatch(
        {
            "users": _SubCommand(2, _acl_users, _ADMIN_NOSCRIPT, "the user names", "6.0.0"),
            "whoami": _SubCommand(2, _acl_whoami, _NOSCRIPT, "the connection's user", "6.0.0"),
            "help": _SubCommand(2, _acl_help, _HELP, _HELP_SUMMARY, "6.0.0"),
        }
    )
)


# CLIENT ---------------------------------------------------------------------------------


async def _client_id(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return conn.id


async def _client_setname(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    if not _valid_attr(argv[2]):
        return ErrorReply("ERR Client names cannot contain spaces, newlines or special characters.")
    conn.name = argv[2]
    return "OK"


async def _client_getname(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return conn.name or None


async def _client_list(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    clients = list(conn.server.clients.values())
    i = 2
    while i < len(argv):
        opt = argv[i].upper()
        if opt == b"TYPE" and i + 1 < len(argv):
            kind = argv[i + 1].lower()
            if kind not in (b"normal", b"master", b"replica", b"slave", b"pubsub"):
                return ErrorReply(f"ERR Unknown client type '{_text(argv[i + 1])}'")
            clients = [c for c in clients if _client_type(c) == kind]
            i += 2
        elif opt == b"ID" and i + 1 < len(argv):
            ids = set()
            for raw in argv[i + 1 :]:
                try:
                    ids.add(parse_int(raw))
                except KVMemoError:
                    return ErrorReply("ERR Invalid client ID")
            clients = [c for c in clients if c.id in ids]
            break
        else:
            return SYNTAX_ERROR
    return Verbatim("".join(c.info_line() for c in clients))


async def _client_info(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return Verbatim(conn.info_line())


async def _client_setinfo(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    attr = argv[2].upper()
    if attr not in (b"LIB-NAME", b"LIB-VER"):
        return ErrorReply(f"ERR Unrecognized option '{_text(argv[2])}'")
    if not _valid_attr(argv[3]):
        return ErrorReply(
            f"ERR {_text(attr)} cannot contain spaces, newlines or special characters."
        )
    if attr == b"LIB-NAME":
        conn.lib_name = argv[3]
    else:
        conn.lib_ver = argv[3]
    return "OK"


async def _client_no_touch(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT NO-TOUCH ON|OFF (Redis 7.2): with ON, the client's reads (GET, MGET,
    GETEX, DUMP) leave the keys' LRU/LFU data as it was (OBJECT IDLETIME and FREQ
    do not change); TOUCH still touches. Flag ``T`` in CLIENT LIST; RESET turns it off."""
    mode = argv[2].upper()
    if mode not in (b"ON", b"OFF"):
        return SYNTAX_ERROR
    conn.no_touch = mode == b"ON"
    return "OK"


_PAUSE_MODES: Final = {b"WRITE": PauseMode.WRITE, b"ALL": PauseMode.ALL}


async def _client_pause(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT PAUSE timeout [WRITE|ALL]: hold back the commands of every client of
    this port (the caller's included, after this reply) for ``timeout`` ms.

    ALL (the default) holds every command; WRITE those that change data or
    publish (:func:`_pauses_on_write`), and EXEC of a transaction that
    queued one; reads go on. A held command waits, with the client's later
    commands behind it, and runs when the pause ends (its timeout, or
    CLIENT UNPAUSE): never refused, never lost. Over a pause still running,
    the later end and the stricter mode win. Redis's checks in its order:
    the argument count, the mode, then the timeout (Redis 7.2's words; 0
    pauses nothing new).
    """
    if len(argv) > 4:
        return ErrorReply(
            f"ERR unknown subcommand or wrong number of arguments for '{_text(argv[1])}'."
            " Try CLIENT HELP."
        )
    mode = PauseMode.ALL
    if len(argv) == 4:
        found = _PAUSE_MODES.get(argv[3].upper())
        if found is None:
            return ErrorReply("ERR CLIENT PAUSE mode must be WRITE or ALL")
        mode = found
    timeout = _int_or(argv[2], ErrorReply("ERR timeout is not an integer or out of range"))
    if isinstance(timeout, ErrorReply):
        return timeout
    if timeout < 0:
        return ErrorReply("ERR timeout is negative")
    if timeout > LLONG_MAX - int(time.time() * 1000):  # Redis's end time would overflow
        return ErrorReply("ERR timeout is out of range")
    # 0 ends now: nothing is held back, but a pause running may turn ALL (as Redis).
    conn.server.pause(mode, trio.current_time() + timeout / 1000)
    return "OK"


async def _client_unpause(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT UNPAUSE: end the pause now; the commands it held run, each client's in order.

    Under PAUSE ALL it is held back itself, as in Redis (the pause then ends
    at its timeout)."""
    conn.server.unpause()
    return "OK"


async def _client_no_evict(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT NO-EVICT ON|OFF: Redis's exemption from client eviction
    (``maxclients-memory``). KVMemo never evicts a client for the memory
    clients use (the output limit is another rule, which Redis applies to
    no-evict clients too), so only the flag is kept: ``e`` in CLIENT LIST."""
    mode = argv[2].upper()
    if mode not in (b"ON", b"OFF"):
        return SYNTAX_ERROR
    conn.no_evict = mode == b"ON"
    return "OK"


# Client-side caching (CLIENT TRACKING ON) is not implemented: KVMemo sends no
# invalidation messages, so no client is ever in tracking mode, and the
# tracking subcommands answer as Redis answers a client that is not.
_TRACKING_REFUSED: Final = ErrorReply(
    "ERR CLIENT TRACKING ON is not supported: KVMemo has no client-side caching"
    " (no invalidation messages are sent)"
)
_CACHING_REFUSED: Final = ErrorReply(
    "ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN"
    " or OPTOUT mode enabled"
)


async def _client_tracking(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT TRACKING ON|OFF [options]: OFF (tracking is always off) answers OK
    after Redis's checks of the options; ON is refused with a clear error."""
    redirect: int | None = None
    i = 3
    while i < len(argv):
        opt = argv[i].upper()
        more = len(argv) - i - 1
        if opt == b"REDIRECT" and more >= 1:
            if redirect is not None:
                return ErrorReply("ERR A client can only redirect to a single other client")
            parsed = _int_or(argv[i + 1], NOT_INTEGER)
            if isinstance(parsed, ErrorReply):
                return parsed
            if parsed not in conn.server.clients:
                return ErrorReply("ERR The client ID you want redirect to does not exist")
            redirect = parsed
            i += 2
        elif opt in (b"BCAST", b"OPTIN", b"OPTOUT", b"NOLOOP"):
            i += 1
        elif opt == b"PREFIX" and more >= 1:
            i += 2
        else:
            return SYNTAX_ERROR
    mode = argv[2].upper()
    if mode == b"ON":
        return _TRACKING_REFUSED
    if mode == b"OFF":
        return "OK"
    return SYNTAX_ERROR


async def _client_caching(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT CACHING YES|NO: Redis's answer to a client not in tracking mode."""
    return _CACHING_REFUSED


async def _client_getredir(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT GETREDIR: -1, Redis's answer when tracking is off."""
    return -1


async def _client_trackinginfo(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT TRACKINGINFO: Redis's answer for a client with tracking off."""
    return {b"flags": Set([b"off"]), b"redirect": -1, b"prefixes": []}


async def _client_unblock(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT UNBLOCK id [TIMEOUT|ERROR]: 0, as Redis answers for a client that is
    not blocked: no KVMemo command blocks (``WAIT`` answers at once)."""
    if len(argv) > 4:
        return ErrorReply(
            "ERR unknown subcommand or wrong number of arguments for 'UNBLOCK'. Try CLIENT HELP."
        )
    if len(argv) == 4 and argv[3].upper() not in (b"TIMEOUT", b"ERROR"):
        return ErrorReply("ERR CLIENT UNBLOCK reason should be TIMEOUT or ERROR")
    parsed = _int_or(argv[2], NOT_INTEGER)
    return parsed if isinstance(parsed, ErrorReply) else 0


async def _client_reply(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT REPLY ON|OFF|SKIP: OFF and SKIP have no reply of their own.

    Refused inside MULTI (where Redis's own behaviour leaves EXEC's array
    short of elements), as AUTH and HELLO are.
    """
    mode = argv[2].upper()
    if mode == b"ON":
        conn.replies_off = conn.skip_reply = conn.muted = False
        return "OK"
    if mode == b"OFF":
        conn.replies_off = conn.muted = True
        return NO_REPLY
    if mode == b"SKIP":
        conn.skip_reply = conn.muted = True  # the next command's reply
        return NO_REPLY
    return SYNTAX_ERROR


_CLIENT_TYPES: Final = (b"normal", b"master", b"replica", b"slave", b"pubsub")


def _client_type(client: _Connection) -> bytes:
    """Redis's client type: ``pubsub`` while subscribed to something, else ``normal``."""
    return b"pubsub" if client.subscribed else b"normal"


async def _client_kill(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT KILL addr:port | CLIENT KILL <filter> <value> ...: as Redis 7.0.

    The old form answers OK, or ``No such client``; the filter form (``ID``,
    ``TYPE``, ``ADDR``, ``LADDR``, ``USER``, ``SKIPME``; a client must match
    every filter given) answers how many clients it killed, and skips the
    caller unless ``SKIPME no``. A killed client is dropped at once (its
    pending replies too, as Redis's ``freeClient``); the caller, when it is
    among them, gets its reply first, then is closed.
    """
    server = conn.server
    if len(argv) == 3:
        wanted = _text(argv[2])
        target = next((c for c in server.clients.values() if c.addr == wanted), None)
        if target is None:
            return ErrorReply("ERR No such client")
        _kill(conn, target)
        return "OK"
    client_id: int | None = None
    kind: bytes | None = None
    addr: str | None = None
    laddr: str | None = None
    skipme = True
    for i in range(2, len(argv), 2):
        opt = argv[i].lower()
        if i + 1 >= len(argv):
            return SYNTAX_ERROR
        value = argv[i + 1]
        if opt == b"id":
            parsed = _int_or(value, NOT_INTEGER)
            if isinstance(parsed, ErrorReply) or parsed < 1:
                return ErrorReply("ERR client-id should be greater than 0")
            client_id = parsed
        elif opt == b"type":
            kind = value.lower()
            if kind not in _CLIENT_TYPES:
                return ErrorReply(f"ERR Unknown client type '{_text(value)}'")
        elif opt == b"addr":
            addr = _text(value)
        elif opt == b"laddr":
            laddr = _text(value)
        elif opt == b"user":
            if value != b"default":  # the only user
                return ErrorReply(f"ERR No such user '{_text(value)}'")
        elif opt == b"skipme":
            if value.lower() not in (b"yes", b"no"):
                return SYNTAX_ERROR
            skipme = value.lower() == b"yes"
        else:
            return SYNTAX_ERROR
    if kind == b"slave":
        kind = b"replica"
    killed = 0
    for client in list(server.clients.values()):
        if (
            (client_id is not None and client.id != client_id)
            or (kind is not None and _client_type(client) != kind)
            or (addr is not None and client.addr != addr)
            or (laddr is not None and client.laddr != laddr)
            or (skipme and client is conn)
        ):
            continue
        _kill(conn, client)
        killed += 1
    return killed


def _kill(conn: _Connection, target: _Connection) -> None:
    """Kill ``target`` for ``conn``'s CLIENT KILL: the caller itself is closed after
    its reply; another client is taken out of the client list and stopped now."""
    if target is conn:
        conn.closing = True
        return
    conn.server.clients.pop(target.id, None)
    target.kill()


async def _client_help(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CLIENT HELP: Redis 7.0's text, for the subcommands KVMemo has (7.2's
    SETINFO and NO-TOUCH added)."""
    return [
        "CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
        "CACHING (YES|NO)",
        "    Always refused: client-side caching (tracking) is not supported.",
        "GETREDIR",
        "    Return the client ID we are redirecting to when tracking is enabled (always -1).",
        "GETNAME",
        "    Return the name of the current connection.",
        "ID",
        "    Return the ID of the current connection.",
        "INFO",
        "    Return information about the current client connection.",
        "KILL <ip:port>",
        "    Kill connection made from <ip:port>.",
        "KILL <option> <value> [<option> <value> [...]]",
        "    Kill connections. Options are:",
        "    * ADDR <ip:port>",
        "      Kill connections made from the specified address",
        "    * LADDR <ip:port>",
        "      Kill connections made to specified local address",
        "    * TYPE (NORMAL|MASTER|REPLICA|PUBSUB)",
        "      Kill connections by type.",
        "    * USER <username>",
        "      Kill connections authenticated by <username>.",
        "    * SKIPME (YES|NO)",
        "      Skip killing current connection (default: yes).",
        "    * ID <client-id>",
        "      Kill connections by client id.",
        "LIST [options ...]",
        "    Return information about client connections. Options:",
        "    * TYPE (NORMAL|MASTER|REPLICA|PUBSUB)",
        "      Return clients of specified type.",
        "    * ID <id> [<id> ...]",
        "      Return clients of specified IDs only.",
        "UNPAUSE",
        "    Stop the current client pause, resuming traffic.",
        "PAUSE <timeout> [WRITE|ALL]",
        "    Suspend all, or just write, clients for <timeout> milliseconds.",
        "REPLY (ON|OFF|SKIP)",
        "    Control the replies sent to the current connection.",
        "SETNAME <name>",
        "    Assign the name <name> to the current connection.",
        "SETINFO <option> <value>",
        "    Set client meta attr (LIB-NAME, LIB-VER).",
        "UNBLOCK <clientid> [TIMEOUT|ERROR]",
        "    Unblock the specified blocked client (no command blocks: always 0).",
        "TRACKING (ON|OFF) [REDIRECT <id>] [BCAST] [PREFIX <prefix> [...]]",
        "         [OPTIN] [OPTOUT] [NOLOOP]",
        "    Only OFF: client-side caching is not supported, ON is refused.",
        "TRACKINGINFO",
        "    Report tracking status for the current connection (always off).",
        "NO-EVICT (ON|OFF)",
        "    Protect current client connection from eviction (clients are never evicted).",
        "NO-TOUCH (ON|OFF)",
        "    Will not touch LRU/LFU stats when this mode is on.",
        "HELP",
        "    Prints this help.",
    ]


_connection_command("client", -2, "noscript loading stale", "the connection's client")(
    _dispatch(
        {
            "id": _SubCommand(2, _client_id, _NOSCRIPT, "the connection's id", "5.0.0"),
            "setname": _SubCommand(3, _client_setname, _NOSCRIPT, "name the connection", "2.6.9"),
            "getname": _SubCommand(2, _client_getname, _NOSCRIPT, "the connection's name", "2.6.9"),
            "list": _SubCommand(
                -2, _client_list, _ADMIN_NOSCRIPT, "the connected clients", "2.4.0"
            ),
            "info": _SubCommand(2, _client_info, _NOSCRIPT, "this connection", "6.2.0"),
            "kill": _SubCommand(
                -3, _client_kill, _ADMIN_NOSCRIPT, "close clients' connections", "2.4.0"
            ),
            "setinfo": _SubCommand(
                4, _client_setinfo, _NOSCRIPT, "the client library's name or version", "7.2.0"
            ),
            "reply": _SubCommand(
                3, _client_reply, _NOSCRIPT, "whether the server replies", "3.2.0"
            ),
            "no-evict": _SubCommand(
                3, _client_no_evict, _ADMIN_NOSCRIPT, "exempt from client eviction", "7.0.0"
            ),
            "no-touch": _SubCommand(
                3, _client_no_touch, _NOSCRIPT, "whether reads record key access", "7.2.0"
            ),
            "pause": _SubCommand(
                -3, _client_pause, _ADMIN_NOSCRIPT, "hold clients' commands back", "2.9.50"
            ),
            "unpause": _SubCommand(
                2, _client_unpause, _ADMIN_NOSCRIPT, "end CLIENT PAUSE", "6.2.0"
            ),
            "tracking": _SubCommand(
                -3, _client_tracking, _NOSCRIPT, "client-side caching (refused)", "6.0.0"
            ),
            "caching": _SubCommand(
                3, _client_caching, _NOSCRIPT, "client-side caching (refused)", "6.0.0"
            ),
            "getredir": _SubCommand(
                2, _client_getredir, _NOSCRIPT, "the tracking redirection (-1)", "6.0.0"
            ),
            "trackinginfo": _SubCommand(
                2, _client_trackinginfo, _NOSCRIPT, "the tracking status (off)", "6.2.0"
            ),
            "unblock": _SubCommand(
                -3, _client_unblock, _ADMIN_NOSCRIPT, "unblock a client (none blocks)", "5.0.0"
            ),
            "help": _SubCommand(2, _client_help, _HELP, _HELP_SUMMARY, "5.0.0"),
        }
    )
)

# COMMAND --------------------------------------------------------------------------------

_GENERIC: Final = frozenset(
    "del unlink exists touch expire pexpire expireat pexpireat ttl pttl expiretime"
    " pexpiretime persist type keys scan rename renamenx copy randomkey object dump restore".split()
)


# The bit commands, which Redis files under "bitmap" (category @bitmap), not "string".
_BITMAP: Final = frozenset("getbit setbit bitcount bitpos bitop bitfield bitfield_ro".split())


# The table's pub/sub commands (PUBLISH, PUBSUB ...): Redis's flags for them.
_PUBSUB_TABLE: Final = frozenset({"publish", "spublish", "pubsub"})
# Commands whose shard channels Redis 7 declares as key positions (so cluster
# clients route them by slot) with a ``not_key`` key spec: COMMAND INFO shows
# them; they are no keys (GETKEYS finds none, no shard is asked).
_CHANNEL_KEYS: Final = {
    "ssubscribe": (1, -1, 1),
    "sunsubscribe": (1, -1, 1),
    "spublish": (1, 1, 1),
}


# Write commands Redis does not flag ``denyoom`` (they remove keys, set or
# remove TTLs, or rename a key): Redis runs them even over maxmemory, a client
# routing on the flag does not refuse them under memory pressure, and KVMemo
# does not either: a RENAME's target is reserved past the limit
# (MemoryTracker.reserve), a first TTL's few bytes within an overdraft of one
# maximum-size entry past it (MemoryTracker.overdraw; OOM beyond).
_NOT_DENYOOM: Final = frozenset(
    {
        "del",
        "unlink",
        "expire",
        "pexpire",
        "expireat",
        "pexpireat",
        "persist",
        "getdel",
        "getex",
        "rename",
        "renamenx",
        "flushall",
        "flushdb",
    }
)


# The commands Redis flags ``denyoom``: the writes of the table but those above.
# Over maxmemory, an EXEC whose transaction queued one is refused (as Redis).
_DENYOOM: Final = frozenset(
    name for name, spec in COMMANDS.items() if "write" in spec.flags and name not in _NOT_DENYOOM
)


def _flags_of(spec: TableCommand | TableSubcommand, pubsub: bool = False) -> list[str]:
    flags = ["pubsub", "loading", "stale"] if pubsub and spec.name != "help" else []
    if "write" in spec.flags:
        flags += ["write"] if spec.name in _NOT_DENYOOM else ["write", "denyoom"]
    if "readonly" in spec.flags:
        flags.append("readonly")
    if "admin" in spec.flags:
        flags += ["admin", "noscript"]
    if "fast" in spec.flags:
        flags.append("fast")
    return flags


def _categories_of(flags: Sequence[str], keyed: bool, group: str) -> list[str]:
    """The ACL categories of a command with ``flags`` in ``group``, in Redis's order."""
    out = set()
    if "write" in flags:
        out.add("@write")
    if "readonly" in flags:
        out.add("@read")
    if keyed and group in _KEY_CATEGORY:  # MEMORY USAGE's key gives no category
        out.add(_KEY_CATEGORY[group])
    if "admin" in flags:
        out |= {"@admin", "@dangerous"}
    if "pubsub" in flags:
        out.add("@pubsub")
    out.add("@fast" if "fast" in flags else "@slow")
    if group in ("connection", "transaction"):
        out.add("@" + group)
    return [category for category in _CATEGORY_ORDER if category in out]


_KEY_CATEGORY: Final = {"generic": "@keyspace", "string": "@string", "bitmap": "@bitmap"}
# Redis's order of the categories (ACL CAT), those KVMemo's commands have.
_CATEGORY_ORDER: Final = (
    "@keyspace @read @write @string @bitmap @pubsub @admin @fast @slow @dangerous"
    " @connection @transaction"
).split()


def _group_of(spec: TableCommand) -> str:
    if "connection" in spec.flags:
        return "connection"
    if spec.name in _PUBSUB_TABLE:
        return "pubsub"
    if spec.name in _GENERIC:
        return "generic"
    if spec.name in _BITMAP:
        return "bitmap"
    return "string" if spec.first_key else "server"


# Connection commands that name keys: (first, last, step), as Redis's table says.
_CONNECTION_KEYS: Final = {"watch": (1, -1, 1), "move": (1, 1, 1)}


def _key_spec(first: int, last: int, step: int, flags: Sequence[str]) -> dict[bytes, object]:
    """A Redis 7 key specification (``index`` search, ``range`` keys) for ``first..last``.

    ``flags``: the access kind (``RO``, ``RW``) and what is done to the key.
    """
    lastkey = last - first if last > 0 else last
    return {
        b"flags": Set(flags),
        b"begin_search": {b"type": b"index", b"spec": {b"index": first}},
        b"find_keys": {
            b"type": b"range",
            b"spec": {b"lastkey": lastkey, b"keystep": step, b"limit": 0},
        },
    }


def _conn_subcommands(name: str) -> dict[str, _SubCommand] | None:
    """The subcommands of connection command ``name`` when Redis 7 lists it as a
    container (CLIENT, CONFIG, COMMAND, ACL, LATENCY, SLOWLOG), else None.

    DEBUG is no container in Redis (one command), so none of its
    subcommands (KVMemo's own) are listed either.
    """
    conn_command = _CONNECTION_COMMANDS.get(name)
    if conn_command is None or name in _NOT_REDIS_CONTAINERS:
        return None
    return _DISPATCHED.get(conn_command.handler)


# Connection commands with subcommands that Redis has as one command.
_NOT_REDIS_CONTAINERS: Final = frozenset({"debug"})
# The category group of the subcommands of the connection containers (the
# others: "server", no @connection), as Redis files them.
_CONNECTION_SUBCOMMANDS: Final = frozenset({"client", "command"})


def _conn_subcommand(full: str) -> tuple[str, _SubCommand] | None:
    """The connection container and subcommand that ``container|sub`` names, if any."""
    name, _, wanted = full.partition("|")
    subcommands = _conn_subcommands(name)
    if subcommands is None or wanted not in subcommands:
        return None
    return name, subcommands[wanted]


def _conn_sub_flags(sub: _SubCommand) -> list[str]:
    return sub.flags.split()


def _conn_sub_categories(container: str, sub: _SubCommand) -> list[str]:
    group = "connection" if container in _CONNECTION_SUBCOMMANDS else "server"
    return _categories_of(_conn_sub_flags(sub), False, group)


def _conn_sub_entry(container: str, name: str, sub: _SubCommand) -> list[object]:
    """The COMMAND INFO entry of a connection container's subcommand (``client|info``)."""
    return [
        f"{container}|{name}".encode(),
        sub.arity,
        Set(_conn_sub_flags(sub)),
        0,
        0,
        0,
        Set(_conn_sub_categories(container, sub)),
        Set(()),  # tips, key specs, subcommands: sets in RESP3, as Redis's
        Set(()),
        Set(()),
    ]


def _command_entry(name: str) -> list[object] | None:
    """One COMMAND INFO entry, in Redis 7's ten-field layout."""
    conn_command = _CONNECTION_COMMANDS.get(name)
    if conn_command is not None:
        subcommands = _conn_subcommands(name)
        subs: object = Set(())
        if subcommands is not None:
            # Its subcommands' entries in the tenth field (an array, not a
            # set, in RESP3 too, as Redis's).
            subs = [_conn_sub_entry(name, sub, spec) for sub, spec in subcommands.items()]
            if conn_command.arity == -2:
                # Only subcommands (CLIENT, CONFIG, ...): as Redis 7 lists a
                # container, no flags nor keys of its own.
                return [name.encode(), -2, Set(()), 0, 0, 0, Set(["@slow"]), Set(()), Set(()), subs]
        # Redis's COMMAND INFO never names its sentinel flag.
        flags = [flag for flag in conn_command.flags if flag != "sentinel"]
        categories = _command_categories(name)
        first, last, step = _CONNECTION_KEYS.get(name) or _CHANNEL_KEYS.get(name, (0, 0, 0))
        access = ["RW"] if "write" in flags else ["RO"]
        if name in _CHANNEL_KEYS:
            access = ["not_key"]
        specs = [_key_spec(first, last, step, access)] if first else []
        return [
            name.encode(),
            conn_command.arity,
            Set(flags),
            first,
            last,
            step,
            Set(categories),
            Set(()),  # tips, key specs, subcommands: sets in RESP3, as Redis's
            Set(specs),
            subs,
        ]
    if "|" in name:
        conn_sub = _conn_subcommand(name)
        if conn_sub is not None:
            container, sub = conn_sub
            return _conn_sub_entry(container, name.partition("|")[2], sub)
        found = _subcommand(name)
        return None if found is None else _entry(name, found[1], _group_of(found[0]))
    spec = COMMANDS.get(name)
    if spec is None:
        return None
    if spec.subcommands:
        # A container (OBJECT, MEMORY): as Redis 7 lists one, no flags nor
        # keys of its own, and its subcommands' entries (an array, not a
        # set, in RESP3 too) in the tenth field.
        group = _group_of(spec)
        subs = [_entry(f"{name}|{sub.name}", sub, group) for sub in spec.subcommands]
        return [name.encode(), spec.arity, Set(()), 0, 0, 0, Set(["@slow"]), Set(()), Set(()), subs]
    return _entry(name, spec, _group_of(spec))


def _subcommand(full: str) -> tuple[TableCommand, TableSubcommand] | None:
    """The container and subcommand that ``container|sub`` names, if any."""
    name, _, wanted = full.partition("|")
    spec = COMMANDS.get(name)
    if spec is None:
        return None
    sub = next((sub for sub in spec.subcommands if sub.name == wanted), None)
    return None if sub is None else (spec, sub)


def _subcommand_names() -> list[str]:
    """The subcommands as Redis names them (``object|encoding``, ``client|info``):
    COMMAND LIST lists them after the commands, as Redis 7 does."""
    table = [
        f"{name}|{sub.name}"
        for name, spec in COMMANDS.items()
        if "." not in name
        for sub in spec.subcommands
    ]
    connection = [
        f"{name}|{sub}" for name in _CONNECTION_COMMANDS for sub in _conn_subcommands(name) or ()
    ]
    return sorted(table + connection)


def _entry(name: str, spec: TableCommand | TableSubcommand, group: str) -> list[object]:
    """The COMMAND INFO entry of a plain command or of a subcommand (``object|encoding``)."""
    flags = _flags_of(spec, group == "pubsub")
    key_specs: list[object] = []
    first, last, step = spec.first_key, spec.last_key, spec.key_step
    if spec.first_key:
        # Redis's spelling; its finer per-command flags (OW, RM, insert,
        # delete, variable_flags) are not modelled.
        access = ["RW", "update"] if "write" in spec.flags else ["RO", "access"]
        key_specs.append(_key_spec(first, last, step, access))
    elif name in _CHANNEL_KEYS:  # SPUBLISH's channel: a position, not a key
        first, last, step = _CHANNEL_KEYS[name]
        key_specs.append(_key_spec(first, last, step, ["not_key"]))
    return [
        name.encode(),
        spec.arity,
        Set(flags),
        first,
        last,
        step,
        Set(_categories_of(flags, bool(spec.first_key), group)),
        Set(()),  # tips, key specs, subcommands: sets in RESP3, as Redis's
        Set(key_specs),
        Set(()),
    ]


def _all_command_names() -> list[str]:
    """What COMMAND lists: the Redis commands. The JSON-RPC spellings of the
    table (``command.list``, ``debug.actors``, ...) still run, but are not
    listed: Redis names have no dots, and DEBUG ACTORS / KILL say the same."""
    return sorted(name for name in set(COMMANDS) | set(_CONNECTION_COMMANDS) if "." not in name)


# COMMAND DOCS groups of the connection commands that Redis files elsewhere.
_CONNECTION_GROUPS: Final = {
    **dict.fromkeys(("multi", "exec", "discard", "watch", "unwatch"), "transactions"),
    **dict.fromkeys(
        ("command", "config", "info", "debug", "shutdown", "slowlog", "role", "swapdb"), "server"
    ),
    **dict.fromkeys(("wait", "move"), "generic"),
    **dict.fromkeys(("acl", "latency"), "server"),
    **dict.fromkeys(
        (
            "subscribe",
            "unsubscribe",
            "psubscribe",
            "punsubscribe",
            "ssubscribe",
            "sunsubscribe",
        ),
        "pubsub",
    ),
}
# COMMAND DOCS "since" of the connection commands Redis did not have in 1.0.0.
_CONNECTION_SINCE: Final = {
    **dict.fromkeys(("subscribe", "unsubscribe", "psubscribe", "punsubscribe"), "2.0.0"),
    **dict.fromkeys(("ssubscribe", "sunsubscribe"), "7.0.0"),
    "acl": "6.0.0",
    "latency": "2.8.13",
    "client": "2.4.0",
    "config": "2.0.0",
    "slowlog": "2.2.12",
    "command": "2.8.13",
}


def _command_doc(name: str) -> dict[bytes, object] | None:
    conn_command = _CONNECTION_COMMANDS.get(name)
    conn_sub = _conn_subcommand(name) if "|" in name else None
    if conn_command is not None:
        summary, since = conn_command.summary, _CONNECTION_SINCE.get(name, "1.0.0")
        group = _CONNECTION_GROUPS.get(name, "connection")
        subcommands = _conn_subcommands(name)
        if subcommands is not None:
            # A container: its subcommands' docs in a map, as Redis 7 gives them.
            return {
                b"summary": summary.encode(),
                b"since": since.encode(),
                b"group": group.encode(),
                b"subcommands": {
                    f"{name}|{sub}".encode(): _conn_sub_doc(group, spec)
                    for sub, spec in subcommands.items()
                },
            }
    elif conn_sub is not None:
        holder, held = conn_sub
        return _conn_sub_doc(_CONNECTION_GROUPS.get(holder, "connection"), held)
    elif "|" in name:
        found = _subcommand(name)
        if found is None:
            return None
        container, sub = found
        summary, group = sub.summary, _group_of(container)
        since = ".".join((container.since.split(".") + ["0", "0"])[:3])
    else:
        spec = COMMANDS.get(name)
        if spec is None:
            return None
        summary, group = spec.summary, _group_of(spec)
        since = ".".join((spec.since.split(".") + ["0", "0"])[:3])
        if spec.subcommands:
            return {
                b"summary": summary.encode(),
                b"since": since.encode(),
                b"group": group.encode(),
                b"subcommands": {
                    f"{name}|{sub.name}".encode(): {
                        b"summary": sub.summary.encode(),
                        b"since": since.encode(),
                        b"group": group.encode(),
                    }
                    for sub in spec.subcommands
                },
            }
    return {b"summary": summary.encode(), b"since": since.encode(), b"group": group.encode()}


def _conn_sub_doc(group: str, sub: _SubCommand) -> dict[bytes, object]:
    return {
        b"summary": sub.summary.encode(),
        b"since": sub.since.encode(),
        b"group": group.encode(),
    }


async def _command_all(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return [_command_entry(name) for name in _all_command_names()]


async def _command_count(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return len(_all_command_names())


async def _command_list(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """``COMMAND LIST [FILTERBY MODULE name | ACLCAT category | PATTERN pattern]``."""
    names = _all_command_names() + _subcommand_names()
    if len(argv) == 2:
        return [name.encode() for name in names]
    if len(argv) != 5 or argv[2].upper() != b"FILTERBY":
        return SYNTAX_ERROR
    kind, value = argv[3].upper(), argv[4]
    if kind == b"MODULE":
        return []  # no modules
    if kind == b"ACLCAT":
        category = "@" + _text(value.lower())
        return [name.encode() for name in names if category in _command_categories(name)]
    if kind == b"PATTERN":
        return [name.encode() for name in names if glob_match(value, name.encode(), nocase=True)]
    return SYNTAX_ERROR


def _command_categories(name: str) -> list[str]:
    """The ACL categories of a known command (as in its COMMAND INFO entry)."""
    conn_command = _CONNECTION_COMMANDS.get(name)
    if conn_command is not None:
        if conn_command.arity == -2 and _conn_subcommands(name) is not None:
            return ["@slow"]  # a container's own entry, as Redis 7's
        docs_group = _CONNECTION_GROUPS.get(name)
        group = "transaction" if docs_group == "transactions" else "connection"
        if docs_group == "pubsub":
            group = "pubsub"
        return _categories_of(conn_command.flags, False, group)
    conn_sub = _conn_subcommand(name) if "|" in name else None
    if conn_sub is not None:
        return _conn_sub_categories(*conn_sub)
    found = _subcommand(name) if "|" in name else None
    if found is not None:
        container, sub = found
        group = _group_of(container)
        return _categories_of(_flags_of(sub, group == "pubsub"), bool(sub.first_key), group)
    spec = COMMANDS[name]
    if spec.subcommands:
        return ["@slow"]  # a container's own entry, as Redis 7's: its subcommands have the rest
    group = _group_of(spec)
    return _categories_of(_flags_of(spec, group == "pubsub"), bool(spec.first_key), group)


async def _command_info(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    if len(argv) == 2:
        return await _command_all(conn, argv)
    return [_command_entry(_text(arg.lower())) for arg in argv[2:]]


async def _command_docs(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    names = [_text(arg.lower()) for arg in argv[2:]] or _all_command_names()
    docs: dict[bytes, object] = {}
    for name in names:
        doc = _command_doc(name)
        if doc is not None:
            docs[name.encode()] = doc
    return docs


async def _command_getkeys(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    # Redis's order: the name, then whether the command has keys at all,
    # then its number of arguments.
    name = _text(argv[2].lower())
    spec = COMMANDS.get(name)
    if spec is None and name not in _CONNECTION_COMMANDS:
        return ErrorReply("ERR Invalid command specified")
    if spec is not None and spec.subcommands:
        # A container: the subcommand's own arity and keys (``object encoding k``).
        wanted = argv[3].lower() if len(argv) > 3 else b""
        sub = next((s for s in spec.subcommands if s.name.encode() == wanted), None)
        if sub is None:
            return ErrorReply("ERR Invalid command specified")
        arity, first, last, step = sub.arity, sub.first_key, sub.last_key, sub.key_step
    elif spec is not None:
        arity, first, last, step = spec.arity, spec.first_key, spec.last_key, spec.key_step
    else:
        arity = _CONNECTION_COMMANDS[name].arity
        first, last, step = _CONNECTION_KEYS.get(name, (0, 0, 0))
    if not first:
        return ErrorReply("ERR The command has no key arguments")
    if not arity_ok(arity, len(argv) - 2):
        return ErrorReply("ERR Invalid number of arguments specified for command")
    args = argv[3:]
    end = len(args) if last < 0 else last
    return list(args[first - 1 : end : step])


async def _command_help(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return [
        "COMMAND <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
        "(no subcommand)",
        "    Return details about all commands.",
        "COUNT",
        "    Return the total number of commands in this server.",
        "LIST",
        "    Return a list of all commands in this server.",
        "INFO [<command-name> ...]",
        "    Return details about multiple commands.",
        "DOCS [<command-name> ...]",
        "    Return documentation details about multiple commands.",
        "GETKEYS <full-command>",
        "    Return the keys from a full command.",
        "HELP",
        "    Print this help.",
    ]


_COMMAND_SUBCOMMANDS: Final = {
    "count": _SubCommand(2, _command_count, _HELP, "the number of commands", "2.8.13"),
    "list": _SubCommand(-2, _command_list, _HELP, "the command names", "7.0.0"),
    "info": _SubCommand(-2, _command_info, _HELP, "commands' details", "2.8.13"),
    "docs": _SubCommand(-2, _command_docs, _HELP, "commands' documentation", "7.0.0"),
    # Redis 7.0's arity: a command and an argument.
    "getkeys": _SubCommand(-4, _command_getkeys, _HELP, "a command's keys", "2.8.13"),
    "help": _SubCommand(2, _command_help, _HELP, _HELP_SUMMARY, "5.0.0"),
}
_command_dispatch = _dispatch(_COMMAND_SUBCOMMANDS)


@_connection_command("command", -1, "loading stale sentinel", "the command table")
async def _command(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    if len(argv) == 1:
        return await _command_all(conn, argv)
    return await _command_dispatch(conn, argv)


_DISPATCHED[_command] = _COMMAND_SUBCOMMANDS  # COMMAND alone is all of them


# INFO -----------------------------------------------------------------------------------

# Section name -> its title, in INFO's order (Redis's, with Actors, ours, before Keyspace).
_SECTIONS: Final = {
    "server": "Server",
    "clients": "Clients",
    "memory": "Memory",
    "persistence": "Persistence",
    "stats": "Stats",
    "replication": "Replication",
    "cpu": "CPU",
    "commandstats": "Commandstats",
    "errorstats": "Errorstats",
    "latencystats": "Latencystats",
    "actors": "Actors",
    "keyspace": "Keyspace",
}
# INFO with no section, or ``default``: every section but commandstats and
# latencystats (as Redis); ``all`` and ``everything`` give every one.
_DEFAULT_SECTIONS: Final = frozenset(_SECTIONS) - {"commandstats", "latencystats"}
_ALL_SECTIONS: Final = frozenset(_SECTIONS)


def _human(nbytes: int) -> str:
    """Redis's ``bytesToHuman``."""
    for unit, size in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if nbytes >= size:
            return f"{nbytes / size:.2f}{unit}"
    return f"{nbytes}B"


def _redis_policy(name: str) -> str:
    return _POLICY_TO_REDIS.get(name, name)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _persistence_lines(persistence: dict[str, Any], started_at: float) -> list[tuple[str, object]]:
    """INFO's Persistence section, in Redis's field names, from ``info persistence``.

    KVMemo's write-ahead log plays the AOF's part (``aof_enabled``, its size,
    its last write's status: the logs' ``health`` alone) and its per-shard
    snapshots the RDB's (SAVE, BGSAVE, LASTSAVE; ``rdb_last_bgsave_status``
    is ``err`` while some shard's last snapshot, whatever started it, failed).
    BGREWRITEAOF, which compacts the logs with the same snapshots, has the
    AOF rewrite's fields (``aof_rewrite_in_progress``, ``aof_rewrite_scheduled``,
    ``aof_last_bgrewrite_status``: its own tickets' outcome, ``ok`` before any).
    Each status reflects its own mechanism only, as in Redis. A field KVMemo
    does not measure (Redis's ``rdb_changes_since_last_save``, copy-on-write
    sizes) is left out rather than given a made-up value.
    """
    enabled = bool(persistence.get("enabled"))
    last_save = persistence.get("last_save") if enabled else None
    ok = persistence.get("health", "ok") == "ok"
    lines: list[tuple[str, object]] = [
        ("loading", 0),
        ("async_loading", 0),
        ("rdb_bgsave_in_progress", int(bool(persistence.get("bgsave_in_progress")))),
        # Redis counts its data saved at start until the first save, as LASTSAVE does.
        ("rdb_last_save_time", int(last_save if last_save is not None else started_at)),
        ("rdb_last_bgsave_status", persistence.get("last_snapshot_status") or "ok"),
        ("aof_enabled", int(enabled)),
        # BGREWRITEAOF: a snapshot of every shard (it compacts the logs), with its own status.
        ("aof_rewrite_in_progress", int(bool(persistence.get("bgrewriteaof_in_progress")))),
        ("aof_rewrite_scheduled", int(bool(persistence.get("bgrewriteaof_scheduled")))),
        ("aof_last_bgrewrite_status", persistence.get("last_bgrewriteaof_status") or "ok"),
        ("aof_last_write_status", "ok" if ok else "err"),
    ]
    if enabled:
        lines.append(("aof_current_size", int(persistence.get("log_bytes") or 0)))
    return lines


def _commandstats_lines(server: _Server) -> list[tuple[str, object]]:
    """INFO commandstats, in Redis's format, by command name (Redis lists them in
    its hash table's order): what the engine counted since CONFIG RESETSTAT.

    Store-wide: every call the store ran, from either port or the embedded
    API, and this port's own commands (``ping``, ``client|list``, ...). A
    data command's subcommands count under its name (``object``). ``usec``
    is the time of the calls that succeeded (a failed call's is not measured).
    """
    base = server.commandstats_base
    lines: list[tuple[str, object]] = []
    for name, counts in sorted(server.engine.command_stats().items()):
        counts = counts.since(base.get(name))
        if not (counts.calls or counts.failed or counts.rejected):
            continue
        f = counts.fields()
        lines.append(
            (
                f"cmdstat_{name}",
                f"calls={f['calls']},usec={f['usec']},usec_per_call={f['usec_per_call']:.2f}"
                f",rejected_calls={f['rejected_calls']},failed_calls={f['failed_calls']}",
            )
        )
    return lines


def _percentile_name(percentile: float) -> str:
    """A percentile as Redis writes it (INFO latencystats' ``p99.9``, CONFIG GET):
    ``"%f"``, then trailing zeros and a trailing point dropped (``trimDoubleString``)."""
    text = f"{percentile:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _parse_percentiles(raw: bytes) -> tuple[float, ...]:
    """``latency-tracking-info-percentiles`` as Redis 7 reads it: split at each
    single space (an empty value is no percentile; two spaces make an empty
    one, refused), each read by ``string2d`` (:func:`parse_double`: ``1e1``,
    ``0x10``), in [0, 100].

    Raises:
        ValueError: Redis's reason, for CONFIG SET's error.
    """
    percentiles = []
    for part in raw.split(b" ") if raw else ():
        try:
            value = parse_double(part)
        except KVMemoError:
            raise ValueError("Invalid latency-tracking-info-percentiles parameters") from None
        if not 0.0 <= value <= 100.0:
            raise ValueError(
                "latency-tracking-info-percentiles parameters should sit between [0.0,100.0]"
            )
        percentiles.append(value)
    return tuple(percentiles)


def _latencystats_lines(server: _Server) -> list[tuple[str, object]]:
    """INFO latencystats, in Redis's format, by command name: the
    ``latency-tracking-info-percentiles`` of each command's latency since
    CONFIG RESETSTAT, in microseconds with 3 decimals
    (``latency_percentiles_usec_get:p50=5.000,p99=10.000,p99.9=10.000``);
    nothing while ``latency-tracking`` is off, as Redis.

    Read from the engine's histograms (the calls counted in commandstats'
    ``usec``: those that succeeded, of the whole store), whose buckets are
    :data:`~kvmemo.observability.metrics.DEFAULT_LATENCY_BUCKETS` (1-2-5
    steps from 5 µs to 10 s): each value is the upper bound of the bucket
    that holds the percentile's rank (:meth:`BucketCounts.value_at_percentile`,
    HdrHistogram's rule), so the true latency is at most it and above the
    bucket's lower bound; the 3 decimals are Redis's format, not precision
    (Redis's HdrHistogram keeps 2 significant digits). Past 10 s: 10 s.
    A command with no such call since the reset has no line.
    """
    settings = server.settings
    if not settings.latency_tracking:
        return []
    percentiles = [(_percentile_name(p), p) for p in settings.latency_percentiles]
    base = server.latencystats_base
    lines: list[tuple[str, object]] = []
    for name, counts in sorted(server.engine.command_latencies().items()):
        counts = counts.since(base.get(name))
        if not counts.total:
            continue
        values = ",".join(
            f"p{label}={counts.value_at_percentile(p) * 1e6:.3f}" for label, p in percentiles
        )
        lines.append((f"latency_percentiles_usec_{name}", values))
    return lines


async def info_text(server: _Server, sections: Sequence[str] = ()) -> str:
    """INFO's text: ``# Section`` headers and ``key:value`` lines, CRLF, as Redis.

    Args:
        sections: lower-case names; empty or ``default`` for every section
            but commandstats and latencystats, ``all`` or ``everything`` for
            every one. Unknown names are ignored.
    """
    wanted: set[str] = set()
    for section in sections or ("default",):
        if section == "default":
            wanted |= _DEFAULT_SECTIONS
        elif section in ("all", "everything"):
            wanted |= _ALL_SECTIONS
        else:
            wanted.add(section)
    engine = server.engine
    info = await engine.info()
    now = time.time()
    uptime = int(now - server.started_at)
    memory = info["memory"]
    stats = info["stats"]
    keyspace = info["keyspace"]
    cpu = os.times()
    content: dict[str, list[tuple[str, object]]] = {
        "server": [
            ("redis_version", REDIS_VERSION),
            ("redis_mode", "standalone"),
            ("kvmemo_version", __version__),
            ("os", f"{platform.system()} {platform.release()} {platform.machine()}"),
            ("arch_bits", 64),
            ("multiplexing_api", "trio"),
            ("python_version", platform.python_version()),
            ("process_id", os.getpid()),
            ("run_id", server.run_id),
            ("tcp_port", server.port),
            ("server_time_usec", int(now * 1_000_000)),
            ("uptime_in_seconds", uptime),
            ("uptime_in_days", uptime // 86400),
            ("config_file", server.config_file or ""),
            ("shards", engine.config.shards),
        ],
        "clients": [
            ("connected_clients", len(server.clients)),
            ("maxclients", server.limits.max_clients),
            ("blocked_clients", server.paused_clients),  # as Redis counts postponed ones
            ("tracking_clients", 0),
        ],
        "memory": [
            ("used_memory", memory["used_memory"]),
            ("used_memory_human", _human(memory["used_memory"])),
            ("used_memory_peak", memory["used_memory_peak"]),
            ("used_memory_peak_human", _human(memory["used_memory_peak"])),
            ("maxmemory", memory["maxmemory"]),
            ("maxmemory_human", _human(memory["maxmemory"])),
            ("maxmemory_policy", _redis_policy(memory["maxmemory_policy"])),
            ("eviction_watermark", memory["eviction_watermark"]),
            ("oom_refusals", memory["oom_refusals"]),
        ],
        "persistence": _persistence_lines(info["persistence"], server.started_at),
        "stats": [
            ("total_connections_received", server.total_connections),
            ("total_commands_processed", server.total_commands),
            ("rejected_connections", server.rejected_connections),
            ("expired_keys", stats["expired_keys"]),
            ("evicted_keys", stats["evicted_keys"]),
            ("pubsub_channels", stats["pubsub_channels"]),
            ("pubsub_patterns", stats["pubsub_patterns"]),
            ("pubsubshard_channels", stats["pubsubshard_channels"]),
            ("total_error_replies", sum(server.error_replies.values())),
            ("eviction_manager_running", stats["eviction_manager_running"]),
        ],
        "replication": [
            ("role", "master"),
            ("connected_slaves", 0),
            ("master_replid", server.run_id),
            ("master_repl_offset", 0),
        ],
        "cpu": [
            ("used_cpu_sys", f"{cpu.system:.6f}"),
            ("used_cpu_user", f"{cpu.user:.6f}"),
        ],
        "commandstats": _commandstats_lines(server) if "commandstats" in wanted else [],
        "errorstats": [
            (f"errorstat_{code}", f"count={count}")
            for code, count in sorted(server.error_replies.items())
        ],
        "latencystats": _latencystats_lines(server) if "latencystats" in wanted else [],
        "actors": [
            (a["name"], f"state={a['state']},restarts={a['restarts']},mailbox={a['mailbox']}")
            for a in info["actors"]
        ],
        "keyspace": (
            [("db0", f"keys={keyspace['keys']},expires={keyspace['expires']},avg_ttl=0")]
            if keyspace["keys"]
            else []
        ),
    }
    blocks = []
    for section, title in _SECTIONS.items():
        if section in wanted:
            lines = [f"# {title}\r\n"]
            lines += [f"{key}:{_value(value)}\r\n" for key, value in content[section]]
            blocks.append("".join(lines))
    return "\r\n".join(blocks)


@_connection_command("info", -1, "loading stale sentinel", "server information, as Redis")
async def _info(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    sections = [_text(arg.lower()) for arg in argv[1:]]
    return Verbatim(await info_text(conn.server, sections))


# CONFIG ---------------------------------------------------------------------------------


def _config_values(server: _Server) -> dict[str, str]:
    """Every parameter CONFIG GET knows, by Redis name."""
    engine = server.engine
    limits = server.limits
    return {
        "maxmemory": str(engine.tracker.maxmemory),
        "maxmemory-policy": _redis_policy(engine.eviction_policy),
        "maxmemory-samples": str(engine.config.eviction_sample),
        "maxclients": str(limits.max_clients),
        "timeout": _seconds(limits.idle_timeout),
        "proto-max-bulk-len": str(limits.max_bulk_len),
        "client-query-buffer-limit": str(limits.max_query_buffer),
        "save": "",
        "appendonly": "no" if engine.persistence is None else "yes",
        "appendfsync": (
            "everysec" if engine.persistence is None else engine.persistence.appendfsync.value
        ),
        "dir": "" if engine.persistence is None else str(engine.persistence.directory),
        "databases": "1",
        "port": str(server.port),
        "bind": server.host,
        "cluster-enabled": "no",
        "slowlog-log-slower-than": str(server.slowlog.slower_than),
        "slowlog-max-len": str(server.slowlog.max_len),
        "latency-tracking": "yes" if server.settings.latency_tracking else "no",
        "latency-tracking-info-percentiles": " ".join(
            _percentile_name(p) for p in server.settings.latency_percentiles
        ),
    }


def _seconds(value: float) -> str:
    """Seconds as CONFIG GET shows them: whole ones as an integer (Redis's
    ``timeout`` is one), a fraction (``--resp-idle-timeout 0.5``) as it is,
    never rounded to 0, which would read as "never"."""
    return str(int(value)) if value == int(value) else str(value)


async def _config_get(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CONFIG GET pattern...: each parameter once; a name without glob characters
    is looked up as such (any case) and answered in the caller's spelling, as Redis."""
    values = _config_values(conn.server)
    found: dict[bytes, bytes] = {}
    seen: set[str] = set()
    for pattern in argv[2:]:
        if not any(c in pattern for c in b"*?["):
            name = _text(pattern.lower())
            if name in values and name not in seen:
                seen.add(name)
                found[pattern] = values[name].encode()
            continue
        for name, value in values.items():
            if name not in seen and glob_match(pattern, name.encode(), nocase=True):
                seen.add(name)
                found[name.encode()] = value.encode()
    return found


def _config_check_one(server: _Server, name: str, raw: bytes) -> str | None:
    """Check one CONFIG SET pair without applying it; the reason it would fail, or None."""
    try:
        if name == "maxmemory":
            parse_size(raw.decode("ascii") or "0")
            return None
        if name == "maxmemory-policy":
            make_policy(raw.decode("ascii"))
            return None
    except ValueError:  # UnicodeDecodeError included
        return _config_set_reason(name)
    if name == "latency-tracking":
        return None if raw.lower() in (b"yes", b"no") else "argument must be 'yes' or 'no'"
    if name == "latency-tracking-info-percentiles":
        try:
            _parse_percentiles(raw)
        except ValueError as exc:
            return str(exc)
        return None
    if name in _INTEGER_SETTINGS:
        lowest, highest = _INTEGER_SETTINGS[name]
        try:
            value = parse_int(raw)
        except KVMemoError:
            return "argument couldn't be parsed into an integer"
        if not lowest <= value <= highest:
            return f"argument must be between {lowest} and {highest} inclusive"
        budget = server.settings.open_files
        if name == "maxclients" and budget is not None:
            # Redis's updateMaxclients: more than the open-file limit allows fails.
            allowed = budget.clients_allowed()
            if allowed is not None and value > allowed:
                return too_many_clients(allowed)
        return None
    current = _config_values(server).get(name)
    if name in ("save", "appendonly", "appendfsync", "dir"):
        if raw.decode("utf-8", "replace").lower() == (current or "").lower():
            return None
        return "persistence settings are fixed at start (--dir, --appendfsync)"
    return "can't set immutable config"


# The integer settings CONFIG SET changes, with the lowest and highest value
# each takes: Redis 7's ranges (its config.c), whose words it answers outside them.
INT_MAX: Final = (1 << 31) - 1
UINT_MAX: Final = (1 << 32) - 1
_INTEGER_SETTINGS: Final = {
    "slowlog-log-slower-than": (-1, LLONG_MAX),
    "slowlog-max-len": (0, LLONG_MAX),
    "timeout": (0, INT_MAX),  # seconds; 0: never
    "maxclients": (1, UINT_MAX),
}


def _config_set_reason(name: str) -> str:
    if name == "maxmemory":
        return "argument must be a memory value"
    return "argument(s) must be one of the following: " + ", ".join(_policy_choices())


async def _config_set_one(server: _Server, name: str, raw: bytes) -> str | None:
    """Apply one CONFIG SET pair that :func:`_config_check_one` accepted; the reason
    it still failed (the shards did not take the new policy), or None.

    Only ``maxmemory``, ``maxmemory-policy``, ``timeout``, ``maxclients``,
    the slow log's two settings and latency tracking's two change anything:
    the others pass the check only when given their current values.
    ``timeout`` takes a fraction too (``--resp-idle-timeout 0.5``, given
    back when a later pair fails).
    """
    engine = server.engine
    if name == "maxmemory":
        # Redis reads an empty value as 0 bytes (no digits, no unit).
        engine.tracker.set_limit(parse_size(raw.decode("ascii") or "0"))
    elif name == "maxmemory-policy":
        try:
            await engine.set_eviction_policy(raw.decode("ascii"))
        except KVMemoError as exc:
            return str(exc)
    elif name == "slowlog-log-slower-than":
        server.slowlog.configure(slower_than=parse_int(raw))
    elif name == "slowlog-max-len":
        server.slowlog.configure(max_len=parse_int(raw))
    elif name == "timeout":
        server.set_limits(idle_timeout=float(raw))
    elif name == "maxclients":
        server.set_limits(max_clients=int(raw))
    elif name == "latency-tracking":
        server.set_latency_tracking(raw.lower() == b"yes")
    elif name == "latency-tracking-info-percentiles":
        server.settings.latency_percentiles = _parse_percentiles(raw)
    return None


def _policy_choices() -> list[str]:
    """The policy names CONFIG SET accepts, sorted (Redis lists its own in its order)."""
    return sorted({_redis_policy(p) for p in POLICY_NAMES})


async def _config_set(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CONFIG SET name value [name value ...]: all or none applied, as Redis.

    Errors about the names spell them as the caller did, as Redis does.
    """
    if len(argv) % 2:  # a name without its value
        return SYNTAX_ERROR
    known = _config_values(conn.server)
    pairs = [(_text(argv[i]), argv[i + 1]) for i in range(2, len(argv), 2)]
    seen: set[str] = set()
    for given, _ in pairs:
        name = given.lower()
        if name not in known:
            return ErrorReply(
                f"ERR Unknown option or number of arguments for CONFIG SET - '{given}'"
            )
        if name in seen:
            return ErrorReply(
                f"ERR CONFIG SET failed (possibly related to argument '{given}')"
                " - duplicate parameter"
            )
        seen.add(name)
    # Every value is checked before any is applied; one that still fails
    # when applied (a shard that does not answer) undoes those before it.
    # Here Redis names the parameter in its own spelling.
    server = conn.server
    for given, raw in pairs:
        name = given.lower()
        reason = _config_check_one(server, name, raw)
        if reason is not None:
            return ErrorReply(
                f"ERR CONFIG SET failed (possibly related to argument '{name}') - {reason}"
            )
    applied: list[tuple[str, str]] = []
    for given, raw in pairs:
        name = given.lower()
        reason = await _config_set_one(server, name, raw)
        if reason is not None:
            for done, old in reversed(applied):
                await _config_set_one(server, done, old.encode())
            return ErrorReply(
                f"ERR CONFIG SET failed (possibly related to argument '{name}') - {reason}"
            )
        applied.append((name, known[name]))
    return "OK"


async def _config_resetstat(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CONFIG RESETSTAT: INFO's counters start again from 0, commandstats,
    errorstats and latencystats included (the engine's counters, which are
    Prometheus's too, go on: commandstats and latencystats show what was
    counted after this point)."""
    conn.server.reset_stats()
    return "OK"


async def _config_rewrite(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    """CONFIG REWRITE: refused, naming the config file and why.

    Redis rewrites its ``redis.conf`` in place, keeping its comments and
    lines. KVMemo's file is TOML (tables, comments, dotted keys, inline
    tables), which the standard library reads but cannot write back; it is
    one of three sources (flags and ``KVMEMO_*`` variables override it, and
    writing their values, tokens included, into it would move secrets into
    a file); and the slow log's settings have no key in it. A rewrite could
    not be both faithful and safe, so none is made: the operator edits it.
    """
    path = conn.server.config_file
    if path is None:
        return ErrorReply("ERR The server is running without a config file")
    return ErrorReply(
        f"ERR CONFIG REWRITE is not supported: the config file '{path}' is TOML that"
        " KVMemo reads at start and never writes (a rewrite would lose its comments"
        " and layout, and flags and KVMEMO_* variables override it); put the settings"
        " changed by CONFIG SET in it yourself"
    )


async def _config_help(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return [
        "CONFIG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
        "GET <pattern>",
        "    Return parameters matching the glob-like <pattern> and their values.",
        "SET <directive> <value>",
        "    Set the configuration <directive> to <value> (maxmemory, maxmemory-policy,",
        "    timeout, maxclients, slowlog-log-slower-than, slowlog-max-len,",
        "    latency-tracking, latency-tracking-info-percentiles).",
        "RESETSTAT",
        "    Reset statistics reported by the INFO command.",
        "REWRITE",
        "    Refused: KVMemo never writes its TOML config file (the error says why).",
        "HELP",
        "    Print this help.",
    ]


_connection_command("config", -2, "admin noscript loading stale", "get or set settings")(
    _dispatch(
        {
            "get": _SubCommand(-3, _config_get, _ADMIN_NOSCRIPT, "settings' values", "2.0.0"),
            "set": _SubCommand(-4, _config_set, _ADMIN_NOSCRIPT, "change settings", "2.0.0"),
            "resetstat": _SubCommand(
                2, _config_resetstat, _ADMIN_NOSCRIPT, "reset INFO's counters", "2.0.0"
            ),
            "rewrite": _SubCommand(
                2,
                _config_rewrite,
                _ADMIN_NOSCRIPT,
                "refused: the config file is read-only",
                "2.8.0",
            ),
            "help": _SubCommand(2, _config_help, _HELP, _HELP_SUMMARY, "5.0.0"),
        }
    )
)

# DEBUG ----------------------------------------------------------------------------------


async def _debug_actors(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return [
        {b"name": a["name"].encode(), b"state": a["state"].encode(), **_counters(a)}
        for a in conn.server.engine.actors()
    ]


def _counters(actor: dict[str, Any]) -> dict[bytes, object]:
    return {b"restarts": actor["restarts"], b"mailbox": actor["mailbox"]}


async def _debug_kill(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    try:
        return await conn.server.engine.execute("debug.kill", [argv[2]])
    except KVMemoError as exc:
        return redis_error(exc)


async def _debug_help(conn: _Connection, argv: tuple[bytes, ...]) -> object:
    return [
        "DEBUG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
        "ACTORS",
        "    Every actor: name, state, restarts, mailbox depth.",
        "KILL <actor-name>",
        "    Kill an actor (only when the server runs with chaos enabled).",
        "HELP",
        "    Print this help.",
    ]


_connection_command("debug", -2, "admin noscript loading stale", "actors and chaos")(
    _dispatch(
        {
            "actors": _SubCommand(2, _debug_actors),
            "kill": _SubCommand(3, _debug_kill),
            "help": _SubCommand(2, _debug_help),
        }
    )
)


# -- the listener ------------------------------------------------------------------------


async def _handle(server: _Server, stream: trio.SocketStream) -> None:
    """Serve one accepted connection; whatever happens, only it ends."""
    server.total_connections += 1
    if len(server.clients) >= server.limits.max_clients:
        server.rejected_connections += 1
        with trio.move_on_after(REJECT_TIMEOUT):
            try:
                await stream.send_all(MAX_CLIENTS)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(stream)
        return
    server.next_id += 1
    conn = _Connection(server, stream, server.next_id)
    server.clients[conn.id] = conn
    try:
        await conn.run()
    except Exception:
        logger.exception("RESP connection id=%d addr=%s crashed; closed it", conn.id, conn.addr)
    finally:
        server.clients.pop(conn.id, None)  # CLIENT KILL may have taken it out already
        await trio.aclose_forcefully(stream)


async def _sweep_idle(server: _Server) -> None:
    """Close the idle clients while the port runs (:meth:`_Server.close_idle_clients`).

    Sleeps until the next pass is due, or until ``CONFIG SET timeout``
    changes the timeout (then passes at once, so a lower timeout closes the
    clients already silent for longer, and a timeout turned off lets them be).
    """
    while True:
        changed = server.idle_changed
        wake = server.close_idle_clients(trio.current_time())
        with trio.move_on_at(wake):
            await changed.wait()


async def serve_resp(
    engine: KVEngine,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    tokens: frozenset[str] = frozenset(),
    limits: RespLimits = DEFAULT_LIMITS,
    shutdown: StopHandler | None = None,
    config_file: str | None = None,
    settings: RespSettings | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Redis protocol for ``engine`` until cancelled.

    Binds ``host:port`` (port 0 picks a free port), then reports the bound
    ``(host, port)`` through ``task_status.started``. Each connection runs in
    a task of a nursery this function owns; a connection's failure ends that
    connection only. The engine must be attached to its running actor system.

    Args:
        engine: the engine every command goes to.
        host: address to bind.
        port: TCP port; 0 for any free one.
        tokens: passwords of the ``default`` user; when not empty, clients
            must ``AUTH`` (or ``HELLO ... AUTH``) before anything else.
        limits: the port's limits.
        shutdown: what ``SHUTDOWN`` calls to stop the program (it must not
            block; True: the stop is under way, False: refused). The node
            passes its server's stop request (``kvmemo serve`` stops, an
            ``open_node`` without an owner's callback refuses); None:
            ``SHUTDOWN`` is refused with a clear error.
        config_file: the TOML file the settings came from, if any: INFO's
            ``config_file`` and ``CONFIG REWRITE``'s answer name it (it is
            never written).
        settings: what CONFIG SET changed in an earlier run of this port
            (its limits, its slow log), to start from instead of ``limits``
            and an empty slow log, and to keep what it changes in; None:
            this run's own. With an open-file budget, a ``maxclients`` above
            it is lowered to it first, and a warning logged once bound.

    Raises:
        OSError: the address cannot be bound, or the open-file budget
            leaves no client (``EMFILE``).
    """
    passwords = tuple(t.encode("utf-8") for t in sorted(tokens))
    if settings is None:
        settings = RespSettings(limits)
    lowered = settings.fit_open_files()
    server = _Server(
        engine, passwords, settings.limits, slowlog=settings.slowlog, settings=settings
    )
    server.stop = shutdown
    server.config_file = config_file
    if not settings.latency_tracking:  # off since an earlier run: what comes now is not shown
        server.latency_off_since = engine.command_latencies()
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sweep_idle, server)
            await nursery.start(
                partial(
                    trio.serve_listeners,
                    partial(_handle, server),
                    listeners,
                    handler_nursery=nursery,
                )
            )
            bound = listeners[0].socket.getsockname()
            server.host, server.port = bound[0], bound[1]
            logger.info("RESP port listening on %s:%d", server.host, server.port)
            if lowered is not None:
                logger.warning("%s", lowered)
            task_status.started((server.host, server.port))
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
