"""The command suite (``tests/command_suite.py``) against the embedded store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio.testing
from command_suite import SUITE, SuiteCase

import kvmemo


@pytest.fixture
async def kv(autojump_clock: trio.testing.MockClock) -> AsyncIterator[kvmemo.Store]:
    async with kvmemo.open_store(shards=4, maxmemory="64MiB") as store:
        yield store


@pytest.mark.parametrize("case", SUITE, ids=[c.name for c in SUITE])
async def test_command(case: SuiteCase, kv: kvmemo.Store) -> None:
    with trio.fail_after(60):
        await case.run(kv)


@pytest.mark.parametrize("case", SUITE, ids=[c.name for c in SUITE])
async def test_command_on_one_shard(
    case: SuiteCase, autojump_clock: trio.testing.MockClock
) -> None:
    async with kvmemo.open_store(shards=1) as store:
        with trio.fail_after(60):
            await case.run(store)
