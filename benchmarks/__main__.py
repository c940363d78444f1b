"""Run every benchmark: ``python -m benchmarks [--quick]`` (``just bench``).

Each ``benchmarks/bench_*.py`` module is found with :mod:`pkgutil`, imported
and its ``main(argv)`` called in name order, under a header. ``--quick`` is
passed only to modules that declare that flag; the others get no arguments.
A benchmark that fails to import or crashes is reported and the rest still
run; the exit status is 1 only then. Speed never fails the run: the figures
are printed, not asserted.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable
from types import ModuleType

import benchmarks

PREFIX = "bench_"


def discover() -> list[str]:
    """The names of the benchmark modules, sorted (``bench_engine``, ...)."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(benchmarks.__path__)
        if info.name.startswith(PREFIX) and not info.ispkg
    )


def knows_quick(module: ModuleType) -> bool:
    """Whether the module declares a ``--quick`` flag (read from its source)."""
    try:
        return '"--quick"' in inspect.getsource(module)
    except (OSError, TypeError):
        return False


def run_main(name: str, entry: Callable[[list[str]], object], argv: list[str]) -> bool:
    """Call ``entry(argv)``; False if it crashed or exited with an error status."""
    try:
        entry(argv)
    except SystemExit as exc:
        if argv and exc.code == 2:  # argparse refused --quick after all: run the defaults
            print(f"[{name}] refused {' '.join(argv)}: running its defaults")
            return run_main(name, entry, [])
        if exc.code not in (0, None):
            print(f"[{name}] exited with status {exc.code}", file=sys.stderr)
            return False
    except Exception:  # noqa: BLE001 - report the crash, run the next benchmark
        print(f"[{name}] crashed:", file=sys.stderr)
        traceback.print_exc()
        return False
    return True


def run_one(name: str, quick: bool) -> bool:
    """Import and run one benchmark under a header; False if it failed."""
    print(f"\n=== {name} ===", flush=True)
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"{benchmarks.__name__}.{name}")
    except Exception:  # noqa: BLE001 - a broken benchmark must not stop the others
        print(f"[{name}] skipped: it does not import", file=sys.stderr)
        traceback.print_exc()
        return False
    entry = getattr(module, "main", None)
    if not callable(entry):
        print(f"[{name}] skipped: no main(argv)")
        return True
    argv = ["--quick"] if quick and knows_quick(module) else []
    if quick and not argv:
        print(f"[{name}] has no --quick flag: running its defaults")
    ok = run_main(name, entry, argv)
    print(f"[{name}] {'done' if ok else 'FAILED'} in {time.perf_counter() - started:.1f} s")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Run every benchmarks/bench_*.py module."
    )
    parser.add_argument("--quick", action="store_true", help="fast smoke run of each benchmark")
    args = parser.parse_args(argv)
    names = discover()
    print(f"benchmarks: {', '.join(names) or 'none found'}")
    started = time.perf_counter()
    failed = [name for name in names if not run_one(name, args.quick)]
    print(f"\nall benchmarks: {time.perf_counter() - started:.1f} s", end="")
    print(f"; failed: {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
