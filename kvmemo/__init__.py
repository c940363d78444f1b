"""KVMemo: an in-memory key-value store on trio, built as a supervised actor system."""

from .errors import KVMemoError as KVMemoError

__version__ = "0.1.0"
