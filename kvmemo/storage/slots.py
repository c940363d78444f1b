"""Key placement: key -> hash slot -> shard, exactly as Redis Cluster places keys.

Design
------
Problem: every request must find the shard that owns its key, cheaply, and the
answer must never change for a given key and shard count: not across restarts,
processes, or (later) cluster nodes. Python's ``hash()`` is salted per process,
so it cannot be used.

Approach: Redis Cluster's scheme. A key hashes to one of ``SLOT_COUNT`` (16384)
slots with CRC16/XMODEM (polynomial 0x1021, initial value 0), masked to 14
bits. A hash tag ``{...}`` makes only the tag count, so related keys
(``{user1000}.following``, ``{user1000}.followers``) land in the same slot and
therefore on the same shard, which is what lets a multi-key command on them stay
on one shard. Slots are split among shards in contiguous ranges
(``slot * shards // SLOT_COUNT``), precomputed into a table of 16384 entries so
that routing a key costs one CRC (in C, ``binascii.crc_hqx``) and one index.

Staleness: none. A ``SlotMap`` is an immutable value; changing the number of
shards means building a new map (and moving the keys whose slot changed owner).
"""

from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Iterable, Sequence
from typing import Final

import attrs

__all__ = ["SLOT_COUNT", "SlotMap", "crc16", "key_slot"]

SLOT_COUNT: Final = 16384  # hash slots, as in Redis Cluster
_SLOT_MASK: Final = SLOT_COUNT - 1  # 0x3FFF: the low 14 bits of the CRC


def crc16(data: bytes) -> int:
    """Return the CRC16/XMODEM of ``data`` (polynomial 0x1021, initial value 0).

    This is the CRC Redis Cluster uses for key slots; ``crc16(b"123456789")``
    is ``0x31C3``.

    Args:
        data: the bytes to checksum.

    Returns:
        An integer in ``range(65536)``.
    """
    return crc_hqx(data, 0)


def key_slot(key: bytes) -> int:
    """Return the hash slot of ``key``, honouring hash tags as Redis Cluster does.

    If the key contains a ``{`` followed, later, by a ``}`` with at least one
    byte between them, only the bytes between the first ``{`` and the first
    ``}`` after it are hashed; otherwise the whole key is. So ``b"foo{}{bar}"``
    hashes the whole key (the first tag is empty), ``b"foo{{bar}}zap"`` hashes
    ``b"{bar"`` and ``b"foo{bar}{zap}"`` hashes ``b"bar"``.

    Args:
        key: the key, as bytes.

    Returns:
        The slot, in ``range(SLOT_COUNT)``.
    """
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc_hqx(key, 0) & _SLOT_MASK


def _check_shards(instance: SlotMap, attribute: attrs.Attribute[int], shards: int) -> None:
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards > SLOT_COUNT:
        raise ValueError(f"shards must be <= {SLOT_COUNT}, got {shards}")


def _slot_range(shard: int, shards: int) -> range:
    """The slots ``n`` with ``n * shards // SLOT_COUNT == shard``, for a valid shard."""
    # The smallest slot n with n * shards // SLOT_COUNT >= s is
    # ceil(s * SLOT_COUNT / shards).
    first = -(-shard * SLOT_COUNT // shards)
    stop = -(-(shard + 1) * SLOT_COUNT // shards)
    return range(first, stop)


@attrs.frozen
class SlotMap:
    """The immutable assignment of the 16384 hash slots to ``shards`` shards.

    Shard ``s`` owns the contiguous slot range ``slots_of(s)``; slot ``n``
    belongs to shard ``n * shards // SLOT_COUNT``.

    Invariant: ``_table[slot] == slot * shards // SLOT_COUNT`` for every slot,
    so every shard owns at least one slot (``shards <= SLOT_COUNT``), the
    ranges are contiguous, disjoint, in shard order, and cover every slot.

    Two maps are equal when they have the same number of shards.

    Raises:
        ValueError: if ``shards`` is below 1 or above ``SLOT_COUNT``.
    """

    shards: int = attrs.field(validator=_check_shards)
    _table: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False)

    @_table.default
    def _build_table(self) -> tuple[int, ...]:
        # Runs before the validator: clamp so a bad value cannot fail here
        # first with a less helpful error than the validator's.
        shards = min(max(self.shards, 1), SLOT_COUNT)
        table: list[int] = []
        for shard in range(shards):
            table += [shard] * len(_slot_range(shard, shards))
        return tuple(table)

    def shard_of(self, key: bytes) -> int:
        """Return the shard that owns ``key`` (the hot path of every request).

        Args:
            key: the key, as bytes.

        Returns:
            The shard, in ``range(self.shards)``.
        """
        # key_slot inlined: this runs once per request (a test holds the two equal).
        start = key.find(b"{")
        if start != -1:
            end = key.find(b"}", start + 1)
            if end > start + 1:
                key = key[start + 1 : end]
        return self._table[crc_hqx(key, 0) & _SLOT_MASK]

    def shard_of_slot(self, slot: int) -> int:
        """Return the shard that owns ``slot``.

        Args:
            slot: a hash slot.

        Returns:
            The shard, in ``range(self.shards)``.

        Raises:
            ValueError: if ``slot`` is not in ``range(SLOT_COUNT)``.
        """
        if not 0 <= slot < SLOT_COUNT:
            raise ValueError(f"slot must be >= 0 and < {SLOT_COUNT}, got {slot}")
        return self._table[slot]

    def slots_of(self, shard: int) -> range:
        """Return the contiguous range of slots that ``shard`` owns (never empty).

        Args:
            shard: a shard number.

        Returns:
            ``range(first, stop)``: exactly the slots ``n`` with
            ``shard_of_slot(n) == shard``.

        Raises:
            ValueError: if ``shard`` is not in ``range(self.shards)``.
        """
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard must be >= 0 and < {self.shards}, got {shard}")
        return _slot_range(shard, self.shards)

    def shards_of(self, keys: Sequence[bytes]) -> list[int]:
        """Return the shard of each of ``keys``, in order: ``shard_of`` of each.

        The hot path of a multi-key write's routing (MSET): when no key holds
        a ``{`` (one search of their join), no hash tag can apply, and every
        key's shard is one CRC and one index, in one comprehension; otherwise
        each key goes through :meth:`shard_of`. A test holds the two equal.
        """
        if b"{" in b"".join(keys):
            shard_of = self.shard_of
            return [shard_of(key) for key in keys]
        table = self._table
        return [table[crc_hqx(key, 0) & _SLOT_MASK] for key in keys]

    def group_by_shard(self, keys: Iterable[bytes]) -> dict[int, list[int]]:
        """Group the positions of ``keys`` by owning shard, to fan out a multi-key command.

        Args:
            keys: the keys of one command, in argument order.

        Returns:
            A dict from shard to the positions (indexes into ``keys``) of the
            keys that shard owns, each list in input order. The dict holds only
            shards that own at least one key, in ascending shard order, which
            is the fixed order in which a multi-shard atomic command (``mset``)
            takes its shards.
        """
        # key_slot inlined, with everything bound to locals: the per-key cost
        # of a multi-key command's routing (a test holds this equal to
        # shard_of per key).
        table = self._table
        crc = crc_hqx
        groups: dict[int, list[int]] = {}
        get = groups.get
        for position, key in enumerate(keys):
            start = key.find(b"{")
            if start != -1:
                end = key.find(b"}", start + 1)
                if end > start + 1:
                    key = key[start + 1 : end]
            shard = table[crc(key, 0) & _SLOT_MASK]
            positions = get(shard)
            if positions is None:
                groups[shard] = [position]
            else:
                positions.append(position)
        if len(groups) > 1:
            return {shard: groups[shard] for shard in sorted(groups)}
        return groups
