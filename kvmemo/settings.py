"""Every setting of ``kvmemo serve``, declared once for flags, TOML and environment.

Precedence: built-in default < TOML file (``--config``) < ``KVMEMO_*``
environment variables < command-line flags. The README's configuration table
is this list.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from .config import StoreConfig, parse_size
from .server.config import RespLimits, ServerConfig


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def _int(value: Any) -> int:
    """An integer from an int or a decimal string; never a bool or a fraction."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"expected an integer, got {value!r}") from None


def _float(value: Any) -> float:
    """A finite number from an int, a float or a decimal string; never a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _size(name: str) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"expected a size like 64MiB, got {value!r}")
        return parse_size(value, what=name)

    return parse


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(value: Any) -> str:
    level = _str(value).strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def _items(value: Any) -> list[str]:
    """The strings of a repeatable setting: a TOML list or string, the flags, or the
    environment variable's items (already split by :func:`split_env_list`).

    A TOML number or table is refused, not read as its text. No value is split:
    each is one item, as given.
    """
    items = value if isinstance(value, list | tuple) else [value]
    return [_str(item) for item in items]


def _tokens(value: Any) -> frozenset[str]:
    """Accepted auth tokens, each exactly as given (a comma is part of a token).

    A token is never echoed in an error: the message may reach a log.
    """
    out: set[str] = set()
    for token in _items(value):
        if not token:
            raise ValueError("a token must not be empty")
        if token != token.strip():
            raise ValueError("a token must not begin or end with whitespace")
        out.add(token)
    return frozenset(out)


def _origins(value: Any) -> frozenset[str]:
    """Allowed browser origins, one per value (an origin has no comma or whitespace)."""
    out: set[str] = set()
    for origin in _items(value):
        if not origin:
            raise ValueError("an origin must not be empty")
        if "," in origin or origin.split() != [origin]:
            raise ValueError(
                f"an origin has no comma or whitespace, got {origin!r} (give one origin per value)"
            )
        out.add(origin)
    return frozenset(out)


def split_env_list(text: str) -> list[str]:
    """The items of a repeatable setting's environment variable (``KVMEMO_AUTH_TOKEN``).

    Items are separated by commas; whitespace around an item is dropped, and so
    is an empty item (``""`` is no item at all). Inside an item ``\\,`` is a
    comma and ``\\\\`` a backslash; any other backslash is itself.
    """
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in ",\\":
            current.append(text[i + 1])
            i += 2
            continue
        if char == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _ms(value: Any) -> float:
    """Seconds from a positive number of milliseconds (every ``*_ms`` setting is one)."""
    number = _float(value)
    if not number > 0:
        raise ValueError(f"expected a positive number of milliseconds, got {value!r}")
    return number / 1000


_TARGET_TABLES = {"store": "store", "server": "server", "resp": "limits", "cli": "server"}


@attrs.frozen
class Setting:
    """One setting: its name (TOML key, ``--flag``, ``KVMEMO_NAME``), target and parser."""

    name: str
    target: str  # "store", "server", "resp" (the Redis port's limits) or "cli"
    field: str
    parse: Callable[[Any], Any]
    help: str
    repeat: bool = False  # a flag given several times accumulates
    flag_only: bool = False
    # The TOML table the key may be under (or it is at the top level): the
    # README's tables. By default the target's: [store], [server], [limits]
    # for the Redis port's limits, [server] for the process's own settings.
    table: str = attrs.field(
        default=attrs.Factory(lambda self: _TARGET_TABLES[self.target], takes_self=True)
    )

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "KVMEMO_" + self.name.upper().replace("-", "_")


SETTINGS: list[Setting] = [
    Setting("host", "server", "host", _str, "address to bind (default 127.0.0.1)"),
    Setting(
        "port", "server", "port", _int, "WebSocket/HTTP port; 0 picks a free one (default 7070)"
    ),
    Setting("resp_port", "server", "resp_port", _int, "Redis-protocol port; 0 picks one (6380)"),
    Setting("resp", "server", "resp", _bool, "serve the Redis protocol (default true)"),
    Setting("tls_cert", "server", "tls_cert", _str, "PEM certificate: serve wss:// and https://"),
    Setting("tls_key", "server", "tls_key", _str, "PEM private key for --tls-cert"),
    Setting(
        "auth_token",
        "server",
        "tokens",
        _tokens,
        "accepted token, taken whole (repeatable; KVMEMO_AUTH_TOKEN: comma-separated, \\, a comma)",
        repeat=True,
    ),
    Setting(
        "allowed_origin",
        "server",
        "allowed_origins",
        _origins,
        "browser origin allowed to connect (repeatable; default: the server's own)",
        repeat=True,
    ),
    Setting(
        "max_message_size",
        "server",
        "max_message_size",
        _size("max-message-size"),
        "bytes per WebSocket message; over it: close 1009 (16MiB)",
        table="limits",
    ),
    Setting(
        "max_batch",
        "server",
        "max_batch",
        _int,
        "requests per JSON-RPC batch (10000)",
        table="limits",
    ),
    Setting(
        "max_in_flight",
        "server",
        "max_in_flight",
        _int,
        "requests in flight per session; over it: OVERLOADED (100000)",
        table="limits",
    ),
    Setting(
        "pipeline_window",
        "server",
        "pipeline_window",
        _int,
        "requests a session may have unanswered before it reads no more (1024)",
        table="limits",
    ),
    Setting(
        "max_sessions",
        "server",
        "max_sessions",
        _int,
        "concurrent sessions (10000)",
        table="limits",
    ),
    Setting(
        "handshake_timeout",
        "server",
        "handshake_timeout",
        _float,
        "seconds to complete a handshake; 0: no limit (10)",
        table="limits",
    ),
    Setting(
        "idle_timeout",
        "server",
        "idle_timeout",
        _float,
        "seconds of silence before a session is closed; 0: never (0)",
        table="limits",
    ),
    Setting(
        "shutdown_grace",
        "server",
        "shutdown_grace",
        _float,
        "seconds in-flight requests get at shutdown (5)",
        table="limits",
    ),
    Setting(
        "max_http_head",
        "server",
        "max_http_head",
        _size("max-http-head"),
        "bytes of an HTTP request head (16KiB)",
        table="limits",
    ),
    Setting(
        "max_output_buffer",
        "server",
        "max_output_buffer",
        _size("max-output-buffer"),
        "bytes of responses waiting for a session's socket before it reads no more; past it,"
        " a batch longer than --pipeline-window gets TOO_LARGE for the rest (64MiB)",
        table="limits",
    ),
    Setting(
        "output_timeout",
        "server",
        "output_timeout",
        _float,
        "seconds a session past --max-output-buffer may read nothing before it is dropped (10)",
        table="limits",
    ),
    Setting("shards", "store", "shards", _int, "number of shard actors (16)"),
    Setting(
        "maxmemory",
        "store",
        "maxmemory",
        _size("maxmemory"),
        "memory limit, e.g. 256MiB; 0: none (256MiB)",
    ),
    Setting(
        "eviction_policy",
        "store",
        "eviction_policy",
        _str,
        "lru, lfu, fifo, random, noeviction, volatile-lru, volatile-lfu, volatile-random"
        " (or Redis's allkeys-lru, allkeys-lfu, allkeys-random) (lru)",
    ),
    Setting(
        "eviction_watermark",
        "store",
        "eviction_watermark",
        _float,
        "fraction of maxmemory above which eviction starts (0.95)",
    ),
    Setting(
        "eviction_target",
        "store",
        "eviction_target",
        _float,
        "fraction of maxmemory eviction brings usage back to (0.9)",
    ),
    Setting(
        "eviction_sample",
        "store",
        "eviction_sample",
        _int,
        "eviction candidates each shard offers per round (16)",
    ),
    Setting(
        "oom_wait_ms",
        "store",
        "oom_wait",
        _ms,
        "milliseconds a write over the limit waits for eviction before OOM (50)",
    ),
    Setting("ttl_tick_ms", "store", "ttl_tick", _ms, "milliseconds between expiry sweeps (100)"),
    Setting("expiry_budget", "store", "expiry_budget", _int, "keys per shard per sweep (1000)"),
    Setting(
        "reconcile_every",
        "store",
        "reconcile_every",
        _int,
        "expiry sweeps between TTL-index reconciliations (600)",
    ),
    Setting(
        "request_timeout",
        "store",
        "request_timeout",
        _float,
        "seconds before a command gets TIMEOUT (5)",
    ),
    Setting(
        "max_key_size",
        "store",
        "max_key_size",
        _size("max-key-size"),
        "bytes per key (512MiB)",
        table="limits",
    ),
    Setting(
        "max_value_size",
        "store",
        "max_value_size",
        _size("max-value-size"),
        "bytes per value (512MiB)",
        table="limits",
    ),
    Setting(
        "mailbox_capacity", "store", "mailbox_capacity", _int, "messages per actor mailbox (4096)"
    ),
    Setting(
        "pubsub_buffer_limit",
        "store",
        "pubsub_buffer_limit",
        _size("pubsub-buffer-limit"),
        "bytes of published messages a subscriber may have waiting before it is dropped (32MiB)",
        table="limits",
    ),
    Setting(
        "pubsub_max_subscriptions",
        "store",
        "pubsub_max_subscriptions",
        _int,
        "channels, patterns and shard channels one subscriber may have (100000)",
        table="limits",
    ),
    Setting(
        "lcs_max_cells",
        "store",
        "lcs_max_cells",
        _int,
        "LCS: the product of its two values' lengths, at most (100000000)",
        table="limits",
    ),
    Setting(
        "lcs_max_length",
        "store",
        "lcs_max_length",
        _int,
        "LCS: the sum of its two values' lengths, at most (200000)",
        table="limits",
    ),
    Setting(
        "scan_snapshots",
        "store",
        "scan_snapshots",
        _int,
        "open SCAN iterations each shard remembers (64)",
    ),
    Setting(
        "hold_timeout",
        "store",
        "hold_timeout",
        _float,
        "seconds a shard holds for a multi-shard write or transaction (1)",
    ),
    Setting(
        "max_restarts",
        "store",
        "max_restarts",
        _int,
        "restarts a supervisor allows within --restart-period before it gives up (20)",
    ),
    Setting(
        "restart_period",
        "store",
        "restart_period",
        _float,
        "seconds of the --max-restarts window (10)",
    ),
    Setting(
        "restart_backoff",
        "store",
        "restart_backoff",
        _float,
        "seconds before the first restart of a failed actor, doubling after (0.005)",
    ),
    Setting(
        "restart_backoff_max",
        "store",
        "restart_backoff_max",
        _float,
        "seconds the restart delay grows to at most (1)",
    ),
    Setting("chaos", "store", "chaos", _bool, "enable debug.kill (chaos testing)"),
    Setting(
        "dir",
        "store",
        "data_dir",
        _str,
        "data directory: turns persistence on (off)",
        table="persistence",
    ),
    Setting(
        "appendfsync",
        "store",
        "appendfsync",
        _str,
        "always, everysec or no (everysec)",
        table="persistence",
    ),
    Setting(
        "fsync_method",
        "store",
        "fsync_method",
        _str,
        "commitlog (one synced commit log per round), fsync (each shard's log) or syncfs "
        "(one call per file system; Linux 5.17+) (commitlog)",
        table="persistence",
    ),
    Setting(
        "repair",
        "store",
        "repair",
        _bool,
        "start despite a corrupt log, keeping valid records",
        table="persistence",
    ),
    Setting(
        "snapshot_log_size",
        "store",
        "snapshot_log_bytes",
        _size("snapshot-log-size"),
        "log size of a shard that triggers its snapshot; 0: never by size (256MiB)",
        table="persistence",
    ),
    # The Redis port's limits (RespLimits), each named resp_* as a flag, key and variable.
    Setting(
        "resp_max_bulk_len",
        "resp",
        "max_bulk_len",
        _size("resp-max-bulk-len"),
        "Redis port: longest argument (proto-max-bulk-len; 512MiB)",
    ),
    Setting(
        "resp_max_args", "resp", "max_args", _int, "Redis port: arguments per request (1048576)"
    ),
    Setting(
        "resp_max_inline_len",
        "resp",
        "max_inline_len",
        _size("resp-max-inline-len"),
        "Redis port: longest inline request (64KiB)",
    ),
    Setting(
        "resp_max_query_buffer",
        "resp",
        "max_query_buffer",
        _size("resp-max-query-buffer"),
        "Redis port: unparsed input per client (client-query-buffer-limit; 1GiB)",
    ),
    Setting(
        "resp_max_output_buffer",
        "resp",
        "max_output_buffer",
        _size("resp-max-output-buffer"),
        "Redis port: reply bytes pending per client before it must read (64MiB)",
    ),
    Setting(
        "resp_output_timeout",
        "resp",
        "output_timeout",
        _float,
        "Redis port: seconds a client over its output limit may read nothing (10)",
    ),
    Setting(
        "resp_max_clients",
        "resp",
        "max_clients",
        _int,
        "Redis port: connections (maxclients; 10000)",
    ),
    Setting(
        "resp_idle_timeout",
        "resp",
        "idle_timeout",
        _float,
        "Redis port: seconds of silence before a client is closed (timeout; 0: never)",
    ),
    Setting(
        "resp_max_transaction_commands",
        "resp",
        "max_transaction_commands",
        _int,
        "Redis port: commands one MULTI may queue (100000)",
    ),
    Setting(
        "log_level",
        "cli",
        "log_level",
        _log_level,
        "debug, info, warning, error or critical (info)",
    ),
]

SERVE_DEFAULTS: dict[str, Any] = {"maxmemory": 256 * 1024 * 1024}
"""Where ``kvmemo serve`` differs from the library defaults (the embedded
store has no memory limit unless given one)."""


# The sections of ``kvmemo serve --help``: one per TOML table (the README's).
_FLAG_GROUPS = {
    "server": "server (listeners, TLS, auth, logging)",
    "store": "store (shards, memory, eviction, expiry, supervision)",
    "limits": "limits (sizes, counts and times; the Redis port's too)",
    "persistence": "persistence (off unless --dir is given)",
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (all default to None: 'not given'), grouped by TOML table."""
    groups = {table: parser.add_argument_group(title) for table, title in _FLAG_GROUPS.items()}
    for s in SETTINGS:
        group = groups[s.table]
        if s.parse is _bool:
            group.add_argument(
                s.flag, dest=s.name, action="store_const", const=True, default=None, help=s.help
            )
            if s.name == "resp":
                group.add_argument(
                    "--no-resp",
                    dest="resp",
                    action="store_const",
                    const=False,
                    help="do not serve the Redis protocol",
                )
        elif s.repeat:
            group.add_argument(s.flag, dest=s.name, action="append", default=None, help=s.help)
        else:
            group.add_argument(s.flag, dest=s.name, default=None, help=s.help)


TOML_TABLES = frozenset({"server", "store", "limits", "persistence"})
"""Tables a TOML file may group its settings under (or put them at the top level):
each setting belongs to one, its :attr:`Setting.table`."""

ENV_ALSO_ACCEPTED = frozenset({"KVMEMO_CONFIG", "KVMEMO_URL"})
"""``KVMEMO_*`` variables that are not settings and are not refused: the TOML
file's path, and the server URL a client may be given (the JavaScript
client's test passes it so)."""


def _suggest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to a misspelt one, if one is close (difflib)."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return close[0] if close else None


def _check_environment(environ: Mapping[str, str]) -> None:
    """Refuse a ``KVMEMO_*`` variable that is no setting (a misspelt one was ignored).

    Raises:
        ValueError: naming the first such variable (in name order) and the
            closest setting's variable. The prefix is matched in any case, so a
            lowercase ``kvmemo_shards`` is refused too, not ignored.
    """
    known = {s.env for s in SETTINGS} | ENV_ALSO_ACCEPTED
    for name in sorted(environ):
        if not name.upper().startswith("KVMEMO_") or name in known:
            continue
        suffix = name[len("KVMEMO_") :].lower()
        closest = _suggest(suffix, (s.name for s in SETTINGS))
        hint = f" (did you mean KVMEMO_{closest.upper()}?)" if closest is not None else ""
        raise ValueError(f"unknown environment variable {name}{hint}")


def _from_toml(path: str) -> dict[str, Any]:
    """The settings of a TOML file by name, as written (parsed later).

    Each key is at the top level or under its setting's table. The file is
    checked in three passes so the first error is the most telling one: an
    unknown table, then an unknown key, then a key under another table.

    Raises:
        ValueError: an unreadable or invalid file, an unknown table or key, a
            key under the wrong table (naming where it belongs), a key given twice.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8
        raise ValueError(
            f"config file {path} is not valid TOML: not UTF-8 ({exc.reason})"
        ) from None
    by_name = {s.name: s for s in SETTINGS}

    def belongs(key: str) -> str:
        return f"{key!r} belongs in [{by_name[key.replace('-', '_')].table}] (or at the top level)"

    # (table or None, key as written, value)
    items: list[tuple[str | None, str, Any]] = []
    for key, value in data.items():
        if not isinstance(value, dict):
            items.append((None, key, value))
            continue
        if key not in TOML_TABLES:
            first_known = next((sub for sub in value if sub.replace("-", "_") in by_name), None)
            if first_known is not None:
                raise ValueError(
                    f"config file {path}: {belongs(first_known)}, not in the unknown table [{key}]"
                )
            closest = _suggest(key, TOML_TABLES)
            hint = f" (did you mean [{closest}]?)" if closest is not None else ""
            raise ValueError(f"config file {path}: unknown table [{key}]{hint}")
        for sub, inner in value.items():
            if isinstance(inner, dict):  # [store.deep]: no table nests
                raise ValueError(f"config file {path}: unknown table [{key}.{sub}]")
            items.append((key, sub, inner))
    for table, key, _ in items:
        if key.replace("-", "_") not in by_name:
            shown = key if table is None else f"{table}.{key}"
            closest = _suggest(key.replace("-", "_"), by_name)
            hint = f" (did you mean {closest!r}?)" if closest is not None else ""
            raise ValueError(f"config file {path}: unknown setting {shown!r}{hint}")
    flat: dict[str, Any] = {}
    for table, key, inner in items:
        name = key.replace("-", "_")
        if table is not None and by_name[name].table != table:
            raise ValueError(f"config file {path}: {belongs(key)}, not [{table}]")
        if name in flat:
            raise ValueError(f"config file {path}: {name!r} is given twice")
        flat[name] = inner
    return flat


@attrs.frozen
class Resolved:
    """Everything ``kvmemo serve`` was asked for."""

    store: StoreConfig
    server: ServerConfig
    log_level: str


def resolve_all(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Resolved:
    """Combine defaults, the TOML file, the environment and the flags.

    Precedence: default < TOML file < ``KVMEMO_*`` environment < flag.

    Raises:
        ValueError: an invalid value or file, with a one-line message naming
            the setting and where its value came from.
    """
    environ = os.environ if environ is None else environ
    _check_environment(environ)
    raw: dict[str, Any] = dict(SERVE_DEFAULTS)
    source: dict[str, str] = {name: "default" for name in raw}
    config_file = getattr(args, "config", None) or environ.get("KVMEMO_CONFIG")
    if config_file:
        for name, value in _from_toml(config_file).items():
            raw[name], source[name] = value, f"{config_file}: {name}"
    for s in SETTINGS:
        if s.env in environ:
            text = environ[s.env]
            raw[s.name] = split_env_list(text) if s.repeat else text
            source[s.name] = s.env
        value = getattr(args, s.name, None)
        if value is not None:
            raw[s.name], source[s.name] = value, s.flag
    parsed: dict[str, dict[str, Any]] = {"store": {}, "server": {}, "resp": {}, "cli": {}}
    for s in SETTINGS:
        if s.name not in raw:
            continue
        try:
            value = s.parse(raw[s.name])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"invalid {source[s.name]}: {exc}") from None
        parsed[s.target][s.field] = value
    try:
        store = StoreConfig(**parsed["store"])
    except (ValueError, TypeError) as exc:
        raise ValueError(_named(str(exc), "store")) from None
    try:
        limits = RespLimits(**parsed["resp"])
    except (ValueError, TypeError) as exc:
        raise ValueError(_named(str(exc), "resp")) from None
    named_file = os.path.abspath(config_file) if config_file else None
    try:
        server = ServerConfig(**parsed["server"], resp_limits=limits, config_file=named_file)
    except (ValueError, TypeError) as exc:
        raise ValueError(_named(str(exc), "server")) from None
    return Resolved(store, server, parsed["cli"].get("log_level", "info"))


def _named(message: str, target: str) -> str:
    """A configuration's error as the operator named the setting.

    The configurations name their fields (``idle_timeout`` of the Redis
    port's limits, ``data_dir``); the message names the setting instead
    (``resp_idle_timeout``, ``dir``), the one its flag, key and variable
    are made of.
    """
    for s in SETTINGS:
        if s.target == target and s.name != s.field and message.startswith(s.field + " "):
            return s.name + message[len(s.field) :]
    return message


def resolve(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> tuple[StoreConfig, ServerConfig]:
    """The store and server configurations of :func:`resolve_all`."""
    resolved = resolve_all(args, environ)
    return resolved.store, resolved.server
