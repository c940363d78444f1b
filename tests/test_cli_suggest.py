"""A misspelt flag or TOML key is refused with the closest known name."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmemo.cli import main


def test_a_misspelt_flag_names_the_closest_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--maxmemry", "1MiB"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "kvmemo: error: unrecognized arguments: --maxmemry 1MiB (did you mean --maxmemory?)"
    )


def test_a_flag_like_no_other_gets_no_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--zzzzzzzz=1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "kvmemo: error: unrecognized arguments: --zzzzzzzz=1"


def test_a_misspelt_toml_key_names_the_closest_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "kvmemo.toml"
    config.write_text('[store]\nmaxmemry = "1MiB"\n')
    assert main(["serve", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kvmemo: error: config file {config}: unknown setting 'store.maxmemry'"
        " (did you mean 'maxmemory'?)"
    )


async def test_chaos_output_into_a_closed_pipe_ends_silently_with_141() -> None:
    # `kvmemo chaos | head`: the report's writer gone, no traceback.
    from test_repl_s22 import run_into_a_closed_pipe

    argv = ["chaos", "--duration", "0.3", "--shards", "1", "--kill-rate", "0", "--no-progress"]
    status, stderr = await run_into_a_closed_pipe(argv)
    assert (status, stderr) == (141, b"")


async def test_a_misspelt_store_setting_names_the_closest_one() -> None:
    import kvmemo

    with pytest.raises(
        TypeError, match=r"^unknown store setting 'maxmemry' \(did you mean 'maxmemory'\?\)$"
    ):
        async with kvmemo.open_store(maxmemry="1MiB"):
            pass
    with pytest.raises(
        TypeError, match=r"^unknown store setting 'dir' \(did you mean 'data_dir'\?\)$"
    ):
        async with kvmemo.open_store(dir="data"):
            pass
    with pytest.raises(TypeError, match=r"^unknown store setting 'zzzzzz'$"):
        async with kvmemo.open_store(zzzzzz=1):
            pass


def test_serve_help_lists_each_flag_under_its_toml_section(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kvmemo.settings import SETTINGS

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    sections: dict[str, str] = {}
    current = ""
    for line in out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line.split(" ", 1)[0].rstrip(":")
        elif line.startswith("  --"):
            sections[line.split()[0]] = current
    for s in SETTINGS:
        assert sections[s.flag] == s.table, s.flag
    assert "(lru)" in out  # the default eviction policy is shown
