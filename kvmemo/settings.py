"""Every setting of ``kvmemo serve``, declared once for flags, TOML and environment.

Precedence: built-in default < TOML file (``--config``) < ``KVMEMO_*``
environment variables < command-line flags. The README's configuration table
is this list.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .config import StoreConfig, parse_size
from .server.config import ServerConfig


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def _list(value: Any) -> frozenset[str]:
    if isinstance(value, (list, tuple, frozenset, set)):
        return frozenset(str(v) for v in value)
    return frozenset(v.strip() for v in str(value).split(",") if v.strip())


def _ms(value: Any) -> float:
    return float(value) / 1000


@attrs.frozen
class Setting:
    """One setting: its name (TOML key, ``--flag``, ``KVMEMO_NAME``), target and parser."""

    name: str
    target: str  # "store" or "server"
    field: str
    parse: Callable[[Any], Any]
    help: str
    repeat: bool = False  # a flag given several times accumulates
    flag_only: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "KVMEMO_" + self.name.upper().replace("-", "_")


SETTINGS: list[Setting] = [
    Setting("host", "server", "host", str, "address to bind (default 127.0.0.1)"),
    Setting(
        "port", "server", "port", int, "WebSocket/HTTP port; 0 picks a free one (default 7070)"
    ),
    Setting("resp_port", "server", "resp_port", int, "Redis-protocol port; 0 picks one (6380)"),
    Setting("resp", "server", "resp", _bool, "serve the Redis protocol (default true)"),
    Setting("tls_cert", "server", "tls_cert", str, "PEM certificate: serve wss:// and https://"),
    Setting("tls_key", "server", "tls_key", str, "PEM private key for --tls-cert"),
    Setting("auth_token", "server", "tokens", _list, "accepted token (repeatable)", repeat=True),
    Setting(
        "allowed_origin",
        "server",
        "allowed_origins",
        _list,
        "browser origin allowed to connect (repeatable; default: the server's own)",
        repeat=True,
    ),
    Setting(
        "max_message_size",
        "server",
        "max_message_size",
        parse_size,
        "bytes per WebSocket message; over it: close 1009 (16MiB)",
    ),
    Setting("max_batch", "server", "max_batch", int, "requests per JSON-RPC batch (10000)"),
    Setting(
        "max_in_flight",
        "server",
        "max_in_flight",
        int,
        "requests in flight per session; over it: OVERLOADED (100000)",
    ),
    Setting("max_sessions", "server", "max_sessions", int, "concurrent sessions (10000)"),
    Setting(
        "handshake_timeout",
        "server",
        "handshake_timeout",
        float,
        "seconds to complete a handshake (10)",
    ),
    Setting(
        "idle_timeout",
        "server",
        "idle_timeout",
        float,
        "seconds of silence before a session is closed; 0: never (0)",
    ),
    Setting(
        "shutdown_grace",
        "server",
        "shutdown_grace",
        float,
        "seconds in-flight requests get at shutdown (5)",
    ),
    Setting("shards", "store", "shards", int, "number of shard actors (16)"),
    Setting(
        "maxmemory", "store", "maxmemory", parse_size, "memory limit, e.g. 256MiB; 0: none (256MiB)"
    ),
    Setting(
        "eviction_policy",
        "store",
        "eviction_policy",
        str,
        "lru, lfu, fifo, random, noeviction, volatile-lru, volatile-lfu, volatile-random",
    ),
    Setting("ttl_tick_ms", "store", "ttl_tick", _ms, "milliseconds between expiry sweeps (100)"),
    Setting("expiry_budget", "store", "expiry_budget", int, "keys per shard per sweep (1000)"),
    Setting(
        "request_timeout",
        "store",
        "request_timeout",
        float,
        "seconds before a command gets TIMEOUT (5)",
    ),
    Setting("max_key_size", "store", "max_key_size", parse_size, "bytes per key (512MiB)"),
    Setting("max_value_size", "store", "max_value_size", parse_size, "bytes per value (512MiB)"),
    Setting("mailbox_capacity", "store", "mailbox_capacity", int, "messages per actor mailbox"),
    Setting("chaos", "store", "chaos", _bool, "enable debug.kill (chaos testing)"),
]

SERVE_DEFAULTS: dict[str, Any] = {"maxmemory": 256 * 1024 * 1024}
"""Where ``kvmemo serve`` differs from the library defaults (the embedded
store has no memory limit unless given one)."""


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (all default to None: 'not given')."""
    for s in SETTINGS:
        if s.parse is _bool:
            parser.add_argument(
                s.flag, dest=s.name, action="store_const", const=True, default=None, help=s.help
            )
            if s.name == "resp":
                parser.add_argument(
                    "--no-resp",
                    dest="resp",
                    action="store_const",
                    const=False,
                    help="do not serve the Redis protocol",
                )
        elif s.repeat:
            parser.add_argument(s.flag, dest=s.name, action="append", default=None, help=s.help)
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, help=s.help)


def _from_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    known = {s.name for s in SETTINGS}
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, inner in value.items():
                flat[sub.replace("-", "_")] = inner
        else:
            flat[key.replace("-", "_")] = value
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown setting {unknown[0]!r}")
    return flat


def resolve(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> tuple[StoreConfig, ServerConfig]:
    """Combine defaults, the TOML file, the environment and the flags.

    Raises:
        ValueError: an invalid value, with a message naming the setting.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = dict(SERVE_DEFAULTS)
    config_file = getattr(args, "config", None) or environ.get("KVMEMO_CONFIG")
    if config_file:
        raw.update(_from_toml(config_file))
    for s in SETTINGS:
        if s.env in environ:
            raw[s.name] = environ[s.env]
        value = getattr(args, s.name, None)
        if value is not None:
            raw[s.name] = value
    store: dict[str, Any] = {}
    server: dict[str, Any] = {}
    for s in SETTINGS:
        if s.name not in raw:
            continue
        try:
            value = s.parse(raw[s.name])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"invalid {s.name.replace('_', '-')}: {exc}") from None
        (store if s.target == "store" else server)[s.field] = value
    try:
        return StoreConfig(**store), ServerConfig(**server)
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from None
