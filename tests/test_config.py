"""StoreConfig: every invalid setting is a ValueError with an exact message."""

from __future__ import annotations

from typing import Any

import pytest
import trio.testing

import kvmemo
from kvmemo.config import StoreConfig, parse_size

POLICIES = "lru, lfu, fifo, random, noeviction, volatile-lru, volatile-lfu, volatile-random"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"shards": 0}, r"^shards must be >= 1, got 0$"),
        ({"shards": -3}, r"^shards must be >= 1, got -3$"),
        ({"shards": 16385}, r"^shards must be <= 16384, got 16385$"),
        ({"maxmemory": -1}, r"^maxmemory must be >= 0, got -1$"),
        ({"maxmemory": "-5mb"}, r"^maxmemory must be a size like 64MiB, got '-5mb'$"),
        ({"maxmemory": "lots"}, r"^maxmemory must be a size like 64MiB, got 'lots'$"),
        ({"maxmemory": "12 parsecs"}, r"^maxmemory must be a size like 64MiB, got '12 parsecs'$"),
        ({"maxmemory": True}, r"^maxmemory must be a size like 64MiB, got True$"),
        (
            {"eviction_policy": "mru"},
            rf"^unknown eviction policy 'mru'; expected one of {POLICIES}"
            r" \(or Redis's allkeys-lru, allkeys-lfu, allkeys-random\)$",
        ),
        ({"eviction_watermark": 0}, r"^eviction_watermark must be in \(0, 1\], got 0$"),
        ({"eviction_watermark": 1.5}, r"^eviction_watermark must be in \(0, 1\], got 1.5$"),
        ({"eviction_target": -0.1}, r"^eviction_target must be in \(0, 1\], got -0.1$"),
        (
            {"eviction_target": 0.99},
            r"^eviction_target must be <= eviction_watermark, got 0.99 > 0.95$",
        ),
        ({"eviction_sample": 0}, r"^eviction_sample must be >= 1, got 0$"),
        ({"oom_wait": 0}, r"^oom_wait must be > 0, got 0$"),
        ({"ttl_tick": -1}, r"^ttl_tick must be > 0, got -1$"),
        ({"expiry_budget": 0}, r"^expiry_budget must be >= 1, got 0$"),
        ({"reconcile_every": 0}, r"^reconcile_every must be >= 1, got 0$"),
        ({"request_timeout": -1}, r"^request_timeout must be > 0, got -1$"),
        ({"hold_timeout": 0}, r"^hold_timeout must be > 0, got 0$"),
        ({"mailbox_capacity": 0}, r"^mailbox_capacity must be >= 1, got 0$"),
        ({"restart_backoff": -0.5}, r"^restart_backoff must be > 0, got -0.5$"),
        (
            {"restart_backoff": 0.5, "restart_backoff_max": 0.1},
            r"^restart_backoff_max must be >= restart_backoff, got 0.1 < 0.5$",
        ),
        ({"max_restarts": 0}, r"^max_restarts must be >= 1, got 0$"),
        ({"restart_period": 0}, r"^restart_period must be > 0, got 0$"),
        ({"scan_snapshots": 0}, r"^scan_snapshots must be >= 1, got 0$"),
        ({"pubsub_buffer_limit": 0}, r"^pubsub_buffer_limit must be >= 1, got 0$"),
        ({"pubsub_buffer_limit": "lots"}, r"^pubsub_buffer_limit must be a size like 64MiB"),
        ({"pubsub_max_subscriptions": 0}, r"^pubsub_max_subscriptions must be >= 1, got 0$"),
    ],
)
def test_an_invalid_setting_raises_value_error_naming_it(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        StoreConfig(**settings)


@pytest.mark.parametrize("name", ["max_key_size", "max_value_size"])
def test_a_bad_size_limit_names_its_own_setting(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be >= 0, got -1$"):
        StoreConfig(**{name: -1})
    with pytest.raises(ValueError, match=rf"^{name} must be a size like 64MiB, got 'x'$"):
        StoreConfig(**{name: "x"})


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100", 100),
        ("1k", 1000),
        ("1kb", 1024),
        ("1KiB", 1024),
        ("64MiB", 64 * 1024**2),
        ("256mb", 256 * 1024**2),
        ("1m", 10**6),
        (" 2 GiB ", 2 * 1024**3),
        ("0", 0),
    ],
)
def test_sizes_read_like_redis(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert StoreConfig(maxmemory=text).maxmemory == size


def test_the_defaults_are_valid_and_documented_values() -> None:
    cfg = StoreConfig()
    assert cfg.shards == 16
    assert cfg.maxmemory == 0
    assert cfg.eviction_policy == "lru"
    assert 0 < cfg.eviction_target <= cfg.eviction_watermark <= 1


@pytest.mark.parametrize("alias", ["allkeys-lru", "LRU", "allkeys-random"])
def test_redis_policy_aliases_are_accepted(alias: str) -> None:
    assert StoreConfig(eviction_policy=alias).eviction_policy == alias


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"shards": 0}, r"^shards must be >= 1, got 0$"),
        ({"maxmemory": -1}, r"^maxmemory must be >= 0, got -1$"),
        ({"eviction_policy": "bogus"}, r"^unknown eviction policy 'bogus'; expected one of "),
    ],
)
async def test_open_store_refuses_a_bad_setting_before_starting_anything(
    settings: dict[str, Any], message: str, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(ValueError, match=message):
        async with kvmemo.open_store(**settings):
            pytest.fail("the store must not start")
