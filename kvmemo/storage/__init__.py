"""KVMemo storage layer (see ../shared/ARCHITECTURE.md)."""
