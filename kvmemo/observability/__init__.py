"""KVMemo observability layer (see ../shared/ARCHITECTURE.md)."""
