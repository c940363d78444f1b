"""KVMemo commands layer (see ../shared/ARCHITECTURE.md)."""
