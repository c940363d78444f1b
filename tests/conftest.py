"""Suite-wide settings: every hypothesis test is deterministic; shared suites' asserts rewritten.

The examples come from a fixed seed and no example database is read or
written, so a run on a fresh clone (CI) tries exactly what a local run
tries, and a failure found once is found again on every run.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

# The shared suites' asserts report their operands, as the test modules' do
# (registered here: before any test module imports them).
pytest.register_assert_rewrite("command_suite", "transaction_suite")

settings.register_profile("kvmemo", derandomize=True, database=None)
settings.load_profile("kvmemo")
