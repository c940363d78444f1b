"""The examples run as documented and print what their comments promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_embedded_example_runs_and_its_transactions_hold() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "embedded.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert "rate limit: [True, True, True, False, False]" in lines
    assert "balances: [b'20', b'80']" in lines  # two transfers of 40 from 100, a third refused
    assert "ttl of rate:alice: 60" in lines
    assert "event: orders:new order 17" in lines
    assert "event: orders:paid order 17" in lines
