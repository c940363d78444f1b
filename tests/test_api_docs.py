"""The embedded API is discoverable: errors exported and documented, methods documented, typed.

Also the README's claims about trio's virtual time, each proved here.
"""

from __future__ import annotations

import inspect
import re
import time
from pathlib import Path

import pytest
import trio
import trio.testing

import kvmemo
import kvmemo.errors
from kvmemo.api import Commands

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text("utf-8")

# Every error class kvmemo.errors defines (read from the module, not from its __all__).
ERROR_CLASSES = [
    obj
    for obj in vars(kvmemo.errors).values()
    if isinstance(obj, type)
    and issubclass(obj, kvmemo.errors.KVMemoError)
    and obj.__module__ == "kvmemo.errors"
]


# -- errors: exported and documented -------------------------------------------------------


def test_errors_module_all_lists_every_error_class_it_defines() -> None:
    assert len(ERROR_CLASSES) == 16
    assert sorted(getattr(kvmemo.errors, "__all__", ())) == sorted(
        ["ERROR_KINDS", *(cls.__name__ for cls in ERROR_CLASSES)]
    )


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_public_error_class_is_exported_from_kvmemo(cls: type[Exception]) -> None:
    assert getattr(kvmemo, cls.__name__) is cls


def test_directory_in_use_is_exported_from_kvmemo() -> None:
    from kvmemo.persistence.layout import DirectoryInUse

    assert kvmemo.DirectoryInUse is DirectoryInUse


async def test_open_store_on_a_held_data_dir_raises_kvmemo_directory_in_use(
    tmp_path: Path,
) -> None:
    async with kvmemo.open_store(shards=2, data_dir=tmp_path) as kv:
        await kv.set("k", "v")
        with pytest.raises(kvmemo.DirectoryInUse, match=r"in use by another KVMemo store"):
            async with kvmemo.open_store(shards=2, data_dir=tmp_path):
                pass  # pragma: no cover - refused before the block
        assert await kv.get("k") == b"v"  # the first store is untouched


@pytest.mark.parametrize(
    "cls",
    [*ERROR_CLASSES, kvmemo.DisconnectedError],
    ids=lambda c: c.__name__,
)
def test_readme_error_table_names_each_class_with_its_kind(cls: type[Exception]) -> None:
    kind = "(base)" if cls is kvmemo.KVMemoError else f"`{cls.kind}`"  # type: ignore[attr-defined]
    row = re.compile(rf"^\| `{cls.__name__}` \| {re.escape(kind)} \| .+ \|$", re.MULTILINE)
    assert row.search(README), f"README: no error-table row for {cls.__name__} ({kind})"


def test_readme_names_directory_in_use_and_the_errors_module() -> None:
    assert "`kvmemo.DirectoryInUse`" in README
    assert "`kvmemo.errors.__all__`" in README


# -- docstrings --------------------------------------------------------------------------------


PUBLIC_METHODS = sorted(
    name for name, obj in vars(Commands).items() if callable(obj) and not name.startswith("_")
)


def test_commands_has_the_public_methods_this_file_checks() -> None:
    assert len(PUBLIC_METHODS) > 60
    assert {"incr", "expire", "ttl", "mset", "ping", "get", "set"} <= set(PUBLIC_METHODS)


@pytest.mark.parametrize("name", PUBLIC_METHODS)
def test_every_public_command_method_has_a_behaviour_docstring(name: str) -> None:
    doc = inspect.getdoc(getattr(Commands, name))
    assert doc, f"Commands.{name} has no docstring"
    assert getattr(kvmemo.Store, name).__qualname__.split(".")[0] in {"Commands", "Store"}


def test_expire_and_ttl_docstrings_state_their_redis_semantics() -> None:
    expire = inspect.getdoc(Commands.expire) or ""
    for condition in ('"NX"', '"XX"', '"GT"', '"LT"'):
        assert condition in expire
    ttl = inspect.getdoc(Commands.ttl) or ""
    assert "-1" in ttl
    assert "-2" in ttl


# -- the example type-checks ---------------------------------------------------------------


# A misuse the types must refuse: an EXPIRE condition outside NX/XX/GT/LT.
MISUSE = """\
import kvmemo


async def f(kv: kvmemo.Store) -> int:
    return await kv.expire("k", 10, "QQ")
"""


@pytest.fixture(scope="module")
def mypy_strict(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    """One ``mypy --strict`` run over the example and the misuse (about 5 s): (report, status)."""
    api = pytest.importorskip("mypy.api")
    tmp = tmp_path_factory.mktemp("mypy")
    misuse = tmp / "misuse.py"
    misuse.write_text(MISUSE, "utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # mypy finds this tree's kvmemo (not an installed one) from here
        stdout, stderr, status = api.run(
            [
                "--strict",
                "--config-file",
                str(ROOT / "pyproject.toml"),
                "--cache-dir",
                str(tmp / "cache"),
                "examples/embedded.py",
                str(misuse),
            ]
        )
    return stdout + stderr, status


def test_embedded_example_passes_mypy_strict(mypy_strict: tuple[str, int]) -> None:
    report, _ = mypy_strict
    assert "embedded.py" not in report, report
    assert "Found 1 error in 1 file (checked 2 source files)" in report, report


def test_mypy_refuses_an_expire_condition_outside_nx_xx_gt_lt(
    mypy_strict: tuple[str, int],
) -> None:
    report, status = mypy_strict
    assert status == 1
    assert re.search(r'misuse\.py:5: error: Argument 3 to "expire" of "Commands"', report), report


# -- the README's virtual-time claims ----------------------------------------------------------


async def test_relative_ttl_and_idletime_follow_trio_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        await kv.set("k", "v", ex=10)
        await kv.set("idle", "v")
        started = time.perf_counter()
        await trio.sleep(5)
        assert await kv.ttl("k") == 5
        assert await kv.object_idletime("idle") == 5
        await trio.sleep(6)
        assert await kv.get("k") is None
        assert time.perf_counter() - started < 5  # virtual seconds, not wall seconds


async def test_active_expiry_sweeps_follow_trio_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        await kv.mset({f"k{i}": "v" for i in range(50)})
        for i in range(50):
            await kv.pexpire(f"k{i}", 500)
        await trio.sleep(1)
        assert await kv.dbsize() == 0  # swept, never read


async def test_expiretime_drifts_by_the_virtual_time_elapsed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        await kv.set("k", "v", ex=1000)
        before = await kv.expiretime("k")
        await trio.sleep(100)
        after = await kv.expiretime("k")
        assert before - after in (99, 100, 101)  # the wall clock barely moved


async def test_a_larger_ttl_tick_makes_long_virtual_sleeps_cheap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, ttl_tick=60) as kv:
        await kv.set("k", "v", ex=3600)
        started = time.perf_counter()
        await trio.sleep(3601)
        assert time.perf_counter() - started < 2
        assert await kv.get("k") is None  # expired on access
