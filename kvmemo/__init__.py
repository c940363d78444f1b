"""KVMemo: an in-memory key-value store on trio, built as a supervised actor system.

Embedded use::

    async with kvmemo.open_store(shards=16, maxmemory="64MiB") as kv:
        await kv.set("k", "v", ex=10)
"""

from ._version import __version__ as __version__
from .api import Commands as Commands
from .client import Client as Client
from .client import DisconnectedError as DisconnectedError
from .client import connect as connect
from .config import StoreConfig as StoreConfig
from .embedded import Store as Store
from .embedded import Subscription as Subscription
from .embedded import open_store as open_store
from .embedded import serve as serve
from .engine.engine import KVEngine as KVEngine
from .engine.pubsub import Message as Message
from .errors import ArityError as ArityError
from .errors import BusyKeyError as BusyKeyError
from .errors import CommandSyntaxError as CommandSyntaxError
from .errors import DisabledError as DisabledError
from .errors import InternalError as InternalError
from .errors import KVMemoError as KVMemoError
from .errors import NoAuthError as NoAuthError
from .errors import NotIntegerError as NotIntegerError
from .errors import OutOfMemoryError as OutOfMemoryError
from .errors import OverloadedError as OverloadedError
from .errors import PersistenceIOError as PersistenceIOError
from .errors import RequestTimeoutError as RequestTimeoutError
from .errors import TooLargeError as TooLargeError
from .errors import UnavailableError as UnavailableError
from .errors import UnknownCommandError as UnknownCommandError
from .errors import WrongTypeError as WrongTypeError
from .persistence.layout import DirectoryInUse as DirectoryInUse
