"""KVMemo server layer (see ../shared/ARCHITECTURE.md)."""
