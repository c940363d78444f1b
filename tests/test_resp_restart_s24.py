"""What CONFIG SET changes on the Redis port outlives a restart of the server actor.

Was: the restarted port was rebuilt from the start settings, so ``timeout``,
``maxclients`` and the slow log's settings (and entries) went back, silently,
after a crash that nobody on the port saw.
"""

from __future__ import annotations

import trio
import trio.testing
from test_engine_failures import wait_restarted
from test_resp_server import Client

from kvmemo.config import StoreConfig
from kvmemo.node import SERVER, open_node
from kvmemo.server.config import ServerConfig

TIMEOUT = 30  # seconds for the whole test


async def config_get(client: Client, name: str) -> object:
    return await client.call("CONFIG", "GET", name)


async def test_config_set_values_and_the_slow_log_survive_a_server_restart() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, resp_port=0)
    with trio.fail_after(TIMEOUT):
        async with open_node(StoreConfig(shards=2), config) as node:
            assert node.resp_bound is not None
            host, port = node.resp_bound
            client = Client(await trio.open_tcp_stream(host, port))
            for name, value in (
                ("timeout", "300"),
                ("maxclients", "77"),
                ("slowlog-log-slower-than", "0"),  # every command
                ("slowlog-max-len", "5"),
            ):
                assert await client.call("CONFIG", "SET", name, value) == "OK"
            assert await client.call("SET", "k", "v") == "OK"
            logged = await client.call("SLOWLOG", "LEN")
            assert isinstance(logged, int)
            assert logged >= 1
            await client.aclose()

            node.system.kill(SERVER)
            await wait_restarted(node.system, SERVER)
            # Its ports start after the restart is reported: listening once
            # every task is blocked again.
            await trio.testing.wait_all_tasks_blocked()

            client = Client(await trio.open_tcp_stream(host, port))  # the same port
            assert await config_get(client, "timeout") == [b"timeout", b"300"]
            assert await config_get(client, "maxclients") == [b"maxclients", b"77"]
            assert await config_get(client, "slowlog-log-slower-than") == [
                b"slowlog-log-slower-than",
                b"0",
            ]
            assert await config_get(client, "slowlog-max-len") == [b"slowlog-max-len", b"5"]
            entries = await client.call("SLOWLOG", "GET", "10")
            assert isinstance(entries, list)
            assert any(b"SET" in entry[3] or b"set" in entry[3] for entry in entries)
            await client.aclose()
