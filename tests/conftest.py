"""Suite-wide settings: every hypothesis test is deterministic.

The examples come from a fixed seed and no example database is read or
written, so a run on a fresh clone (CI) tries exactly what a local run
tries, and a failure found once is found again on every run.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("kvmemo", derandomize=True, database=None)
settings.load_profile("kvmemo")
