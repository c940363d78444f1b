"""The record format of the write-ahead log and of snapshots: a pure codec (no I/O).

Design. A record is the *effect* of one write on one shard, never the command
that caused it: ``INCR`` is logged as a ``SET`` of the full new value, a
relative ``EXPIRE`` as an absolute Unix time in milliseconds, ``RENAME`` as a
``DEL`` and a ``SET``. Replay is therefore deterministic and does not depend on
the clock. Every record but a ``PATCH`` is self-contained too: it does not
depend on any earlier record being present (recovery relies on this when it
keeps the records of a later segment after damage in an earlier one). A
``PATCH`` (an in-place edit of a long value: ``SETBIT``, ``SETRANGE``,
``APPEND``, ``BITFIELD``) sets bytes of the value the key held, so that the
record is the size of the edit, not of the value (a ``SET`` of a 12 MB bitmap
per ``SETBIT`` made the log 30,000 times the size of Redis's AOF). It names
its *base*: the record that gave the key the value it edits (that record's
CRC, and the value's length), a *base* ``SET`` (one of version 2) or a
``PATCH``, and replay applies it only to that value (see :class:`Chains`).
So whatever records were lost (a power loss's tail, even one that left no
damage to see; a repair's; a batch the log dropped), a ``PATCH`` never
makes a value its key never held: one whose base is not the value replay
holds is skipped, with every later ``PATCH`` of its key until the key is
written whole again.

Layout of one record, little-endian::

    offset  size  field
    0       4     CRC32 of every byte from offset 4 to the end of the payload
    4       1     format version (1; 2 for a PATCH, see Versions)
    5       1     op (:class:`Op`)
    6       4     payload length P
    10      P     payload: key length u32, key, value length u32, value,
                  expiry flag u8 (0: none, 1: set), expiry int64 (Unix ms; 0 if none)

The CRC covers everything but itself, so no damaged byte anywhere in a record
goes unnoticed (up to CRC32's 2**-32 chance of a random collision; any burst of
at most 32 flipped bits is always caught). Lengths are checked against each
other and against :data:`MAX_PAYLOAD`, so no length, however damaged, makes
the decoder read outside its buffer or allocate more than the buffer holds.

Damage comes in two kinds, which :class:`Scanner` and :func:`replay` tell apart:

- :class:`Torn`: the data ends inside a record, and every field of it that is
  present agrees with a valid record (version, op, and the payload, key and
  value lengths add up). This is what a crash in the middle of an append
  leaves; the record was never acknowledged, so cutting it off loses nothing.
- :class:`Corrupt`: anything else: a CRC mismatch, an unknown version or op,
  an impossible length, lengths that do not add up, an invalid expiry field.

A damaged length field cannot pass for a torn tail: the payload length is
checked against the key and value lengths as soon as they are present, and in
a complete record they all are, and against the op's shape (a DEL has no
value, a GROUP no key, ...). Two length fields damaged together (a burst of
bad bytes over both) can agree only in a SET or a PATCH (the two ops whose
key and value lengths are both free) whose key runs past the end of the
data: then, and only then, the bytes after are searched for a whole
record (see ``_whole_record_after``: they are fewer than the torn key
would hold); finding one, it is damage. No other forward search for the
next valid record is ever made: it would cost time in proportion to the size
of a torn value, and a value may contain anything, encoded records included.

Versions. Every later format version keeps the first 10 bytes as they are
(a CRC32 of bytes 4 to the end of the payload, the version, one byte whose
meaning is the version's, the payload length), so this build tells a record
of a newer version from damage: a complete record whose version is above
:data:`FORMAT_VERSION` and whose CRC holds is :class:`Newer`, a
:class:`Corrupt` that no reader may repair, truncate or move aside (they
raise :class:`NewerVersion`: the start is refused). A flipped version byte
fails the CRC and stays corrupt; so does a torn record of an unknown
version, whose CRC cannot be checked.

Version 2 added the ``PATCH`` op, and the *base* ``SET`` (a ``SET`` of
version 2: one a ``PATCH`` may name as its base), and changed nothing else:
every other record is still written as version 1, so a log of no in-place
edits stays readable by a build of version 1, and one that holds some is
refused by it as newer (never repaired away). This build reads both; a
version-1 ``PATCH``, and a version-2 record of any op but these two, are
damage.
"""

from __future__ import annotations

import enum
import mmap
import struct
import zlib
from collections.abc import Callable, Generator
from os import PathLike
from typing import Any, TypeAlias, cast

import attrs

from ..errors import KVMemoError

FORMAT_VERSION = 2  # the newest record format this build reads (and a PATCH's version byte)
_V1 = 1  # the version byte of every other record (their layout is version 1's)

HEADER = struct.Struct("<IBBI")  # crc32, version, op, payload length
HEADER_SIZE = HEADER.size  # 10 bytes
_U32 = struct.Struct("<I")
_HEAD_KLEN = struct.Struct("<IBBII")  # the header and the key length after it
_HEAD_KLEN_SIZE = _HEAD_KLEN.size  # 14 bytes
_VOP_LEN_KLEN = struct.Struct("<BBII")  # version, op, payload length, key length
_EXPIRY = struct.Struct("<Bq")  # expiry flag, expiry in Unix ms
_NO_EXPIRY = _EXPIRY.pack(0, 0)  # the expiry field of a record without expiry
MIN_PAYLOAD = 4 + 4 + _EXPIRY.size  # 17 bytes: empty key, empty value, expiry field
# Bytes; a larger length field is damage, not data. 2 GiB: a SET record of the
# largest key and value the default limits allow (512 MiB each) fits, as does a
# group of several (StoreConfig refuses, with persistence on, limits whose
# largest SET would not fit: see MAX_ENTRY_BYTES).
MAX_PAYLOAD = 1 << 31
MAX_EXPIRES_MS = (1 << 63) - 1  # the largest int64


def max_entry_bytes() -> int:
    """The most key + value bytes one SET record can hold (MAX_PAYLOAD less its fields)."""
    return MAX_PAYLOAD - MIN_PAYLOAD


class PersistenceError(KVMemoError):
    """Base class of the errors of the persistence layer (other than OSError).

    A :class:`~kvmemo.errors.KVMemoError` (kind ``IO``), so that an embedded
    caller's ``except kvmemo.KVMemoError`` around ``open_store`` also catches
    a start refused by its data directory (in use, damaged, written with
    another shard count or by a newer KVMemo); each keeps its own class
    (``kvmemo.DirectoryInUse``, ``CorruptLog``, ...) for a narrower ``except``.
    Only the leaf module ``kvmemo.errors`` is imported for it.
    """

    kind = "IO"
    code = -32008


class NewerVersion(PersistenceError):
    """A data file was written by a newer KVMemo, in a format version this build cannot read.

    Never damage: the start is refused, with or without repair, and the file
    is left as it is (an older build must not throw a newer one's data away).

    Attributes:
        path: the file (None when not known yet: see :func:`intent_sections`).
        version: the version found.
        supported: the newest version of that format this build reads.
        offset: where in the file (0: its header, or its first record).
        file_format: which format (``record``, ``snapshot``, ``commit frame``;
            the ``kind`` argument: ``kind`` itself is the error's kind, ``IO``).
    """

    def __init__(
        self,
        path: str | PathLike[str] | None,
        version: int,
        supported: int,
        *,
        offset: int = 0,
        kind: str = "record",
    ) -> None:
        where = f" at offset {offset}" if offset else ""
        prefix = f"{path}: " if path is not None else ""
        super().__init__(
            f"{prefix}written by a newer KVMemo ({kind} format version {version}{where}; "
            f"this build reads up to {supported}); refusing to start"
        )
        self.path = path
        self.version = version
        self.supported = supported
        self.offset = offset
        self.file_format = kind


class Op(enum.IntEnum):
    """What a record does to its shard when replayed.

    0 is not an op, so a run of zero bytes never decodes as a record.
    """

    SET = 1  # key := value, with expiry ``expires_ms`` (None: no expiry)
    DEL = 2  # remove key (absent: nothing)
    EXPIRE = 3  # key's expiry := ``expires_ms`` (None: persist); absent key: nothing
    FLUSH = 4  # remove every key of the shard
    # A shard log's mark that this shard resolved multi-shard round ``txid``
    # (key: txid, u64; value: b"\x01" committed, b"\x00" aborted). Changes
    # no key; recovery reads it against the intent log (:mod:`.intents`).
    TXN = 5
    # The intent log's record of multi-shard round ``txid`` (key: txid, u64;
    # value: each shard's effect records, see :func:`encode_intent`). Never in
    # a shard log or a snapshot.
    INTENT = 6
    # Several effects of one command on one shard (an MSET, a DEL of several
    # keys, a RENAME or a transaction's part), as one record (no key, no
    # expiry; value: whole SET, DEL, EXPIRE or FLUSH records, no group, see
    # :func:`encode_group`): its CRC covers them all, so a torn or damaged
    # group is applied not in part but not at all.
    GROUP = 7
    # Bytes of key's value from ``offset`` := ``data``, the value first
    # zero-filled up to ``offset`` if shorter; the expiry is unchanged. Value:
    # offset u64, the base's record CRC u32 and value length u64, then data;
    # no expiry. Applied only to its base (see Chains): the value given by a
    # base SET (a SET of version 2, outside a GROUP) or by a PATCH. Never
    # inside a GROUP. Format version 2 (see Versions).
    PATCH = 8


_SET, _DEL, _EXPIRE, _FLUSH = int(Op.SET), int(Op.DEL), int(Op.EXPIRE), int(Op.FLUSH)
_TXN, _INTENT, _GROUP = int(Op.TXN), int(Op.INTENT), int(Op.GROUP)
_PATCH = int(Op.PATCH)
_U64 = struct.Struct("<Q")
_CRC_VERSION = struct.Struct("<IB")
_PATCH_HEAD = struct.Struct("<QIQ")  # a PATCH's value: offset, base CRC, base length
_SECTION = struct.Struct("<II")  # shard number, length of its effect records
_OPS = frozenset(int(op) for op in Op)
_VERSIONS = frozenset({_V1, FORMAT_VERSION})
_V1_BYTE, _V2_BYTE = bytes([_V1]), bytes([FORMAT_VERSION])
# The ops a record of each version may hold (a version-1 PATCH is damage, and
# so is a version-2 record of any op but a SET, a base SET, and a PATCH).
_OPS_OF = {_V1: _OPS - {_PATCH}, FORMAT_VERSION: frozenset({_SET, _PATCH})}
# The ops whose key and value lengths are both free: a torn one whose key runs
# past the end has no length to check the others against (see _whole_record_after).
_FREE_KEY = (_SET, _PATCH)

Buffer: TypeAlias = bytes | mmap.mmap
"""What the decoder reads: slicing either gives ``bytes``."""

Fields: TypeAlias = tuple[int, bytes, bytes, int | None]
"""A decoded record as a plain tuple ``(op, key, value, expires_ms)``."""


@attrs.frozen
class Record:
    """One logged effect. See :class:`Op` for what each field means per op.

    Shape rules (checked by :func:`encode`): ``DEL`` has no value and no
    expiry, ``EXPIRE`` no value, ``FLUSH`` no key, value nor expiry;
    ``expires_ms`` is None or in ``[0, 2**63)``.
    """

    op: Op
    key: bytes = b""
    value: bytes = b""
    expires_ms: int | None = None


@attrs.frozen
class Torn:
    """The data ends inside an incomplete record that starts at ``offset``."""

    offset: int


@attrs.frozen
class Corrupt:
    """The record at ``offset`` is damaged; ``reason`` says how."""

    offset: int
    reason: str


@attrs.frozen
class Newer(Corrupt):
    """The record at ``offset`` is whole, its CRC holds, and a newer format ``version`` wrote it.

    A :class:`Corrupt` to a reader that does not look further, so that none
    ever takes it for a torn tail; every reader of files raises
    :class:`NewerVersion` for it instead of repairing anything.
    """

    version: int

    @classmethod
    def at(cls, offset: int, version: int) -> Newer:
        return cls(
            offset, f"format version {version}, newer than this build's {FORMAT_VERSION}", version
        )

    def error(self, path: str | PathLike[str] | None) -> NewerVersion:
        """The :class:`NewerVersion` to raise for this record of file ``path``."""
        return NewerVersion(path, self.version, FORMAT_VERSION, offset=self.offset)


Problem: TypeAlias = Torn | Corrupt


@attrs.frozen
class DecodeResult:
    """What :func:`decode_stream` found.

    Invariant: ``records`` are exactly the records of ``data[:end]``, and
    ``problem`` is None if and only if ``end == len(data)``.
    """

    records: list[Record]
    end: int
    problem: Problem | None


def _shape_error(op: int, key: bytes, value: bytes, expires_ms: int | None) -> str | None:
    """Why these fields are not a valid record, or None if they are."""
    if expires_ms is not None and not 0 <= expires_ms <= MAX_EXPIRES_MS:
        return f"expires_ms must be in [0, 2**63), got {expires_ms}"
    if op == _SET:
        return None
    if op == _DEL:
        if value or expires_ms is not None:
            return "a DEL record has no value and no expiry"
    elif op == _EXPIRE:
        if value:
            return "an EXPIRE record has no value"
    elif op == _FLUSH:
        if key or value or expires_ms is not None:
            return "a FLUSH record has no key, value nor expiry"
    elif op == _TXN:
        if len(key) != 8 or value not in (b"\x00", b"\x01") or expires_ms is not None:
            return "a TXN record has an 8-byte txid, a 1-byte outcome and no expiry"
    elif op == _INTENT:
        if len(key) != 8 or expires_ms is not None:
            return "an INTENT record has an 8-byte txid and no expiry"
    elif op == _GROUP:
        if key or not value or expires_ms is not None:
            return "a GROUP record has no key, some records and no expiry"
    elif op == _PATCH:
        if len(value) < _PATCH_HEAD.size or expires_ms is not None:
            return f"a PATCH record has a {_PATCH_HEAD.size}-byte head and no expiry"
        offset, _, base_len = _PATCH_HEAD.unpack_from(value)
        end = offset + len(value) - _PATCH_HEAD.size
        if base_len > MAX_PAYLOAD:
            return f"a PATCH record of a base of {base_len} bytes, past {MAX_PAYLOAD}"
        if end > MAX_PAYLOAD:
            return f"a PATCH record ending at byte {end} of its value, past {MAX_PAYLOAD}"
    else:
        return f"unknown op {op}"
    return None


def encode_fields(
    op: int, key: bytes, value: bytes = b"", expires_ms: int | None = None, version: int = _V1
) -> bytes:
    """Encode one record from its fields (the allocation-free form of :func:`encode`).

    ``version``: a PATCH is always version 2; a SET may be (a base SET, see
    :func:`encode_base`); any other op is version 1.

    Raises:
        ValueError: the fields break a shape rule of :class:`Record`, or the
            payload would exceed :data:`MAX_PAYLOAD`.
    """
    if op != _SET or expires_ms is not None:  # a SET without expiry has no shape rule
        reason = _shape_error(op, key, value, expires_ms)
        if reason is not None:
            raise ValueError(reason)
    plen = MIN_PAYLOAD + len(key) + len(value)
    if plen > MAX_PAYLOAD:
        raise ValueError(f"record payload must be <= {MAX_PAYLOAD} bytes, got {plen}")
    tail = _NO_EXPIRY if expires_ms is None else _EXPIRY.pack(1, expires_ms)
    body = b"".join(
        (
            _VOP_LEN_KLEN.pack(FORMAT_VERSION if op == _PATCH else version, op, plen, len(key)),
            key,
            _U32.pack(len(value)),
            value,
            tail,
        )
    )
    return _U32.pack(zlib.crc32(body)) + body


# Packers of whole SET records (without expiry) by key and value length: the
# body, then the CRC before it (see encode_set). Bounded: shapes past the limit
# are packed field by field, and the cache starts over when it is full.
_SET_PACKERS: dict[tuple[int, int], tuple[Callable[..., bytes], Callable[..., bytes]]] = {}
_SET_PACKERS_MAX = 1024  # shapes cached
_SET_PACKED_MAX = 4096  # key + value bytes of a cached shape
assert MIN_PAYLOAD + _SET_PACKED_MAX <= MAX_PAYLOAD  # a cached shape needs no size check


def _set_packers(klen: int, vlen: int) -> tuple[Callable[..., bytes], Callable[..., bytes]]:
    if len(_SET_PACKERS) >= _SET_PACKERS_MAX:
        _SET_PACKERS.clear()
    body = struct.Struct(f"<BBII{klen}sI{vlen}s{len(_NO_EXPIRY)}s")
    packers = (body.pack, struct.Struct(f"<I{body.size}s").pack)
    _SET_PACKERS[klen, vlen] = packers
    return packers


def encode_set(key: bytes, value: bytes) -> bytes:
    """:func:`encode_fields` of a SET without expiry, the log's most common record.

    The hot path of every plain write under persistence: no shape rule to
    check and no expiry to pack; the bytes are identical (a test holds them
    to :func:`encode_fields`). A small record is packed by two ``Struct``
    calls made for its key and value lengths (cached), a quarter fewer
    instructions than packing its fields and joining them.

    Raises:
        ValueError: the payload would exceed :data:`MAX_PAYLOAD`.
    """
    klen = len(key)
    vlen = len(value)
    if klen + vlen <= _SET_PACKED_MAX:
        packers = _SET_PACKERS.get((klen, vlen))
        if packers is None:
            packers = _set_packers(klen, vlen)
        body = packers[0](_V1, _SET, MIN_PAYLOAD + klen + vlen, klen, key, vlen, value, _NO_EXPIRY)
        return packers[1](zlib.crc32(body), body)
    plen = MIN_PAYLOAD + klen + vlen
    if plen > MAX_PAYLOAD:
        raise ValueError(f"record payload must be <= {MAX_PAYLOAD} bytes, got {plen}")
    body = b"".join(
        (
            _VOP_LEN_KLEN.pack(_V1, _SET, plen, klen),
            key,
            _U32.pack(vlen),
            value,
            _NO_EXPIRY,
        )
    )
    return _U32.pack(zlib.crc32(body)) + body


def encode_patch(key: bytes, offset: int, data: bytes, base: tuple[int, int]) -> bytes:
    """A ``PATCH`` record: bytes ``offset`` onwards of ``key``'s value := ``data``.

    ``base``: the :func:`record_crc` of the record that gave the key the
    value edited (a :func:`encode_base` record, or a PATCH), and that
    value's length.

    Raises:
        ValueError: the edit ends past :data:`MAX_PAYLOAD` bytes, or the
            payload would.
    """
    return encode_fields(_PATCH, key, _PATCH_HEAD.pack(offset, *base) + data)


def encode_base(key: bytes, value: bytes, expires_ms: int | None) -> bytes:
    """A *base* ``SET`` record: a ``SET`` that later PATCHes of ``key`` may name.

    A SET in every way, of format version 2 (see :class:`Chains`).
    """
    return encode_fields(_SET, key, value, expires_ms, version=FORMAT_VERSION)


def record_crc(record: bytes) -> int:
    """The CRC field of an encoded ``record``: what a ``PATCH`` names its base by."""
    return int.from_bytes(record[:4], "little")


def encode_txn(txid: int, committed: bool) -> bytes:
    """A shard log's ``TXN`` mark: this shard committed (or aborted) round ``txid``."""
    return encode_fields(_TXN, _U64.pack(txid), b"\x01" if committed else b"\x00")


def encode_intent(txid: int, sections: list[tuple[int, bytes]]) -> bytes:
    """The intent log's record of round ``txid``: each shard's encoded effect records.

    ``sections`` holds ``(shard, records)`` pairs, ``records`` being whole
    encoded records (what that shard's log gets when it commits its part).
    The value is, per section, shard u32, length u32, then the records; an
    empty list of sections records that the round was aborted.

    Raises:
        ValueError: the payload would exceed :data:`MAX_PAYLOAD`.
    """
    value = b"".join(_SECTION.pack(shard, len(records)) + records for shard, records in sections)
    return encode_fields(_INTENT, _U64.pack(txid), value)


def intent_payload(sections: list[tuple[int, bytes]]) -> int:
    """The payload length of :func:`encode_intent`'s record of ``sections`` (over
    :data:`MAX_PAYLOAD`: it cannot be written)."""
    return MIN_PAYLOAD + _U64.size + sum(_SECTION.size + len(r) for _, r in sections)


def encode_group(records: bytes) -> bytes:
    """One ``GROUP`` record holding ``records``: whole SET, DEL, EXPIRE or FLUSH records.

    Replay applies all of them, in order, or (a torn or damaged group, or
    one holding anything else) none. To group records among which a group
    is, unwrap it first (:func:`group_contents`): groups do not nest.

    Raises:
        ValueError: ``records`` is empty, or the payload would exceed :data:`MAX_PAYLOAD`.
    """
    return encode_fields(_GROUP, b"", records)


def group_contents(encoded: bytes) -> bytes | None:
    """The records inside ``encoded`` if it is exactly one ``GROUP`` record, else None.

    For a writer that groups entries some of which are groups already (it
    trusts its own bytes: the CRC is not checked here).
    """
    if len(encoded) < HEADER_SIZE + MIN_PAYLOAD or encoded[5] != _GROUP:
        return None
    _, _, _, plen = HEADER.unpack_from(encoded)
    if HEADER_SIZE + plen != len(encoded):
        return None
    return encoded[HEADER_SIZE + 8 : len(encoded) - _EXPIRY.size]


def _group_problem(value: bytes) -> str | Newer | None:
    """Why the value of a ``GROUP`` record is not whole SET, DEL, EXPIRE or FLUSH records.

    A :class:`Newer` record inside (offset within ``value``): the group is
    not damaged, a newer build wrote it.
    """
    scanner = Scanner(value)
    for op, *_ in scanner:
        if op in (_TXN, _INTENT, _GROUP, _PATCH):
            return f"a {Op(op).name} record inside a GROUP record"
    if isinstance(scanner.problem, Newer):
        return scanner.problem
    if scanner.problem is not None:
        return f"damaged records inside a GROUP record ({scanner.problem})"
    return None


def txid_of(key: bytes) -> int:
    """The txid an ``INTENT`` or ``TXN`` record's key holds."""
    return int(_U64.unpack(key)[0])


def intent_sections(value: bytes) -> dict[int, bytes]:
    """The ``(shard -> effect records)`` of an ``INTENT`` record's value.

    Raises:
        ValueError: the value is not a valid list of sections, or a section
            is not whole valid records (the record's CRC held, so only a bug
            writes such a value).
        NewerVersion: a section holds a record of a newer format version
            (``path`` None: the caller knows the file).
    """
    sections: dict[int, bytes] = {}
    pos = 0
    n = len(value)
    while pos < n:
        if n - pos < _SECTION.size:
            raise ValueError(f"intent section header cut short at offset {pos}")
        shard, size = _SECTION.unpack_from(value, pos)
        pos += _SECTION.size
        if size > n - pos:
            raise ValueError(f"intent section of {size} bytes overruns the value at offset {pos}")
        records = value[pos : pos + size]
        scanner = Scanner(records)
        for op, _, group, _ in scanner:
            if op in (_TXN, _INTENT, _PATCH):  # a round's part is whole records
                raise ValueError(f"a {Op(op).name} record in an intent section")
            if op == _GROUP and (reason := _group_problem(group)) is not None:
                if isinstance(reason, Newer):
                    raise reason.error(None)
                raise ValueError(f"{reason} in an intent section")
        if isinstance(scanner.problem, Newer):
            raise scanner.problem.error(None)
        if scanner.problem is not None:
            raise ValueError(f"damaged effect records in the intent section of shard {shard}")
        sections[shard] = records
        pos += size
    return sections


def encode(record: Record) -> bytes:
    """Encode one record (see the module docstring for the layout).

    Raises:
        ValueError: as :func:`encode_fields`.
    """
    return encode_fields(record.op, record.key, record.value, record.expires_ms)


def _mismatch(klen: int, vlen: int, plen: int) -> str:
    return f"key length {klen} and value length {vlen} do not add up to payload length {plen}"


def _decode_at(
    data: Buffer, mv: memoryview, pos: int, n: int
) -> tuple[int, Fields] | str | Newer | None:
    """Decode the record at ``pos`` of ``data[:n]``.

    Returns:
        ``(end, fields)`` for a valid record; a reason string if the bytes at
        ``pos`` cannot be a valid record; a :class:`Newer` for a whole record
        of a newer format version whose CRC holds; None if the data ends
        inside a record whose fields present agree with a valid one (a torn
        tail).
    """
    avail = n - pos
    if avail < HEADER_SIZE:
        if avail > 4 and data[pos + 4] not in _VERSIONS:
            return f"unknown format version {data[pos + 4]}"
        if avail > 5 and data[pos + 5] not in _OPS_OF[data[pos + 4]]:
            return f"unknown op {data[pos + 5]}"
        return None
    crc, version, op, plen = HEADER.unpack_from(data, pos)
    if version not in _VERSIONS:
        # Only the first 10 bytes keep their meaning across versions (see the
        # module docstring): the CRC tells a newer record from damage.
        end = pos + HEADER_SIZE + plen
        if version > FORMAT_VERSION and end <= n and zlib.crc32(mv[pos + 4 : end]) == crc:
            return Newer.at(pos, version)
        return f"unknown format version {version}"
    if op not in _OPS_OF[version]:
        return f"unknown op {op}"
    if not MIN_PAYLOAD <= plen <= MAX_PAYLOAD:
        return f"impossible payload length {plen}"
    end = pos + HEADER_SIZE + plen
    kstart = pos + HEADER_SIZE + 4
    if end > n:
        if avail >= HEADER_SIZE + 4:
            (klen,) = _U32.unpack_from(data, pos + HEADER_SIZE)
            if MIN_PAYLOAD + klen > plen:
                return f"key length {klen} does not fit payload length {plen}"
            reason = _torn_shape_error(op, klen, plen)
            if reason is not None:
                return reason
            if kstart + klen + 4 <= n:
                (vlen,) = _U32.unpack_from(data, kstart + klen)
                if MIN_PAYLOAD + klen + vlen != plen:
                    return _mismatch(klen, vlen, plen)
            elif op in _FREE_KEY and _whole_record_after(
                data, mv, pos + HEADER_SIZE + MIN_PAYLOAD, n
            ):
                return f"key length {klen} runs past the end, but a whole record follows"
        return None
    if zlib.crc32(mv[pos + 4 : end]) != crc:
        return "CRC mismatch"
    (klen,) = _U32.unpack_from(data, pos + HEADER_SIZE)
    if MIN_PAYLOAD + klen > plen:
        return f"key length {klen} does not fit payload length {plen}"
    kend = kstart + klen
    (vlen,) = _U32.unpack_from(data, kend)
    vend = kend + 4 + vlen
    if MIN_PAYLOAD + klen + vlen != plen:
        return _mismatch(klen, vlen, plen)
    flag, exp = _EXPIRY.unpack_from(data, vend)
    expires_ms: int | None
    if flag == 0 and exp == 0:
        expires_ms = None
    elif flag == 1 and exp >= 0:
        expires_ms = exp
    else:
        return f"invalid expiry field ({flag}, {exp})"
    key = data[kstart:kend]
    value = data[kend + 4 : vend]
    if op != _SET:
        reason = _shape_error(op, key, value, expires_ms)
        if reason is not None:
            return reason
    return end, (op, key, value, expires_ms)


def _torn_shape_error(op: int, klen: int, plen: int) -> str | None:
    """Why a record cut short, of ``op`` and these lengths, cannot be a valid one (or None).

    The shape rules that lengths alone can break: a FLUSH or GROUP has no
    key, a TXN or INTENT an 8-byte one, a DEL or EXPIRE no value, a PATCH
    at least an 8-byte one.
    """
    if op in (_FLUSH, _GROUP) and klen != 0:
        return f"a {Op(op).name} record with a key length of {klen}"
    if op in (_TXN, _INTENT) and klen != 8:
        return f"a {Op(op).name} record with a key length of {klen}"
    if op in (_DEL, _EXPIRE) and plen != MIN_PAYLOAD + klen:
        return _mismatch(klen, plen - MIN_PAYLOAD - klen, plen)
    if op == _PATCH and plen < MIN_PAYLOAD + klen + _PATCH_HEAD.size:
        return f"a PATCH record with no room for its head (payload length {plen})"
    return None


# The torn-key search's bounds (see _whole_record_after): candidates looked at
# (a record begins at a version byte, 1 or 2: random data has one every 128
# bytes, so this covers about 128 MiB after the key's start, and a value that
# is a long run of 0x01 bytes 1 MiB; each costs about a microsecond), and CRC bytes, at
# most the bytes searched. Past either, the search gives up: torn, as it was
# before the search existed.
WHOLE_RECORD_CANDIDATES = 1 << 20


def _whole_record_after(data: Buffer, mv: memoryview, start: int, n: int) -> bool:
    """Whether a whole, valid record of this version begins at or after ``start`` in ``data[:n]``.

    The one forward search the decoder makes, for the one torn record whose
    lengths cannot be checked against each other: a SET or PATCH whose key
    runs past the end of the data. Two length fields damaged together (a
    burst of bad bytes) make that shape too, and the records after them
    would be cut off as a torn tail; the first of them begins where the damaged record really
    ended, near ``start``.

    Cost, linear whatever the bytes: a candidate's CRC is computed only once
    its length fields agree with each other and with the data's end (O(1)
    checks), the CRC'd bytes are capped at the bytes searched, and at most
    ``WHOLE_RECORD_CANDIDATES`` candidates are looked at; past a cap the
    answer is False (a torn tail, as before the search existed). A key
    holding a whole encoded record by design would make a torn tail look
    damaged: the start is refused, and repair loses nothing.
    """
    budget = n - start  # CRC bytes left
    candidates = WHOLE_RECORD_CANDIDATES
    # The next version byte of each version (-1: none left), the nearer first.
    v1 = data.find(_V1_BYTE, start + 4, n)
    v2 = data.find(_V2_BYTE, start + 4, n)
    while (v1 >= 0 or v2 >= 0) and candidates:
        if v2 < 0 or 0 <= v1 < v2:
            at, v1 = v1, data.find(_V1_BYTE, v1 + 1, n)
        else:
            at, v2 = v2, data.find(_V2_BYTE, v2 + 1, n)
        candidates -= 1
        pos = at - 4
        if n - pos >= _HEAD_KLEN_SIZE and data[at + 1] in _OPS_OF[data[at]]:
            _, _, _, plen, klen = _HEAD_KLEN.unpack_from(data, pos)
            if MIN_PAYLOAD + klen <= plen <= n - pos - HEADER_SIZE:
                # plen fits, so the value length field lies inside the data.
                (vlen,) = _U32.unpack_from(data, pos + _HEAD_KLEN_SIZE + klen)
                if MIN_PAYLOAD + klen + vlen == plen:
                    budget -= plen
                    if budget < 0:
                        return False
                    if isinstance(_decode_at(data, mv, pos, n), tuple):
                        return True
    return False


class Scanner:
    """Iterate the records of a buffer as plain :data:`Fields` tuples.

    The fast path of recovery: no object per record beyond the tuple and its
    key and value. After iteration, ``end`` is the offset just after the last
    valid record and ``problem`` says why the scan stopped before
    ``len(data)`` (None if it did not). While iterating, ``end`` is the end of
    the record just yielded. Never raises on any bytes.

    Args:
        data: ``bytes`` or a read-only ``mmap`` (the scan holds a memoryview
            of it until iteration ends or the iterator is closed).
        start: the offset of the first record.
    """

    def __init__(self, data: Buffer, start: int = 0) -> None:
        self._data = data
        self.end = start
        self.problem: Problem | None = None

    def __iter__(self) -> Generator[Fields, None, None]:
        data = self._data
        n = len(data)
        pos = self.end
        decode_at = _decode_at
        with memoryview(data) as mv:
            while pos < n:
                got = decode_at(data, mv, pos, n)
                if isinstance(got, tuple):
                    pos, fields = got
                    self.end = pos
                    yield fields
                    continue
                self.problem = _problem(pos, got)
                return


def _problem(pos: int, got: str | Newer | None) -> Problem:
    """The problem :func:`_decode_at` (or a refusal to apply) reported at ``pos``."""
    if got is None:
        return Torn(pos)
    if isinstance(got, Newer):
        return got if got.offset == pos else Newer.at(pos, got.version)
    return Corrupt(pos, got)


@attrs.define
class Chains:
    """What lets a replay check each ``PATCH``'s base (see :func:`replay`).

    A PATCH edits the value its key held when the edit was made, and names
    it: the CRC of the record that gave the key that value (a *base* SET,
    one of format version 2 outside a ``GROUP``, or a ``PATCH``) and the
    value's length. ``bases`` maps each key to the CRC of the record of
    that kind that last gave it its value in this replay; any other change
    of the value (a version-1 or grouped ``SET``, a ``DEL``, a ``FLUSH``)
    removes the key, and an ``EXPIRE`` changes no value. Only the keys
    edited in place are in it: the writer logs an edit whose base it does
    not know as a base SET, and only those.

    So a PATCH applies when ``bases`` names its base and the value has the
    base's length: the value is then the one the edit was made to (the
    records between were replayed, or none changed the key's value; a CRC
    collision, one in 2**32, is the exception). Any other PATCH is skipped
    and counted in ``skipped``: records were lost before it (a power loss's
    tail, a repair's, a batch the log dropped, a snapshot's entries), and
    applying it would make a value the key never held (an APPEND after a
    lost APPEND, replayed with zero bytes in its place). Its key leaves
    ``bases``, so every later PATCH of it is skipped too, until the key is
    written whole. The writer keeps the same map (``Journal.bases``, which
    it may empty at any time, never the reverse).
    """

    bases: dict[bytes, int] = attrs.field(factory=dict)
    skipped: int = 0


@attrs.frozen
class ReplayResult:
    """What :func:`replay` did: ``count`` records applied, ending at ``end``.

    ``problem`` is None if and only if ``end`` is the end of the data.
    """

    count: int
    end: int
    problem: Problem | None


def _apply(
    fields: Fields,
    crc: int,
    base: bool,
    data: dict[bytes, bytes],
    expires: dict[bytes, int],
    sets_only: bool,
    patched: set[bytes],
    chains: Chains | None = None,
) -> str | Newer | None:
    """Apply one decoded record, whose CRC is ``crc``, to ``data`` and ``expires``;
    a reason if it is refused. ``base``: the record is of version 2 (a SET
    of it is a base SET, see :class:`Chains`).

    A :class:`Newer`: a group holding a record of a newer format version.
    A PATCH edits a ``bytearray`` copy of the value in place (one copy for
    a run of edits, not one each), and adds its key to ``patched``: the
    caller makes those values ``bytes`` again (see :func:`replay`).
    ``chains``: see :class:`Chains`; None refuses a PATCH (a snapshot's,
    an intent's records are whole).
    """
    op, key, value, exp = fields
    if op == _SET:
        data[key] = value
        if exp is None:
            expires.pop(key, None)
        else:
            expires[key] = exp
        if chains is not None:
            if base:
                chains.bases[key] = crc
            else:
                chains.bases.pop(key, None)
    elif sets_only:
        return f"a {Op(op).name} record where only SET records may be"
    elif op == _DEL:
        data.pop(key, None)
        expires.pop(key, None)
        if chains is not None:
            chains.bases.pop(key, None)
    elif op == _EXPIRE:
        if key in data:
            if exp is None:
                expires.pop(key, None)
            else:
                expires[key] = exp
    elif op == _FLUSH:
        data.clear()
        expires.clear()
        if chains is not None:
            chains.bases.clear()
    elif op == _PATCH:
        if chains is None:
            return "a PATCH record where only whole records may be"
        offset, base_crc, base_len = _PATCH_HEAD.unpack_from(value)
        old: object = data.get(key)
        if chains.bases.get(key) != base_crc or old is None or len(cast(bytes, old)) != base_len:
            chains.bases.pop(key, None)
            chains.skipped += 1
            return None
        chains.bases[key] = crc
        if isinstance(old, bytearray):
            current = old
        else:
            current = bytearray(cast(bytes, old))
            data[key] = cast(bytes, current)  # until the end of replay()
            patched.add(key)
        if len(current) < offset:
            current.extend(bytes(offset - len(current)))
        with memoryview(value) as edit:
            current[offset : offset + len(edit) - _PATCH_HEAD.size] = edit[_PATCH_HEAD.size :]
    elif op == _INTENT:
        return "an INTENT record where only a shard's records may be"
    elif op == _GROUP:
        # The common group, an MSET's SETs: replayed by replay()'s inline SET
        # path into scratch dicts, then merged (all or nothing). Decoding each
        # SET through the generic decoder twice (check, then apply) made a log
        # of MSETs recover at ~280k keys/s instead of ~400k.
        group_data: dict[bytes, bytes] = {}
        group_expires: dict[bytes, int] = {}
        if replay(value, group_data, group_expires, sets_only=True).problem is None:
            if expires:
                for key in group_data.keys() - group_expires.keys():
                    expires.pop(key, None)
            data.update(group_data)
            expires.update(group_expires)
            if chains is not None and chains.bases:
                for key in group_data:  # a grouped SET is no PATCH's base
                    chains.bases.pop(key, None)
            return None
        del group_data, group_expires  # the copies go before the next pass makes its own
        # Anything else (a DEL, EXPIRE or FLUSH among them; damage, which
        # only a bug writes, since the group's CRC held): checked whole before
        # any of it is applied. No group or PATCH inside, so what follows
        # refuses nothing.
        reason = _group_problem(value)
        if reason is not None:
            return reason
        for fields_ in Scanner(value):
            _apply(fields_, 0, False, data, expires, sets_only, patched)
            if chains is not None:
                if fields_[0] == _FLUSH:
                    chains.bases.clear()
                elif fields_[0] != _EXPIRE:  # an EXPIRE changes no value
                    chains.bases.pop(fields_[1], None)  # a grouped SET is no PATCH's base
    # _TXN: a mark, no change to the keys (replay reports it to its caller)
    return None


# Whole SET records by (key length, value length), for replay: (key length,
# value length, payload length, record size, unpacker of every field).
# Bounded as _SET_PACKERS; shapes past _SET_PACKED_MAX take the general path.
_SetShape: TypeAlias = tuple[int, int, int, int, Callable[[Buffer, int], tuple[Any, ...]]]
_SET_SHAPES: dict[tuple[int, int], _SetShape] = {}


def _set_shape(klen: int, vlen: int) -> _SetShape:
    shape = _SET_SHAPES.get((klen, vlen))
    if shape is None:
        if len(_SET_SHAPES) >= _SET_PACKERS_MAX:
            _SET_SHAPES.clear()
        unpacker = struct.Struct(f"<IBBII{klen}sI{vlen}sBq")
        plen = MIN_PAYLOAD + klen + vlen
        assert unpacker.size == HEADER_SIZE + plen
        shape = _SET_SHAPES[klen, vlen] = (klen, vlen, plen, unpacker.size, unpacker.unpack_from)
    return shape


def replay(
    buf: Buffer,
    data: dict[bytes, bytes],
    expires: dict[bytes, int],
    *,
    start: int = 0,
    sets_only: bool = False,
    marks: dict[int, bool] | None = None,
    chains: Chains | None = None,
) -> ReplayResult:
    """Apply the records of ``buf`` in order to a shard's ``data`` and ``expires``.

    The hot loop of recovery. ``data`` maps key to value and ``expires`` key
    to absolute expiry (Unix ms), the layout of the shard store; what each op
    does is said in :class:`Op`. Expired keys are kept: a later record may
    still change their expiry, so only the caller, once every record is in,
    knows which keys are expired.

    Design: the common record, a ``SET``, is decoded inline with
    ``struct.unpack_from`` and one ``zlib.crc32`` over a memoryview (no
    function call and no object but its key and value); anything else,
    including every damaged record, goes through the one decoder that
    :class:`Scanner` uses too, which is the authority on validity. The inline
    path only accepts what that decoder accepts.

    Args:
        buf: the records (``bytes`` or a read-only ``mmap``).
        data, expires: the state to update in place.
        start: the offset of the first record.
        sets_only: refuse every op but ``SET`` (snapshots hold only SETs).
        marks: where each ``TXN`` record goes, as txid -> committed (the
            last mark of a txid wins); None ignores them.
        chains: the bases of the PATCHes to apply, updated (see
            :class:`Chains`); None refuses every PATCH.

    Returns:
        How many records were applied and where and why the replay stopped.
        Never raises on any bytes; a damaged record changes nothing.
    """
    n = len(buf)
    pos = start
    count = 0
    head = _HEAD_KLEN.unpack_from
    u32 = _U32.unpack_from
    expiry = _EXPIRY.unpack_from
    crc32 = zlib.crc32
    problem: Problem | None = None
    patched: set[bytes] = set()  # keys a PATCH left a bytearray (see _apply)
    # Chains.bases, kept by the inline SET paths too: a base SET (of version 2)
    # puts its key's CRC in, a version-1 SET takes it out. Without chains, a
    # throwaway (a base SET is then a SET, as everywhere but in a log's replay).
    bases: dict[bytes, int] = {} if chains is None else chains.bases
    v2 = FORMAT_VERSION
    # The shape of the last SET accepted (see _SetShape), in locals: tried
    # first on the next record, whose every field it unpacks in one call.
    # Its checks accept exactly what the general path's do (the record's
    # lengths agree with the shape, so it ends at pos + s_size <= n).
    s_size = 0  # 0: no shape to try
    s_klen = s_vlen = s_plen = 0
    s_unpack: Callable[[Buffer, int], tuple[Any, ...]] = _U32.unpack_from
    with memoryview(buf) as mv:
        while pos < n:
            if s_size and n - pos >= s_size:
                crc, version, op, plen, klen, key, vlen, value, flag, exp = s_unpack(buf, pos)
                end = pos + s_size
                if (
                    op == _SET
                    and (version == _V1 or version == v2)
                    and plen == s_plen
                    and klen == s_klen
                    and vlen == s_vlen
                    and crc32(mv[pos + 4 : end]) == crc
                ):
                    if flag == 1 and exp >= 0:
                        data[key] = value
                        expires[key] = exp
                        if version == v2:  # a base SET
                            bases[key] = crc
                        elif bases:  # a SET of version 1 is no PATCH's base
                            bases.pop(key, None)
                        count += 1
                        pos = end
                        continue
                    if flag == 0 and exp == 0:
                        data[key] = value
                        if expires:
                            expires.pop(key, None)
                        if version == v2:
                            bases[key] = crc
                        elif bases:
                            bases.pop(key, None)
                        count += 1
                        pos = end
                        continue
                s_size = 0  # another shape (or damage): the general path decides
            if n - pos >= _HEAD_KLEN_SIZE:
                crc, version, op, plen, klen = head(buf, pos)
                end = pos + HEADER_SIZE + plen
                if (
                    op == _SET
                    and (version == _V1 or version == v2)
                    and MIN_PAYLOAD <= plen <= MAX_PAYLOAD
                    and end <= n
                    and MIN_PAYLOAD + klen <= plen
                    and crc32(mv[pos + 4 : end]) == crc
                ):
                    kend = pos + _HEAD_KLEN_SIZE + klen
                    vlen = u32(buf, kend)[0]
                    vend = kend + 4 + vlen
                    if vend + 9 == end:  # 9: the expiry field
                        flag, exp = expiry(buf, vend)
                        if (flag == 1 and exp >= 0) or (flag == 0 and exp == 0):
                            key = buf[pos + _HEAD_KLEN_SIZE : kend]
                            data[key] = buf[kend + 4 : vend]
                            if flag:
                                expires[key] = exp
                            elif expires:
                                expires.pop(key, None)
                            if version == v2:  # a base SET
                                bases[key] = crc
                            elif bases:  # a SET of version 1 is no PATCH's base
                                bases.pop(key, None)
                            count += 1
                            pos = end
                            if klen + vlen <= _SET_PACKED_MAX:
                                s_klen, s_vlen, s_plen, s_size, s_unpack = _set_shape(klen, vlen)
                            continue
            got = _decode_at(buf, mv, pos, n)
            if not isinstance(got, tuple):
                problem = _problem(pos, got)
                break
            end, fields = got
            crc, version = _CRC_VERSION.unpack_from(buf, pos)
            refused = _apply(
                fields, crc, version == FORMAT_VERSION, data, expires, sets_only, patched, chains
            )
            if refused is not None:
                problem = _problem(pos, refused)
                break
            if fields[0] == _TXN and marks is not None:
                marks[_U64.unpack(fields[1])[0]] = fields[2] == b"\x01"
            count += 1
            pos = end
    for key in patched:
        edited: object = data.get(key)
        if isinstance(edited, bytearray):
            data[key] = bytes(edited)
    return ReplayResult(count, pos, problem)


def decode_stream(data: bytes) -> DecodeResult:
    """Decode every record of ``data`` up to the first damaged one.

    Never raises, and never returns a record that fails its CRC or shape check.
    """
    scanner = Scanner(data)
    records = [Record(Op(op), key, value, exp) for op, key, value, exp in scanner]
    return DecodeResult(records, scanner.end, scanner.problem)
