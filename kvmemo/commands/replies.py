"""Reply shapes that the front ends render differently (no dependencies).

A command's result is one of the protocol's JSON-ready values (``None``,
``int``, ``bytes``, ``str``, lists of these). A few Redis replies are *maps*
in RESP3 but flat arrays of alternating names and values in RESP2, JSON-RPC
and the embedded API: :class:`FieldList` marks them, so the Redis port can
send a map after ``HELLO 3`` while every other caller sees a plain list.
"""

from __future__ import annotations

from typing import Any


class FieldList(list[Any]):
    """Alternating field names and values: ``[name1, value1, name2, value2, ...]``.

    A ``list`` to every caller (equality, JSON, iteration); the RESP encoder
    writes it as a map of ``len // 2`` entries under RESP3, as Redis does
    (``LCS ... IDX``). Invariant: an even number of items.
    """

    __slots__ = ()
