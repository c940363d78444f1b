"""Persistence: the write-ahead log, snapshots and recovery of each shard.

The bottom layer: it knows records of bytes, nothing of shards' internals,
and imports neither trio nor the rest of KVMemo (but the leaf
``kvmemo.errors``, whose ``KVMemoError`` its errors subclass). Every blocking call here
(``SegmentedLog.sync``, ``write_snapshot``, ``recover``) is meant to run in
a worker thread (``trio.to_thread.run_sync``).
"""

from .records import FORMAT_VERSION as FORMAT_VERSION
from .records import Corrupt as Corrupt
from .records import DecodeResult as DecodeResult
from .records import Newer as Newer
from .records import NewerVersion as NewerVersion
from .records import Op as Op
from .records import PersistenceError as PersistenceError
from .records import Record as Record
from .records import ReplayResult as ReplayResult
from .records import Scanner as Scanner
from .records import Torn as Torn
from .records import decode_stream as decode_stream
from .records import encode as encode
from .records import encode_fields as encode_fields
from .records import encode_set as encode_set
from .records import replay as replay
from .recovery import CorruptLog as CorruptLog
from .recovery import Recovered as Recovered
from .recovery import recover as recover
from .snapshot import CorruptSnapshot as CorruptSnapshot
from .snapshot import list_snapshots as list_snapshots
from .snapshot import load_snapshot as load_snapshot
from .snapshot import newest_snapshot as newest_snapshot
from .snapshot import write_snapshot as write_snapshot
from .wal import AppendFsync as AppendFsync
from .wal import LogFailedError as LogFailedError
from .wal import SegmentedLog as SegmentedLog
from .wal import list_segments as list_segments
