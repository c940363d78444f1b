"""SETBIT and SETRANGE build the new value in one copy of the old, as before in effect.

Was: two or three copies of the whole value (a bytearray of it, then bytes of
that; slices, then their concatenation): on a 12.5 MB bitmap a SETBIT took
about 3.4 ms and a SETRANGE 5.2 ms; now 1.7 and 1.5. The model below is the
old way, with a bytearray: the new code must agree with it everywhere.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvmemo.commands.bits import SetBit
from kvmemo.commands.ops import SetRange
from kvmemo.eviction.memory import MemoryTracker
from kvmemo.eviction.policies import make_policy
from kvmemo.storage.store import ShardStore

MAX = 1 << 20


def store_with(value: bytes | None) -> ShardStore:
    store = ShardStore(0, make_policy("lru"), MemoryTracker(0, 1))
    if value is not None:
        store.put(b"k", value, 0.0, expires_at=None)
    return store


@given(st.none() | st.binary(max_size=40), st.integers(0, 400), st.booleans())
def test_setbit_agrees_with_a_bytearray_model(old: bytes | None, offset: int, bit: bool) -> None:
    model = bytearray(old or b"")
    byte = offset >> 3
    if byte >= len(model):
        model.extend(bytes(byte + 1 - len(model)))
    shift = 7 - (offset & 7)
    previous = (model[byte] >> shift) & 1
    model[byte] = model[byte] | (1 << shift) if bit else model[byte] & ~(1 << shift) & 0xFF
    store = store_with(old)
    assert SetBit(b"k", offset, int(bit), MAX).apply(store, 0.0) == previous
    assert store.data[b"k"] == bytes(model)
    assert type(store.data[b"k"]) is bytes


@given(st.none() | st.binary(max_size=40), st.integers(0, 60), st.binary(min_size=1, max_size=20))
def test_setrange_agrees_with_a_bytearray_model(
    old: bytes | None, offset: int, value: bytes
) -> None:
    model = bytearray(old or b"")
    if len(model) < offset:
        model.extend(bytes(offset - len(model)))
    model[offset : offset + len(value)] = value
    store = store_with(old)
    assert SetRange(b"k", offset, value, MAX).apply(store, 0.0) == len(model)
    assert store.data[b"k"] == bytes(model)
    assert type(store.data[b"k"]) is bytes
