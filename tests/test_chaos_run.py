"""Short chaos runs: kill actors under load, and the history must hold.

These run in real time (the workload measures real latencies), bounded to
a few seconds each; ``just chaos`` runs the long version.
"""

from __future__ import annotations

import trio

from kvmemo.chaos import run_embedded
from kvmemo.chaos.workload import WorkloadConfig


async def test_embedded_store_survives_actor_kills_without_violations() -> None:
    cfg = WorkloadConfig(clients=6, keys=16, duration=6.0, kill_rate=4.0, seed=7)
    with trio.fail_after(60):
        report = await run_embedded(cfg, shards=4)
    assert report.violations == [], "\n".join(v.describe() for v in report.violations)
    assert sum(report.kills.values()) >= 5
    assert report.restarts >= 5
    assert report.operations["ok"] > 1000
    # Shards that were not restarting kept answering.
    assert report.availability_untouched == 1.0
    # Every failure is one the protocol allows.
    assert set(report.errors) <= {"UNAVAILABLE", "TIMEOUT"}
