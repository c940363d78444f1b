"""LCS's bounds are settings (``lcs_max_cells``, ``lcs_max_length``), as every limit is.

Was: fixed at 10^8 cells and 200,000 bytes in the code. LCS runs without a
checkpoint, so these bound how long one call holds the whole server; an
operator could not tighten them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import resolved

import kvmemo
from kvmemo import KVMemoError
from kvmemo.commands.table import LCS_MAX_CELLS, LCS_MAX_LENGTH
from kvmemo.config import StoreConfig


def test_the_defaults_are_the_documented_bounds() -> None:
    config = StoreConfig()
    assert (config.lcs_max_cells, config.lcs_max_length) == (10**8, 200_000)
    assert (LCS_MAX_CELLS, LCS_MAX_LENGTH) == (10**8, 200_000)


async def test_lcs_max_length_bounds_the_sum_of_the_lengths() -> None:
    async with kvmemo.open_store(shards=1, lcs_max_length=10) as kv:
        await kv.mset({"{t}a": "abcde", "{t}b": "axcye"})
        assert await kv.execute("lcs", "{t}a", "{t}b") == b"ace"  # 10 bytes: at the bound
        await kv.append("{t}a", "f")
        with pytest.raises(KVMemoError, match="^LCS input too large$") as info:
            await kv.execute("lcs", "{t}a", "{t}b", "LEN")
        assert info.value.kind == "TOO_LARGE"
        assert await kv.get("{t}a") == b"abcdef"  # nothing changed


async def test_lcs_max_cells_bounds_the_product_of_the_lengths() -> None:
    async with kvmemo.open_store(shards=1, lcs_max_cells=20) as kv:
        await kv.mset({"{t}a": "abcd", "{t}b": "xbxdx"})  # 4 x 5 = 20 cells
        assert await kv.execute("lcs", "{t}a", "{t}b", "LEN") == 2
        await kv.append("{t}b", "x")  # 24 cells
        with pytest.raises(KVMemoError, match="^LCS input too large$"):
            await kv.execute("lcs", "{t}a", "{t}b", "IDX")


async def test_an_empty_value_is_never_too_large() -> None:
    async with kvmemo.open_store(shards=1, lcs_max_cells=1, lcs_max_length=1) as kv:
        await kv.set("{t}a", "abc")
        assert await kv.execute("lcs", "{t}a", "{t}missing", "LEN") == 0


def test_the_bounds_are_flags_variables_and_config_keys() -> None:
    r = resolved(["--lcs-max-cells", "5000", "--lcs-max-length", "300"])
    assert (r.store.lcs_max_cells, r.store.lcs_max_length) == (5000, 300)
    r = resolved([], {"KVMEMO_LCS_MAX_LENGTH": "42"})
    assert r.store.lcs_max_length == 42


@pytest.mark.parametrize("name", ["lcs_max_cells", "lcs_max_length"])
def test_a_bound_under_one_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be >= 1, got 0$"):
        StoreConfig(**{name: 0})


def test_the_bounds_are_keys_of_the_limits_table(tmp_path: Path) -> None:
    config = tmp_path / "kvmemo.toml"
    config.write_text("[limits]\nlcs_max_cells = 7\nlcs_max_length = 8\n")
    r = resolved(["--config", str(config)])
    assert (r.store.lcs_max_cells, r.store.lcs_max_length) == (7, 8)
